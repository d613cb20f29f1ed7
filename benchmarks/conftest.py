"""Shared benchmark plumbing: quick mode, backends to time, achieved GB/s from explicit byte counts, and a summary
table (median time, GB/s, speed-up over the baseline of the same case) printed at the end and written as CSV.

Run:   pytest benchmarks/bench_sample.py            (full shapes)
       pytest benchmarks --quick                    (or FASTBON_BENCH_QUICK=1: small shapes, few rounds; CI smoke)
"""

import csv
import os
import time
from pathlib import Path

import pytest
import torch

from fastbon import dispatch

RESULTS = []  # one dict per timed (op, case, backend)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small shapes and few rounds (CI smoke test)")


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py even though pyproject's python_files only names test_*.py."""
    explicit = parent.session.isinitpath(file_path)  # given on the command line: pytest collects it already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not explicit:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def quick(request):
    return _quick(request.config)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def timed_backends(device):
    """fastbon backends worth timing on ``device`` (Triton on CPU runs only in its interpreter: not timed)."""
    names = [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, torch.device(device)) is None]
    return [b for b in names if not (b == "triton" and device == "cpu")]


def _quick(config):
    return config.getoption("--quick") or os.environ.get("FASTBON_BENCH_QUICK") == "1"


def pytest_generate_tests(metafunc):
    """Benchmarks take (device, backend): the baseline and every timed backend per device; and ``case``: the
    module's QUICK or CASES shapes by mode."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("device,backend", [
            pytest.param(device, backend, id=f"{backend}-{device}") for device in devices()
            for backend in ["baseline", *timed_backends(device)]])
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(metafunc.module.QUICK if _quick(metafunc.config) else metafunc.module.CASES))


@pytest.fixture
def measure(benchmark, quick):
    """measure(op, case, backend, fn, bytes_moved): time fn with pytest-benchmark, record GB/s."""

    def run(op, case, backend, fn, bytes_moved, device="cpu"):
        def call():
            result = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return result

        call()  # warm-up outside the timing (first-call allocation, dispatch caches)
        rounds = 3 if quick else 15
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
        gbps = bytes_moved / seconds / 1e9
        benchmark.extra_info.update(bytes=bytes_moved, gbps=round(gbps, 2))
        RESULTS.append(dict(op=op, case=case, backend=backend, device=device, median_ms=seconds * 1e3,
                            min_ms=benchmark.stats.stats.min * 1e3, gbps=gbps, threads=torch.get_num_threads()))
        return seconds

    return run


def copy_bandwidth_gbps(megabytes=256):
    """Measured memory copy bandwidth of this machine (read + write bytes), the ceiling GB/s compare against."""
    source = torch.empty(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / min(times) / 1e9


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"fastbon benchmarks ({torch.get_num_threads()} threads; CPU copy bandwidth "
          f"{copy_bandwidth_gbps():.1f} GB/s)")
    write(f"{'op':<26}{'case':<34}{'backend':<10}{'device':<7}{'median ms':>11}{'min ms':>10}{'GB/s':>9}"
          f"{'x baseline':>12}")
    baselines = {(r["op"], r["case"], r["device"]): r["median_ms"] for r in RESULTS if r["backend"] == "baseline"}
    for result in RESULTS:
        base = baselines.get((result["op"], result["case"], result["device"]))
        result["speedup"] = base / result["median_ms"] if base else float("nan")
        write(f"{result['op']:<26}{result['case']:<34}{result['backend']:<10}{result['device']:<7}"
              f"{result['median_ms']:>11.3f}{result['min_ms']:>10.3f}{result['gbps']:>9.2f}{result['speedup']:>12.2f}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    for op in sorted({r["op"] for r in RESULTS}):
        rows = [r for r in RESULTS if r["op"] == op]
        with open(out / f"{op}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        _plot_speedups(op, rows, out / f"{op}.png")
    write(f"CSV and PNG in {out}")


def _plot_speedups(op, rows, path):
    """A bar per (case, backend): speed-up over the case's baseline (log scale), the number a reader compares."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    bars = [r for r in rows if r["backend"] != "baseline" and r["speedup"] == r["speedup"]]
    if not bars:
        return
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
    labels = [f"{r['case']} · {r['backend']}-{r['device']}" for r in bars]
    axis.barh(labels, [r["speedup"] for r in bars], color="tab:blue")
    axis.axvline(1.0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("speed-up over the baseline (x)")
    axis.set_title(f"fastbon {op}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
