"""Data-set jobs: a file of prompts -> best-of-n samples as a Parquet data set, resumable, here or on Ray Data.

``fastbon.batch.run("prompts.jsonl", "out/", n=16, k=1)`` (or ``fastbon batch prompts.jsonl -o out/``) writes
one row per returned sample (columns in ``OUTPUT_COLUMNS``) into parts under ``out/`` (see ``fastbon.batch_io``).

Determinism: prompt ``id`` samples with the seed ``prompt_seed(seed, id)`` (a stable hash), and the prompts are
cut into groups (one ``fastbon.generate`` call and one part each) from the whole input, sorted by length, before
any prompt is skipped. A group is therefore the same set of prompts whatever the worker count, and a rerun skips
whole groups, so each prompt's samples are bit-identical across workers and resumes (float rounding in a batched
matmul depends on what else is in the batch; fixed groups keep even that the same). Changing ``batch_prompts``
changes the groups: samples stay the same draws, their last bits may not.
"""

import hashlib
import importlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import batch_io
from .scoring import SCORE_RULES

OUTPUT_COLUMNS = ("id", "prompt", "rank", "sample", "completion", "tokens", "token_logprobs", "score",
                  "finish_reason")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGPROB_MODES = ("raw", "processed")


def prompt_seed(seed: int, prompt_id) -> int:
    """The sampling seed of one prompt: a stable 63-bit hash of (job seed, id), the same in every process
    (Python's ``hash`` is salted per process)."""
    key = json.dumps([seed, prompt_id.item() if hasattr(prompt_id, "item") else prompt_id]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass(frozen=True)
class BatchConfig:
    """What decides a job's samples: a rerun into the same folder must match it (the manifest)."""

    model: str | None = None  # a local Hugging Face folder; None = the embedded default model
    n: int = 16
    k: int = 1
    return_all: bool = False  # write all n samples per prompt (ranked), not the best k
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    score: str = "mean_logprob"  # a rule, a reward-model folder, or "module:function"
    stop: tuple = field(default_factory=tuple)
    logprobs: str = "raw"
    dtype: str = "float32"
    jsonl: bool = False

    def check(self) -> None:
        from .ops.sampling import sampling_params

        for name in ("n", "k", "max_new_tokens"):
            _positive_int(name, getattr(self, name))
        if self.k > self.n:
            raise ValueError(f"k must be <= n, got k={self.k} > n={self.n}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        sampling_params(1, "cpu", temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        min_p=self.min_p, seed=0)
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(string, str) or not string for string in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {list(self.stop)!r}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs must be one of {LOGPROB_MODES}, got {self.logprobs!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a Hugging Face model folder (no config.json)")
        check_score_option(self.score)

    def manifest(self) -> dict:
        """The configuration as written to ``_manifest.json``, with fingerprints of the model (and reward model)
        folders so a changed checkpoint under the same path is caught too."""
        from .models import DEFAULT_MODEL_DIR

        manifest = asdict(self)
        manifest["stop"] = list(self.stop)
        manifest["model_fingerprint"] = batch_io.fingerprint_folder(self.model or DEFAULT_MODEL_DIR)
        if Path(self.score).is_dir():
            manifest["score_fingerprint"] = batch_io.fingerprint_folder(self.score)
        return manifest


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_score_option(score) -> None:
    """``score`` is a rule, a reward-model folder, or an importable ``module:function``: checked before any work."""
    if not isinstance(score, str):
        raise TypeError(f"score must be a string (a rule, a reward-model folder or module:function), got "
                        f"{type(score).__name__}")
    if score in SCORE_RULES:
        return
    if Path(score).is_dir():
        if not (Path(score) / "config.json").is_file():
            raise ValueError(f"score: {score} is a folder without config.json, not a reward model")
        return
    if ":" in score:
        _score_factory(score)
        return
    raise ValueError(f"score must be one of {SCORE_RULES}, a reward-model folder or module:function, got {score!r}")


def _score_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"score: cannot import {spec!r}: {error}") from error
    if not callable(factory):
        raise TypeError(f"score: {spec} is not callable")
    return factory


def build_score(score: str, tokenizer, device, dtype):
    """What ``fastbon.generate(score=...)`` takes: a rule name; ``fastbon.scoring.reward_model`` of the
    sequence-classification folder; or ``function(tokenizer)`` for ``module:function``, which returns the score
    callable (e.g. ``fastbon.scoring.verifier(check, tokenizer)``) and runs once per worker."""
    if score in SCORE_RULES:
        return score
    from .scoring import reward_model

    if Path(score).is_dir():
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(score, dtype=dtype).to(device).eval()
        return reward_model(model)
    built = _score_factory(score)(tokenizer)
    if not callable(built):
        raise TypeError(f"score: {score}(tokenizer) must return a score callable, got {type(built).__name__}")
    return built


def load_tokenizer(model):
    if model is None:
        from transformers import PreTrainedTokenizerFast

        from .models import DEFAULT_MODEL_DIR

        return PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def render(tokenizer, value) -> tuple[str, bool]:
    """(prompt text, whether tokenizing it adds special tokens): text as it is; a ``messages`` list through the
    tokenizer's chat template (which writes its own special tokens)."""
    if isinstance(value, str):
        return value, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("input: a 'messages' column needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True), False


def prompt_texts(table, tokenizer) -> list:
    """Each input row's prompt as text (chat messages rendered)."""
    if "prompt" in table.column_names:
        return table["prompt"].to_pylist()
    return [render(tokenizer, messages)[0] for messages in table["messages"].to_pylist()]


def plan_groups(ids: list, texts: list, lengths: list, batch_prompts: int, done: dict) -> list:
    """Groups of row positions, one ``fastbon.generate`` call each: the whole input sorted by token length (less
    padding), cut every ``batch_prompts`` rows, then the rows already in ``done`` ({id: prompt}) dropped. A done
    id whose prompt differs from the input's is refused: the output would mix two data sets."""
    changed = [i for i, text in zip(ids, texts, strict=True) if i in done and done[i] != text]
    if changed:
        raise ValueError(f"output: ids {changed[:5]} were written with a different prompt than the input's now")
    order = sorted(range(len(ids)), key=lambda position: (lengths[position], position))
    groups = [order[start:start + batch_prompts] for start in range(0, len(order), batch_prompts)]
    groups = [[position for position in group if ids[position] not in done] for group in groups]
    return [group for group in groups if group]


class PromptGenerator:
    """Loads the model, tokenizer and score once; turns one group of prompts into its output rows."""

    def __init__(self, config: BatchConfig, device):
        from .models import load_default_model

        self.config, self.device = config, torch.device(device)
        dtype = DTYPES[config.dtype]
        if config.model is None:
            self.model, self.tokenizer = load_default_model(device=self.device, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(self.device).eval()
            self.tokenizer = load_tokenizer(config.model)
        self.score = build_score(config.score, self.tokenizer, self.device, dtype)

    def __call__(self, ids: list, prompts: list) -> tuple:
        """(pyarrow table of the rows, generated tokens) for prompts ``prompts`` (text or messages) with ``ids``."""
        from . import FINISH_REASONS, generate

        pyarrow = batch_io.pyarrow_modules()[0]
        config, tokenizer = self.config, self.tokenizer
        texts, input_ids = [], []
        for prompt in prompts:
            text, special = render(tokenizer, prompt)
            texts.append(text)
            input_ids.append(torch.tensor(tokenizer(text, add_special_tokens=special).input_ids, dtype=torch.int64))
        returned = config.n if config.return_all else config.k
        result = generate(self.model, input_ids, n=config.n, k=returned, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                          repetition_penalty=config.repetition_penalty, score=self.score,
                          seed=[prompt_seed(config.seed, i) for i in ids], logprobs=config.logprobs,
                          stop_strings=list(config.stop) or None, tokenizer=tokenizer)
        lengths, sequences = result.lengths.tolist(), result.sequences.cpu()
        logprobs, scores = result.token_logprobs.cpu(), result.scores.cpu().tolist()
        samples, reasons = result.indices.tolist(), result.finish_reasons.tolist()
        columns = {name: [] for name in OUTPUT_COLUMNS}
        for prompt, (prompt_id, text) in enumerate(zip(ids, texts, strict=True)):
            for rank in range(returned):
                length = lengths[prompt][rank]
                tokens = sequences[prompt, rank, :length]
                row = dict(id=prompt_id, prompt=text, rank=rank, sample=samples[prompt][rank],
                           completion=tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens.tolist(),
                           token_logprobs=logprobs[prompt, rank, :length].tolist(), score=scores[prompt][rank],
                           finish_reason=FINISH_REASONS[reasons[prompt][rank]])
                for name, value in row.items():
                    columns[name].append(value)
        schema = output_schema(pyarrow.string() if isinstance(ids[0], str) else pyarrow.int64())
        return pyarrow.table(columns, schema=schema), int(result.stats["tokens_generated"])


def run_group(generator: PromptGenerator, output, ids: list, prompts: list, jsonl: bool) -> dict:
    """One group: generate, write its part; the counts the progress meter adds up (CPU seconds are this
    process's, all its threads, so a shared machine's other load does not inflate them)."""
    cpu_start = time.process_time()
    rows, tokens = generator(ids, prompts)
    batch_io.write_part(output, batch_io.part_key(ids), rows, jsonl)
    return dict(prompts=len(ids), tokens=tokens, cpu_seconds=time.process_time() - cpu_start)


def output_schema(id_type):
    pyarrow = batch_io.pyarrow_modules()[0]
    return pyarrow.schema([("id", id_type), ("prompt", pyarrow.string()), ("rank", pyarrow.int32()),
                           ("sample", pyarrow.int32()), ("completion", pyarrow.string()),
                           ("tokens", pyarrow.list_(pyarrow.int64())),
                           ("token_logprobs", pyarrow.list_(pyarrow.float32())), ("score", pyarrow.float64()),
                           ("finish_reason", pyarrow.string())])


class Progress:
    """The progress bar (prompts done, samples/s, tokens/s, ETA) and the counts the summary reports."""

    def __init__(self, total: int, skipped: int, n: int, enabled: bool):
        from tqdm import tqdm

        self.n, self.skipped, self.enabled = n, skipped, enabled
        self.prompts, self.tokens, self.parts, self.cpu_seconds = 0, 0, 0, 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, unit="prompt", disable=not enabled, dynamic_ncols=True)

    def update(self, prompts: int, tokens: int, cpu_seconds: float) -> None:
        self.prompts, self.tokens, self.parts = self.prompts + prompts, self.tokens + tokens, self.parts + 1
        self.cpu_seconds += cpu_seconds
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.prompts * self.n / elapsed:.1f} samples/s, {self.tokens / elapsed:.1f} "
                                 "tokens/s", refresh=False)
        self.bar.update(prompts)

    def summary(self) -> dict:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        return dict(prompts=self.prompts, skipped=self.skipped, parts=self.parts, samples=self.prompts * self.n,
                    tokens=self.tokens, seconds=seconds, prompts_per_s=self.prompts / max(seconds, 1e-9),
                    tokens_per_s=self.tokens / max(seconds, 1e-9), worker_cpu_seconds=self.cpu_seconds)


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
            (prompt ``id`` samples with ``prompt_seed(seed, id)``); return_all: write all n samples.
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
        _positive_int(name, value)
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
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = replace(config, dtype=dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        table = batch_io.read_input(input)
        job = _Job(config, table, output, batch_prompts, progress)
        with batch_io.exclusive(output):
            generator = PromptGenerator(config, device) if job.groups else None
            prompts = table[job.prompt_column].to_pylist()
            for group in job.groups:
                ids = [job.ids[position] for position in group]
                job.meter.update(**run_group(generator, output, ids, [prompts[p] for p in group], jsonl))
        return job.meter.summary()
    from . import batch_ray

    started = batch_ray.connect(ray)
    try:
        on_gpu = batch_ray.cluster_has_gpus()
        config = replace(config, dtype=dtype or ("bfloat16" if on_gpu else "float32"))
        job = _Job(config, batch_ray.read_input(input), output, batch_prompts, progress)
        with batch_io.exclusive(output):
            batch_ray.run_on_ray(config, job.table, job.groups, output, job.meter, workers=workers,
                                 threads_per_worker=threads_per_worker, on_gpu=on_gpu)
        return job.meter.summary()
    finally:
        if started:
            import ray as ray_module

            ray_module.shutdown()


class _Job:
    """A checked input against its output folder: the groups still to run (the output folder is created, with
    its manifest, only once everything checked out) and the progress meter."""

    def __init__(self, config: BatchConfig, table, output, batch_prompts: int, progress: bool):
        tokenizer = load_tokenizer(config.model)
        self.table, self.ids = table, table["id"].to_pylist()
        self.prompt_column = "prompt" if "prompt" in table.column_names else "messages"
        texts = prompt_texts(table, tokenizer)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=self.prompt_column == "prompt").input_ids]
        manifest = config.manifest()
        batch_io.check_manifest(output, manifest)
        done = batch_io.finished_prompts(output) if Path(output).is_dir() else {}
        self.groups = plan_groups(self.ids, texts, lengths, batch_prompts, done)
        batch_io.prepare_output(output, manifest)
        skipped = sum(1 for prompt_id in self.ids if prompt_id in done)
        self.meter = Progress(sum(len(group) for group in self.groups), skipped, config.n, progress)
