"""A data-set job's groups: the input cut into groups of prompts (one output part each), the generator that runs
them on one engine per worker and turns each group into its rows, and the progress meter. The local and Ray runners
share them.

Determinism: prompt ``id`` samples with the seed ``prompt_seed(seed, id)`` (``fastbon.prompts``), and a request's
tokens and log-probs depend only on its prompt, its settings and its seed (``fastbon.engine``), never on what else
the engine runs. So each prompt's rows are bit-identical across worker counts, resumes and ``batch_prompts``. The
prompts are cut into groups from the whole input, sorted by length, before any prompt is skipped, so a rerun skips
whole groups (parts).
"""

import time
from pathlib import Path

import torch

from ..decode import FINISH_REASONS
from ..engine import Engine
from ..prompts import prompt_seed
from . import parquet
from .config import DTYPES, BatchConfig, build_score

OUTPUT_COLUMNS = ("id", "prompt", "rank", "sample", "completion", "tokens", "token_logprobs", "score",
                  "finish_reason")


def load_tokenizer(model):
    if model is None:
        from transformers import PreTrainedTokenizerFast

        from ..models import DEFAULT_MODEL_DIR

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
        from ..models import load_default_model

        self.config, self.device = config, torch.device(device)
        dtype = DTYPES[config.dtype]
        if config.model is None:
            self.model, self.tokenizer = load_default_model(device=self.device, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(self.device).eval()
            self.tokenizer = load_tokenizer(config.model)
        self.score = build_score(config.score, self.tokenizer, self.device, dtype)

        # One engine for the worker: every group it is handed streams through it, rows joining as others finish.
        self.engine = Engine(self.model, self.tokenizer, background=False)
        returned = config.n if config.return_all else config.k
        self.sampling = config.sampling(self.score).replace(k=returned)

    def submit(self, ids: list, prompts: list) -> "Group":
        """Queue a group's prompts (text or messages) with ``ids`` on the engine."""
        texts, requests = [], []
        for prompt_id, prompt in zip(ids, prompts, strict=True):
            text, special = render(self.tokenizer, prompt)
            texts.append(text)
            input_ids = self.tokenizer(text, add_special_tokens=special).input_ids
            requests.append(self.engine.submit(input_ids, self.sampling.replace(
                seed=prompt_seed(self.config.seed, prompt_id))))
        return Group(ids, texts, requests)

    def rows(self, group: "Group") -> tuple:
        """(pyarrow table of the group's rows, generated tokens), once its requests are done."""
        pyarrow = parquet.pyarrow_modules()[0]
        tokenizer, returned = self.tokenizer, self.sampling.k
        columns = {name: [] for name in OUTPUT_COLUMNS}
        tokens_generated = 0
        for prompt_id, text, request in zip(group.ids, group.texts, group.requests, strict=True):
            result = request.result()
            tokens_generated += int(result.stats["tokens_generated"])
            lengths, sequences = result.lengths[0].tolist(), result.sequences[0].cpu()
            logprobs, scores = result.token_logprobs[0].cpu(), result.scores[0].cpu().tolist()
            samples, reasons = result.indices[0].tolist(), result.finish_reasons[0].tolist()
            for rank in range(returned):
                tokens = sequences[rank, :lengths[rank]]
                row = dict(id=prompt_id, prompt=text, rank=rank, sample=samples[rank],
                           completion=tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens.tolist(),
                           token_logprobs=logprobs[rank, :lengths[rank]].tolist(), score=scores[rank],
                           finish_reason=FINISH_REASONS[reasons[rank]])
                for name, value in row.items():
                    columns[name].append(value)
        schema = output_schema(pyarrow.string() if isinstance(group.ids[0], str) else pyarrow.int64())
        return pyarrow.table(columns, schema=schema), tokens_generated


class Group:
    """A group's prompts on the engine: their ids, rendered texts and requests."""

    def __init__(self, ids: list, texts: list, requests: list):
        self.ids, self.texts, self.requests = ids, texts, requests
        self.cpu_start = time.process_time()

    def done(self) -> bool:
        return all(request.done() for request in self.requests)


def write_group(generator: PromptGenerator, output, group: Group, jsonl: bool) -> dict:
    """A finished group's part, written whole; the counts the progress meter adds up (CPU seconds are this
    process's, all its threads, since the group was submitted: a shared machine's other load does not inflate
    them)."""
    rows, tokens = generator.rows(group)
    parquet.write_part(output, parquet.part_key(group.ids), rows, jsonl)
    return dict(prompts=len(group.ids), tokens=tokens, cpu_seconds=time.process_time() - group.cpu_start)


def run_group(generator: PromptGenerator, output, ids: list, prompts: list, jsonl: bool) -> dict:
    """One group alone (a Ray call): run to completion on the worker's engine, its part written."""
    group = generator.submit(ids, prompts)
    generator.engine.run_until(group.done)
    return write_group(generator, output, group, jsonl)


def output_schema(id_type):
    pyarrow = parquet.pyarrow_modules()[0]
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


class Job:
    """A checked input against its output folder: the groups still to run (the output folder is created, with
    its manifest, only once everything checked out) and the progress meter."""

    def __init__(self, config: BatchConfig, table, output, batch_prompts: int, progress: bool):
        tokenizer = load_tokenizer(config.model)
        self.table, self.ids = table, table["id"].to_pylist()
        self.prompt_column = "prompt" if "prompt" in table.column_names else "messages"
        texts = prompt_texts(table, tokenizer)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=self.prompt_column == "prompt").input_ids]
        manifest = config.manifest()
        parquet.check_manifest(output, manifest)
        done = parquet.finished_prompts(output) if Path(output).is_dir() else {}
        self.groups = plan_groups(self.ids, texts, lengths, batch_prompts, done)
        parquet.prepare_output(output, manifest)
        skipped = sum(1 for prompt_id in self.ids if prompt_id in done)
        self.meter = Progress(sum(len(group) for group in self.groups), skipped, config.n, progress)
