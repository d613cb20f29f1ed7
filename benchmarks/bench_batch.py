"""``fastbon batch``: Ray Data scaling (2 workers x 1 thread vs 1 worker x 1 thread, the same job) and the local
path's overhead over the ``fastbon.generate`` calls it makes (the same groups, seeds and threads).

    python benchmarks/bench_batch.py [--prompts 768] [--n 32] [--new-tokens 8] [--batch-prompts 16] [--threads 1]
                                     [--repeats 3] [--skip-ray]
    pytest benchmarks/bench_batch.py          # a seconds-long smoke run of the overhead comparison (CI)

Prompts/s counts the whole ``fastbon.jobs.run`` call (reading, planning, actor start-up with its model load,
writing parts); "steady" counts the second half of the parts, by their write times, which leaves the fixed start-up
out; prompts per worker CPU-second divides by the CPU time the
workers spent on their groups, which a shared machine's other load disturbs least. Writes benchmarks/out/batch.csv.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastbon
from fastbon import jobs
from fastbon.jobs import parquet
from fastbon.jobs.groups import plan_groups
from fastbon.models import load_default_model
from fastbon.models.arithmetic import make_problems
from fastbon.prompts import prompt_seed

OUT = Path(__file__).parent / "out"


def write_job(folder: Path, prompts: int) -> Path:
    path = folder / "prompts.jsonl"
    with open(path, "w") as handle:
        for position, (prompt, _) in enumerate(make_problems(prompts, 1)):
            handle.write(json.dumps({"id": position, "prompt": prompt}) + "\n")
    return path


def direct_calls(model, tokenizer, path, job) -> tuple:
    """(wall, CPU) seconds for the ``fastbon.generate`` calls alone, over the groups the batch job makes."""
    table = parquet.read_input(path)
    ids, texts = table["id"].to_pylist(), table["prompt"].to_pylist()
    encoded = [tokenizer(text).input_ids for text in texts]
    groups = plan_groups(ids, texts, [len(e) for e in encoded], job["batch_prompts"], {})
    start, cpu_start = time.perf_counter(), time.process_time()
    for group in groups:
        fastbon.generate(model, [torch.tensor(encoded[p]) for p in group], n=job["n"], k=1,
                         max_new_tokens=job["max_new_tokens"], seed=[prompt_seed(0, ids[p]) for p in group])
    return time.perf_counter() - start, time.process_time() - cpu_start


def local_overhead(path, job, repeats: int, folder: Path) -> dict:
    """Direct calls and whole ``jobs.run`` calls (model load included), alternated: the medians of wall and of
    CPU time (the process's own, which other load on a shared machine disturbs less) and the overheads."""
    model, tokenizer = load_default_model()
    direct, local = [], []
    for repeat in range(repeats):
        direct.append(direct_calls(model, tokenizer, path, job))
        start, cpu_start = time.perf_counter(), time.process_time()
        jobs.run(path, folder / f"local{repeat}", progress=False, seed=0, **job)
        local.append((time.perf_counter() - start, time.process_time() - cpu_start))
    result = {}
    for index, clock in enumerate(("wall", "cpu")):
        result[f"direct_{clock}_s"] = statistics.median(run[index] for run in direct)
        result[f"local_{clock}_s"] = statistics.median(run[index] for run in local)
        result[f"overhead_{clock}"] = result[f"local_{clock}_s"] / result[f"direct_{clock}_s"] - 1
    return result


def steady_prompts_per_s(folder: Path) -> float:
    """Prompts per second over the second half of the parts, by their write times: every actor is up by then
    (a slow machine can take tens of seconds to start one), so the fixed start-up is left out."""
    parts = sorted(parquet.part_paths(folder), key=lambda part: part.stat().st_mtime)
    half = len(parts) // 2
    rows = sum(parquet.pyarrow_modules()[3].read_metadata(part).num_rows for part in parts[half + 1:])
    return rows / max(parts[-1].stat().st_mtime - parts[half].stat().st_mtime, 1e-9)


def ray_scaling(path, job, folder: Path, prompts: int) -> list:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for workers in (1, 2):
            out = folder / f"ray{workers}"
            start = time.perf_counter()
            summary = jobs.run(path, out, ray=True, workers=workers, threads_per_worker=1, progress=False, seed=0,
                                **job)
            wall = time.perf_counter() - start
            steady = steady_prompts_per_s(out) / job["k"]
            rows.append(dict(workers=workers, seconds=wall, load_average=os.getloadavg()[0],
                             prompts_per_s=prompts / wall, steady_prompts_per_s=steady, tokens=summary["tokens"],
                             prompts_per_worker_cpu_s=prompts / summary["worker_cpu_seconds"]))
    finally:
        ray.shutdown()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=768)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8, help="the model's answers end (EOS) within 5 tokens")
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local-path comparison")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of the overhead comparison")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    job = dict(n=args.n, k=1, max_new_tokens=args.new_tokens, batch_prompts=args.batch_prompts)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        path = write_job(folder, args.prompts)
        print(f"{args.prompts} prompts, n={args.n}, {args.new_tokens} new tokens, {args.batch_prompts} prompts per "
              f"call, embedded model, {torch.get_num_threads()} threads (local path)")
        overhead = local_overhead(path, job, args.repeats, folder)
        for clock in ("wall", "cpu"):
            print(f"local path: {overhead[f'local_{clock}_s']:.2f} s vs direct fastbon.generate calls "
                  f"{overhead[f'direct_{clock}_s']:.2f} s {clock} (medians of {args.repeats}): overhead "
                  f"{overhead[f'overhead_{clock}']:+.1%}")
        results.append(dict(run="local", load_average=os.getloadavg()[0], **overhead))
        if not args.skip_ray:
            scaling = ray_scaling(path, job, folder, args.prompts)
            for row in scaling:
                print(f"ray {row['workers']} worker(s) x 1 thread: {row['seconds']:.1f} s = {row['prompts_per_s']:.2f}"
                      f" prompts/s (steady {row['steady_prompts_per_s']:.2f}), {row['prompts_per_worker_cpu_s']:.2f} "
                      f"prompts per worker CPU-second, load average {row['load_average']:.1f}")
                results.append(dict(run=f"ray{row['workers']}", **row))
            one, two = scaling
            print(f"2 workers vs 1: {two['prompts_per_s'] / one['prompts_per_s']:.2f}x prompts/s end to end, "
                  f"{two['steady_prompts_per_s'] / one['steady_prompts_per_s']:.2f}x steady; per worker CPU-second "
                  f"{two['prompts_per_worker_cpu_s'] / one['prompts_per_worker_cpu_s']:.2f}x (1.00 = no work lost to "
                  "running two: two free cores would give 2x)")
    OUT.mkdir(exist_ok=True)
    with open(OUT / "batch.csv", "w", newline="") as handle:
        fields = sorted({key for row in results for key in row})
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    print(f"CSV: {OUT / 'batch.csv'}")
    return 0


def test_batch_overhead_smoke(tmp_path):
    job = dict(n=2, k=1, max_new_tokens=3, batch_prompts=4)
    result = local_overhead(write_job(tmp_path, 8), job, 1, tmp_path)
    assert result["direct_wall_s"] > 0 and result["local_cpu_s"] > 0
    assert parquet.read_output(tmp_path / "local0").num_rows == 8


if __name__ == "__main__":
    sys.exit(main())
