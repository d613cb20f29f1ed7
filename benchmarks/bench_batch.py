"""``fastbon batch``: Ray Data scaling (2 workers x 1 thread vs 1 worker x 1 thread, the same job) and the local
path's overhead over the ``fastbon.generate`` calls it makes (the same groups, seeds and threads).

    python benchmarks/bench_batch.py [--prompts 192] [--n 8] [--new-tokens 8] [--batch-prompts 8] [--skip-ray]
    pytest benchmarks/bench_batch.py          # a seconds-long smoke run of the overhead comparison (CI)

Prompts/s counts the whole ``fastbon.batch.run`` call (reading, planning, actor start-up with its model load,
writing parts); "steady" counts the parts written after each worker's first one, between the first and the last
part's write, which leaves the fixed start-up out. Writes benchmarks/out/batch.csv.
"""

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastbon
from fastbon import batch, batch_io
from fastbon.models import load_default_model
from fastbon.models.arithmetic import make_problems

OUT = Path(__file__).parent / "out"


def write_job(folder: Path, prompts: int) -> Path:
    path = folder / "prompts.jsonl"
    with open(path, "w") as handle:
        for position, (prompt, _) in enumerate(make_problems(prompts, 1)):
            handle.write(json.dumps({"id": position, "prompt": prompt}) + "\n")
    return path


def direct_calls(model, tokenizer, path, job) -> float:
    """Seconds for the ``fastbon.generate`` calls alone, over the groups the batch job makes."""
    table = batch_io.read_input(path)
    ids, texts = table["id"].to_pylist(), table["prompt"].to_pylist()
    encoded = [tokenizer(text).input_ids for text in texts]
    groups = batch.plan_groups(ids, texts, [len(e) for e in encoded], job["batch_prompts"], {})
    start = time.perf_counter()
    for group in groups:
        fastbon.generate(model, [torch.tensor(encoded[p]) for p in group], n=job["n"], k=1,
                         max_new_tokens=job["max_new_tokens"], seed=[batch.prompt_seed(0, ids[p]) for p in group])
    return time.perf_counter() - start


def local_overhead(path, job, repeats: int, folder: Path) -> dict:
    """Direct calls and whole ``batch.run`` calls, alternated; the medians and the overhead."""
    model, tokenizer = load_default_model()
    direct, local = [], []
    for repeat in range(repeats):
        direct.append(direct_calls(model, tokenizer, path, job))
        start = time.perf_counter()
        batch.run(path, folder / f"local{repeat}", progress=False, seed=0, **job)
        local.append(time.perf_counter() - start)
    direct_s, local_s = statistics.median(direct), statistics.median(local)
    return dict(direct_s=direct_s, local_s=local_s, overhead=local_s / direct_s - 1)


def steady_prompts_per_s(folder: Path, workers: int) -> float:
    """Prompts per second between the first and the last part written, leaving each worker's first part out."""
    parts = sorted(batch_io.part_paths(folder), key=lambda part: part.stat().st_mtime)
    times = [part.stat().st_mtime for part in parts]
    later = [batch_io.pyarrow_modules()[3].read_metadata(part).num_rows for part in parts[workers:]]
    return sum(later) / max(times[-1] - times[workers - 1], 1e-9)


def ray_scaling(path, job, folder: Path, prompts: int) -> list:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for workers in (1, 2):
            out = folder / f"ray{workers}"
            start = time.perf_counter()
            summary = batch.run(path, out, ray=True, workers=workers, threads_per_worker=1, progress=False, seed=0,
                                **job)
            wall = time.perf_counter() - start
            rows.append(dict(workers=workers, seconds=wall, prompts_per_s=prompts / wall,
                             steady_prompts_per_s=steady_prompts_per_s(out, workers) / job["k"],
                             tokens=summary["tokens"]))
    finally:
        ray.shutdown()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of the overhead comparison")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    job = dict(n=args.n, k=1, max_new_tokens=args.new_tokens, batch_prompts=args.batch_prompts)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        path = write_job(folder, args.prompts)
        print(f"{args.prompts} prompts, n={args.n}, {args.new_tokens} new tokens, {args.batch_prompts} prompts per "
              f"call, embedded model, {torch.get_num_threads()} threads (local path)")
        overhead = local_overhead(path, job, args.repeats, folder)
        print(f"local path: {overhead['local_s']:.2f} s vs direct fastbon.generate calls {overhead['direct_s']:.2f} s"
              f" (medians of {args.repeats}): overhead {overhead['overhead']:+.1%}")
        results.append(dict(run="local", **overhead))
        if not args.skip_ray:
            scaling = ray_scaling(path, job, folder, args.prompts)
            for row in scaling:
                print(f"ray {row['workers']} worker(s) x 1 thread: {row['seconds']:.1f} s = {row['prompts_per_s']:.2f}"
                      f" prompts/s (steady {row['steady_prompts_per_s']:.2f})")
                results.append(dict(run=f"ray{row['workers']}", **row))
            one, two = scaling
            print(f"2 workers vs 1: {two['prompts_per_s'] / one['prompts_per_s']:.2f}x prompts/s end to end, "
                  f"{two['steady_prompts_per_s'] / one['steady_prompts_per_s']:.2f}x steady")
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
    assert result["direct_s"] > 0 and result["local_s"] > 0
    assert batch_io.read_output(tmp_path / "local0").num_rows == 8


if __name__ == "__main__":
    sys.exit(main())
