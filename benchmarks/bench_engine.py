"""Continuous batching against lockstep, in one run, on samples that end at EOS.

    python benchmarks/bench_engine.py                # 64 prompts of 64-1024 tokens, n = 8, EOS at ~1/256 per step
    python benchmarks/bench_engine.py --prompts 16   # a shorter run
    python benchmarks/bench_engine.py --step-costs   # ms per engine step at 1-256 busy rows
    pytest benchmarks/bench_engine.py                # a seconds-long smoke run (CI)

The benchmark Llama (random weights) with a set of EOS ids it draws at about 1/256 per step (max_new_tokens 2048),
so sample lengths are roughly geometric with a long tail. Both sides get the same requests, seeds and settings:
  lockstep   ``fastbon.generate`` over groups of 8 prompts, one call after the other: a call's rows start together,
             finished rows leave, nothing joins, and the call lasts as long as its longest sample;
  engine     one ``fastbon.Engine`` with max_rows = the lockstep call's rows (8 x n; ``--engine-rows`` sets another):
             every request submitted at the start, rows join as others finish, prompts prefilled in chunks between
             decode steps.
Reported: generated tokens/s of each side and their ratio; the decode forwards each side ran (the steps that each
stream every weight once: the part of the win that does not depend on the device); the engine's mean rows active
while requests wait, as a share of max_rows; and a request submitted while the engine decodes: the decode steps
until its first token beyond its own prefill chunks. The samples are checked equal on both sides (the same bits
whatever the load). Writes benchmarks/out/engine.csv and engine.png.
"""

import argparse
import csv
import time
from pathlib import Path

import torch

import fastbon
from fastbon.demos.bench import llama_model
from fastbon.engine import Engine

SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=512, intermediate=128)
OUT = Path(__file__).parent / "out"


def workload(prompts: int, shortest: int, longest: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (prompts,), generator=generator).tolist()
    return [torch.randint(3, 500, (length,), generator=generator) for length in lengths]


def run_lockstep(model, prompts, config, group):
    start = time.perf_counter()
    results, forwards = [], 0
    for first in range(0, len(prompts), group):
        batch = prompts[first:first + group]
        result = fastbon.generate(model, batch, n=config.n, k=config.k, max_new_tokens=config.max_new_tokens,
                                  eos_token_id=list(config.eos_token_id), return_all=True,
                                  seed=[config.seed + first + index for index in range(len(batch))])
        results.extend(result.all_sequences[index] for index in range(len(batch)))
        forwards += result.stats["forwards"]
    return results, time.perf_counter() - start, forwards


def run_engine(model, prompts, config, max_rows):
    """All prompts at once on one engine driven from here, recording rows active while requests wait; then, once
    no request waits and a row is free, one more request submitted mid-decode: the engine steps from its arrival to
    its first token, and its own prefill chunks (each step runs one chunk beside the decode forward)."""
    engine = Engine(model, max_rows=max_rows, background=False)
    start = time.perf_counter()
    requests = [engine.submit(prompt, config.replace(seed=config.seed + index)) for index, prompt in enumerate(prompts)]
    occupancy, steps = [], 0
    late, arrived, first_token = None, None, None
    while not all(request.done() for request in requests) or (late is not None and first_token is None):
        engine.step()
        steps += 1
        stats = engine.stats
        if stats["requests_waiting"] and stats["rows_active"]:
            occupancy.append(stats["rows_active"] / max_rows)
        if late is not None and first_token is None and late.samples[0].tokens:
            first_token = steps
        if late is None and not stats["requests_waiting"] and 0 < stats["rows_active"] < max_rows:
            late = engine.submit(prompts[-1], config.replace(seed=10**6, n=1, k=1))  # arrives while rows decode
            arrived = steps
    seconds = time.perf_counter() - start
    late.cancel()
    engine.step()
    results = [request.result().all_sequences[0] for request in requests]
    chunks = -(-prompts[-1].numel() // engine.prefill_chunk)
    return results, seconds, sum(occupancy) / max(1, len(occupancy)), first_token - arrived, chunks, \
        engine.stats["decode_steps"]


def generated_tokens(results, pad) -> int:
    return sum(int((sequences != pad).sum()) for sequences in results)


def bench(prompts_count, shortest, longest, n, max_new_tokens, shape, eos_rate, group=8, engine_rows=None,
          device="cpu"):
    model = llama_model(**shape, device=device)
    pad = model.generation_config.pad_token_id or 0
    eos = list(range(1, 1 + max(1, round(eos_rate * model.config.vocab_size))))
    prompts = workload(prompts_count, shortest, longest)
    config = fastbon.SamplingConfig(n=n, k=1, max_new_tokens=max_new_tokens, eos_token_id=eos, seed=0,
                                    return_all=True)
    with torch.no_grad():
        fastbon.generate(model, prompts[:1], n=2, max_new_tokens=4, eos_token_id=eos)  # warm-up
        engine_results, engine_s, occupancy, late_steps, chunks, engine_forwards = run_engine(
            model, prompts, config, engine_rows or group * n)
        lockstep_results, lockstep_s, lockstep_forwards = run_lockstep(model, prompts, config, group)
    def equal(a, b):
        width = min(a.shape[1], b.shape[1])  # each side pads to its own longest sample
        return torch.equal(a[:, :width], b[:, :width]) and not (a[:, width:] != pad).any() \
            and not (b[:, width:] != pad).any()

    differing = [index for index, (a, b) in enumerate(zip(engine_results, lockstep_results, strict=True))
                 if not equal(a, b)]
    same = not differing
    tokens = generated_tokens(engine_results, pad)
    row = dict(prompts=prompts_count, n=n, max_new_tokens=max_new_tokens, engine_max_rows=engine_rows or group * n,
               lockstep_rows=group * n, generated_tokens=tokens,
               lockstep_s=round(lockstep_s, 2), engine_s=round(engine_s, 2),
               lockstep_tokens_per_s=round(tokens / lockstep_s, 1), engine_tokens_per_s=round(tokens / engine_s, 1),
               speedup=round(lockstep_s / engine_s, 2), rows_active_share=round(occupancy, 3),
               lockstep_forwards=lockstep_forwards, engine_forwards=engine_forwards,
               forwards_ratio=round(lockstep_forwards / engine_forwards, 2),
               late_steps_to_first_token=late_steps, late_prefill_chunks=chunks, same_samples=same,
               differing_prompts=differing,
               longest_sample=max(int((s != pad).sum(-1).max()) for s in engine_results))
    return row


def step_costs(rows_list=(1, 4, 8, 16, 32, 64, 128, 256), prompt_len=544, shape=SHAPE, steps=20) -> dict:
    """Milliseconds per decode step of an engine whose rows are all busy (requests of n = 8 on random prompts of
    ``prompt_len`` tokens, no EOS), for each row count: what a step costs as it fills."""
    model = llama_model(**shape)
    generator = torch.Generator().manual_seed(0)
    costs = {}
    with torch.no_grad():
        for rows in rows_list:
            engine = Engine(model, max_rows=rows, background=False, prefix_cache=False)
            n = min(8, rows)
            config = fastbon.SamplingConfig(n=n, k=1, max_new_tokens=steps + 64, eos_token_id=[], seed=0)
            for index in range(max(1, rows // n)):
                engine.submit(torch.randint(3, 500, (prompt_len,), generator=generator), config.replace(seed=index))
            while engine.stats["rows_active"] < rows or engine.stats["requests_waiting"]:
                engine.step()
            for _ in range(3):
                engine.step()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            costs[rows] = 1000 * (time.perf_counter() - start) / steps
            engine.close()
    return costs


def write(row: dict) -> None:
    OUT.mkdir(exist_ok=True)
    with open(OUT / "engine.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.bar(["lockstep", "engine"], [row["lockstep_tokens_per_s"], row["engine_tokens_per_s"]])
    axis.set_ylabel("generated tokens / s")
    axis.set_title(f"{row['prompts']} prompts x n={row['n']}, EOS ~1/256 per step: {row['speedup']}x")
    figure.tight_layout()
    figure.savefig(OUT / "engine.png", dpi=120)


def test_step_costs_smoke():
    """CI: the step-cost sweep runs (not timed)."""
    costs = step_costs((1, 4), prompt_len=40, shape=TINY, steps=2)
    assert set(costs) == {1, 4} and all(value > 0 for value in costs.values())


def test_engine_smoke():
    """CI: the whole path on a tiny model (not timed)."""
    row = bench(6, 8, 300, 3, 40, TINY, 1 / 16, group=2)
    assert row["same_samples"], "a request's samples equal its lockstep samples"
    # Counted in engine steps, not seconds: a request arriving mid-decode draws its first token in the step that
    # runs its last prefill chunk (each step runs one chunk beside the decode forward), 2 more at most.
    assert row["late_steps_to_first_token"] <= row["late_prefill_chunks"] + 2
    assert row["generated_tokens"] > 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--eos-rate", type=float, default=1 / 256)
    parser.add_argument("--engine-rows", type=int, default=None,
                        help="the engine's max_rows (default: the lockstep call's rows, 8 x n)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda: benchmarks/gpu_check.sh)")
    parser.add_argument("--step-costs", action="store_true",
                        help="instead: milliseconds per engine step at 1-256 busy rows (prompts of 544 tokens)")
    args = parser.parse_args()
    if args.step_costs:
        for rows, milliseconds in step_costs().items():
            print(f"{rows:4d} rows: {milliseconds:7.2f} ms per step, {milliseconds / rows:6.3f} ms per row")
        return
    row = bench(args.prompts, 64, 1024, args.n, args.max_new_tokens, SHAPE, args.eos_rate,
                engine_rows=args.engine_rows, device=args.device)
    write(row)
    for name, value in row.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
