"""Data-set jobs: a file of prompts -> best-of-n samples as a Parquet data set, resumable, here or on Ray Data.

``fastbon.jobs.run("prompts.jsonl", "out/", n=16, k=1)`` (or ``fastbon batch prompts.jsonl -o out/``) writes one row
per returned sample (columns in ``groups.OUTPUT_COLUMNS``) into parts under ``out/``. The modules, bottom up:
``parquet`` (the input, the manifest and the parts), ``config`` (what decides the samples), ``groups`` (the groups of
prompts, the generator that turns one into its rows, the progress meter), then the two runners that use them:
``local`` (this process) and ``ray_runner`` (Ray Data actors). docs/batch.md says how a job resumes and why its
samples are the same for any worker count.
"""

from pathlib import Path

from ..config import check_int
from ..scoring import SCORE_RULES
from .config import BatchConfig
from .local import run_local


def run(input, output, *, model=None, n=16, k=1, return_all=False, max_new_tokens=64, temperature=1.0, top_k=0,
        top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0, score="mean_logprob", stop=(), logprobs="raw",
        dtype=None, jsonl=False, batch_prompts=16, device=None, ray=False, workers=1, threads_per_worker=1,
        progress=True) -> dict:
    """Best-of-n over every prompt of ``input`` (JSONL or Parquet: ``prompt`` or ``messages``, optional ``id``)
    into the Parquet data set ``output`` (a folder), skipping prompts a previous run of the same configuration
    already wrote there.

    Args:
        model: a local Hugging Face folder (default: the embedded model). n, k, max_new_tokens, temperature,
            top_k, top_p, min_p, repetition_penalty, logprobs: as in ``fastbon.generate``; seed: the job's seed
            (prompt ``id`` samples with ``fastbon.prompts.prompt_seed(seed, id)``); return_all: write all n samples.
        score: "mean_logprob", "sum_logprob", a reward-model folder, or "module:function" (``function(tokenizer)``
            returns a score callable). stop: stop strings. dtype: "float32" | "bfloat16" | "float16" (default
            bfloat16 on a GPU, else float32). jsonl: also write each part as JSONL under ``output/_jsonl``.
        batch_prompts: prompts per ``fastbon.generate`` call (and per part). device: for the local path.
        ray: False (this process), True (a local Ray cluster, or the one ``ray.init`` already joined) or a Ray
            address; workers and threads_per_worker size the actor pool on CPU nodes (one GPU per worker on GPUs).

    Returns:
        The summary: prompts generated this run, skipped (already written), parts, samples, tokens, seconds,
        prompts_per_s, tokens_per_s, worker_cpu_seconds (the groups' CPU time, summed over workers).
    """
    for name, value in (("batch_prompts", batch_prompts), ("workers", workers),
                        ("threads_per_worker", threads_per_worker)):
        check_int(name, value, 1)
    if ray is not False and ray is not True and not isinstance(ray, str):
        raise TypeError(f"ray must be False, True or a Ray address, got {ray!r}")
    # Absolute paths, so the manifest names the same folders whatever the working directory of a rerun.
    model = None if model is None else str(Path(model).resolve())
    if isinstance(score, str) and score not in SCORE_RULES and Path(score).is_dir():
        score = str(Path(score).resolve())
    config = BatchConfig(model=model, n=n, k=k, return_all=return_all, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed, score=score,
                         stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), logprobs=logprobs,
                         dtype=dtype or "float32", jsonl=jsonl)
    config.check()  # everything but the default dtype, which waits for the device: before Ray starts
    if ray is False:
        return run_local(config, input, output, dtype=dtype, device=device, batch_prompts=batch_prompts,
                         progress=progress)
    from .ray_runner import run_ray

    return run_ray(config, input, output, address=ray, dtype=dtype, batch_prompts=batch_prompts, progress=progress,
                   workers=workers, threads_per_worker=threads_per_worker)
