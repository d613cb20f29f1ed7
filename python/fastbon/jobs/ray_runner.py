"""A data-set job on Ray Data: the input read by Ray, one actor per worker that loads the model once, and
the same parts, resume and samples as the local path.

Ray Data reads the input (``read_json`` / ``read_parquet``, so object-storage paths work); the driver checks it
and cuts it into the same groups as the local path (``fastbon.jobs.groups.plan_groups``); the groups become a data set
of one row per group, one block each, and ``map_batches`` runs ``GroupWorker`` on them over
``ActorPoolStrategy(size=workers)``, one GPU per actor when the cluster has GPUs, else ``threads_per_worker``
CPUs. Each call writes its group's part itself (atomically, named by the group's ids, so a retried call rewrites
the same part) and returns one row of counts, which the driver reads as a stream for the progress bar.

Why rows are groups and not prompts: a group is one ``fastbon.generate`` call, and what else is in the batch
changes the float rounding of its matmuls. Handing Ray whole groups keeps every prompt's batch the same for any
worker count, retry or resume. (A ``groupby`` would do the same by shuffling, but Ray's hash shuffle needs free
CPUs beside the actors, which a 2-core node does not have.) Ray does placement, retries (a killed actor is
restarted and its call rerun: ``max_restarts`` / ``max_task_retries`` below) and back-pressure.
"""

import contextlib
from dataclasses import replace
from pathlib import Path

from . import parquet
from .config import BatchConfig
from .groups import Job, PromptGenerator, run_group


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError("fastbon.jobs on Ray needs Ray Data: pip install 'fastbon[ray]'") from error
    return ray


def run_ray(config: BatchConfig, input, output, *, address, dtype, batch_prompts: int, progress: bool, workers: int,
            threads_per_worker: int) -> dict:
    """Run the job ``config`` over ``input`` into ``output`` on the Ray cluster at ``address`` (True: the one this
    process joined, else a local one started and stopped with the job); ``dtype`` None: bfloat16 when the cluster
    has GPUs, else float32. Returns the progress meter's summary."""
    started = connect(address)
    try:
        on_gpu = cluster_has_gpus()
        config = replace(config, dtype=dtype or ("bfloat16" if on_gpu else "float32"))
        job = Job(config, read_input(input), output, batch_prompts, progress)
        with parquet.exclusive(output):
            run_on_ray(config, job.table, job.groups, output, job.meter, workers=workers,
                       threads_per_worker=threads_per_worker, on_gpu=on_gpu)
        return job.meter.summary()
    finally:
        if started:
            _ray().shutdown()


def connect(address) -> bool:
    """Join the Ray cluster at ``address`` (True: the one this process already joined, else a new local one).
    Returns whether this call started Ray, so the caller shuts it down after the job."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address is True:
        ray.init(include_dashboard=False)
    else:
        if not isinstance(address, str):
            raise TypeError(f"ray must be False, True or an address string, got {address!r}")
        ray.init(address=address)
    return True


def cluster_has_gpus() -> bool:
    return _ray().cluster_resources().get("GPU", 0) >= 1


@contextlib.contextmanager
def _data_context(**execution_options):
    """Ray Data settings for this job's data sets only (they copy the context when created); restored after."""
    context = _ray().data.DataContext.get_current()
    saved = {name: getattr(context.execution_options, name) for name in execution_options}
    for name, value in execution_options.items():
        setattr(context.execution_options, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context.execution_options, name, value)


def read_input(path) -> "parquet.pyarrow.Table":
    """The input as one checked table, read by Ray Data in file order (row numbers are the default ids)."""
    ray = _ray()
    pyarrow = parquet.pyarrow_modules()[0]
    kind = parquet.input_format(path)
    with _data_context(preserve_order=True):
        try:
            dataset = ray.data.read_parquet(path) if kind == "parquet" else ray.data.read_json(path)
            table = pyarrow.concat_tables(ray.get(dataset.to_arrow_refs()), promote_options="default")
        except (ray.exceptions.RayError, OSError, pyarrow.ArrowInvalid) as error:
            cause = getattr(error, "cause", None) or error  # a failed read task's own error, not Ray's traceback
            raise ValueError(f"input: cannot read {path}: {type(cause).__name__}: {cause}") from error
    return parquet.check_input(table, f"input: {path}")


class GroupWorker:
    """A Ray actor's state: the model, tokenizer and score, loaded once; each call runs one group."""

    def __init__(self, config: dict, output: str, on_gpu: bool, threads: int):
        import torch

        if not on_gpu:
            torch.set_num_threads(threads)
        self.generator = PromptGenerator(BatchConfig(**config), "cuda" if on_gpu else "cpu")
        self.output, self.jsonl = output, config["jsonl"]

    def __call__(self, groups):
        pyarrow = parquet.pyarrow_modules()[0]
        rows = [run_group(self.generator, self.output, ids, prompts, self.jsonl)
                for ids, prompts in zip(groups["ids"].to_pylist(), groups["prompts"].to_pylist(), strict=True)]
        return pyarrow.table({name: [row[name] for row in rows] for name in rows[0]})


def run_on_ray(config, table, groups: list, output, meter, *, workers: int, threads_per_worker: int,
               on_gpu: bool) -> None:
    """Run ``groups`` (lists of row positions of ``table``) on the connected Ray cluster into ``output``."""
    if not groups:
        return
    ray = _ray()
    pyarrow = parquet.pyarrow_modules()[0]
    prompt_column = "prompt" if "prompt" in table.column_names else "messages"
    blocks = [pyarrow.table({"ids": [table["id"].take(group).to_pylist()],
                             "prompts": [table[prompt_column].take(group).to_pylist()]}) for group in groups]
    config_dict = {**vars(config), "stop": tuple(config.stop)}
    resources = dict(num_gpus=1) if on_gpu else dict(num_cpus=threads_per_worker)
    # fastbon's progress bar counts prompts; Ray's own bars would print over it.
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, not meter.enabled
    try:
        counts = ray.data.from_arrow(blocks).map_batches(
            GroupWorker, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs=dict(config=config_dict, output=str(Path(output).resolve()), on_gpu=on_gpu,
                                       threads=threads_per_worker), **resources)
        for row in counts.iter_rows():
            meter.update(**row)
    finally:
        context.enable_progress_bars = progress_bars
