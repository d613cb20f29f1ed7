"""``fastbon batch`` on samples that end at EOS: the job streaming every group through one engine against the
lockstep calls it replaced (one ``fastbon.generate`` call per group, one after the other), in one run.

    python benchmarks/bench_batch_eos.py [--prompts 32] [--n 8] [--batch-prompts 8]
    pytest benchmarks/bench_batch_eos.py      # a seconds-long smoke run (CI)

The benchmark Llama (random weights) saved as a model folder whose generation config names EOS ids it draws at
about 1/256 per step (max_new_tokens 2048), with the embedded model's tokenizer; prompts of 64-1024 tokens. The
job runs twice into two folders (the rerun must give the same rows) and the lockstep calls once over the same
groups, seeds and settings. Reported: generated tokens/s of each and their ratio. Writes
benchmarks/out/batch_eos.csv.
"""

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import fastbon
from fastbon import jobs
from fastbon.demos.bench import llama_model
from fastbon.jobs import parquet
from fastbon.jobs.groups import plan_groups
from fastbon.models import DEFAULT_MODEL_DIR
from fastbon.prompts import prompt_seed

SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=512, intermediate=128)
OUT = Path(__file__).parent / "out"
DIGITS = "0123456789+="  # text the embedded tokenizer encodes one token per character


def model_folder(folder: Path, shape: dict, eos_rate: float) -> Path:
    model = llama_model(**shape)
    eos = list(range(16, 16 + max(1, round(eos_rate * model.config.vocab_size))))
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(DEFAULT_MODEL_DIR) / name, folder / name)
    return folder


def write_prompts(path: Path, count: int, shortest: int, longest: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    with open(path, "w") as handle:
        for position in range(count):
            length = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
            text = "".join(DIGITS[int(i)] for i in torch.randint(0, 10, (length,), generator=generator))
            handle.write(json.dumps({"id": position, "prompt": text}) + "\n")
    return path


def lockstep(folder: Path, path: Path, job: dict) -> tuple:
    """(seconds, tokens, rows) of one ``fastbon.generate`` call per group, as the job did before the engine."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    table = parquet.read_input(path)
    ids, texts = table["id"].to_pylist(), table["prompt"].to_pylist()
    encoded = [tokenizer(text).input_ids for text in texts]
    groups = plan_groups(ids, texts, [len(e) for e in encoded], job["batch_prompts"], {})
    start, tokens, rows = time.perf_counter(), 0, {}
    for group in groups:
        result = fastbon.generate(model, [torch.tensor(encoded[p]) for p in group], n=job["n"], k=1,
                                  max_new_tokens=job["max_new_tokens"], seed=[prompt_seed(0, ids[p]) for p in group])
        tokens += int(result.stats["tokens_generated"])
        for row, position in enumerate(group):
            rows[ids[position]] = result.sequences[row, 0, :int(result.lengths[row, 0])].tolist()
    return time.perf_counter() - start, tokens, rows


def job_rows(output: Path) -> dict:
    return {row["id"]: row["tokens"] for row in parquet.read_output(output).to_pylist()}


def bench(prompts: int, n: int, batch_prompts: int, max_new_tokens: int, shape: dict, eos_rate: float,
          shortest: int, longest: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = model_folder(scratch / "model", shape, eos_rate)
        path = write_prompts(scratch / "prompts.jsonl", prompts, shortest, longest)
        job = dict(model=str(folder), n=n, k=1, max_new_tokens=max_new_tokens, seed=0, batch_prompts=batch_prompts)
        start = time.perf_counter()
        summary = jobs.run(path, scratch / "out", progress=False, device="cpu", **job)
        engine_s = time.perf_counter() - start
        jobs.run(path, scratch / "rerun", progress=False, device="cpu", **job)
        lockstep_s, lockstep_tokens, lockstep_rows = lockstep(folder, path, job)
        first, second = job_rows(scratch / "out"), job_rows(scratch / "rerun")
    return dict(prompts=prompts, n=n, batch_prompts=batch_prompts, generated_tokens=summary["tokens"],
                engine_s=round(engine_s, 2), lockstep_s=round(lockstep_s, 2),
                engine_tokens_per_s=round(summary["tokens"] / engine_s, 1),
                lockstep_tokens_per_s=round(lockstep_tokens / lockstep_s, 1),
                speedup=round((summary["tokens"] / engine_s) / (lockstep_tokens / lockstep_s), 2),
                rerun_same_rows=first == second, lockstep_same_rows=first == lockstep_rows)


def test_batch_eos_smoke():
    """CI: the whole comparison on a tiny model (not timed)."""
    row = bench(6, 3, 2, 40, TINY, 1 / 16, 4, 40)
    assert row["rerun_same_rows"] and row["lockstep_same_rows"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    args = parser.parse_args()
    row = bench(args.prompts, args.n, args.batch_prompts, args.max_new_tokens, SHAPE, 1 / 256, 64, 1024)
    OUT.mkdir(exist_ok=True)
    with open(OUT / "batch_eos.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    for name, value in row.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
