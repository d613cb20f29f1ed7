"""A data-set job's groups: the input cut into groups of prompts (one ``fastbon.generate`` call and one output part
each), the generator that turns a group into its rows, and the progress meter. The local and Ray runners share them.

Determinism: prompt ``id`` samples with the seed ``prompt_seed(seed, id)`` (``fastbon.prompts``), and the prompts are
cut into groups from the whole input, sorted by length, before any prompt is skipped. A group is therefore the same
set of prompts whatever the worker count, and a rerun skips whole groups, so each prompt's samples are bit-identical
across workers and resumes (float rounding in a batched matmul depends on what else is in the batch; fixed groups
keep even that the same). Changing ``batch_prompts`` changes the groups: samples stay the same draws, their last
bits may not.
"""

import time
from pathlib import Path

import torch

from .. import FINISH_REASONS, generate
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

    def __call__(self, ids: list, prompts: list) -> tuple:
        """(pyarrow table of the rows, generated tokens) for prompts ``prompts`` (text or messages) with ``ids``."""
        pyarrow = parquet.pyarrow_modules()[0]
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
    parquet.write_part(output, parquet.part_key(ids), rows, jsonl)
    return dict(prompts=len(ids), tokens=tokens, cpu_seconds=time.process_time() - cpu_start)


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
