"""skinny_linear: the cpu kernel vs torch's ``F.linear`` (its BLAS) on a decode step's linear layers.
Timed through the contract function (``fastbon._cpp_ops.skinny_linear``), without input validation.

Shapes are the benchmark Llama's (hidden 512, MLP 1376, vocabulary 32000) at the decode widths of the end-to-end
cells (4, 16 and 32 rows). Bytes: the weights read once (the rows and the output are small beside them).

    pytest benchmarks/bench_skinny_linear.py                  # per product, pytest-benchmark
    python benchmarks/bench_skinny_linear.py --rows 4 16 32   # every product of one decode step, summed
"""

import argparse
import sys
import time

import pytest
import torch

# (rows, in_features, out_features)
CASES = {"r4-512x1376": (4, 512, 1376), "r4-1376x512": (4, 1376, 512), "r4-lm_head": (4, 512, 32000),
         "r16-512x1376": (16, 512, 1376), "r16-lm_head": (16, 512, 32000), "r32-512x1376": (32, 512, 1376),
         "r32-lm_head": (32, 512, 32000)}
QUICK = {"r4-97x111": (4, 97, 111)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skinny_linear(measure, case, device, backend, dtype):
    if backend not in ("baseline", "cpu"):
        pytest.skip("skinny_linear runs on torch (the baseline) and cpu")
    rows, in_features, out_features = {**QUICK, **CASES}[case]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    if backend == "baseline":
        def fn():
            return torch.nn.functional.linear(x, weight)
    else:
        from fastbon import _cpp_ops

        def fn():
            return _cpp_ops.skinny_linear(x, weight)

    measure("skinny_linear", f"{case}-{str(dtype).removeprefix('torch.')}", backend, fn,
            weight.numel() * weight.element_size(), device)


# One decode step of the benchmark Llama: per layer q, k, v, o, gate, up, down (8 layers), then the LM head.
LAYER_PRODUCTS = [(512, 512), (512, 256), (512, 256), (512, 512), (512, 1376), (512, 1376), (1376, 512)]
LAYERS, LM_HEAD = 8, (512, 32000)


def _median_seconds(product, x, weight, repeats):
    product(x, weight)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(x, weight)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_products(rows, dtype, repeats=15):
    """Seconds for every linear product of one decode step at ``rows`` rows: (torch's F.linear, fastbon's kernel),
    each product timed back to back on both sides."""
    from fastbon import _cpp_ops

    generator = torch.Generator().manual_seed(0)
    totals = [0.0, 0.0]
    for (in_features, out_features), count in [*((shape, LAYERS) for shape in LAYER_PRODUCTS), (LM_HEAD, 1)]:
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        weight = (0.05 * torch.randn(out_features, in_features, generator=generator)).to(dtype)
        times = max(3, repeats // 5) if out_features == LM_HEAD[1] else repeats
        totals[0] += count * _median_seconds(torch.nn.functional.linear, x, weight, times)
        totals[1] += count * _median_seconds(_cpp_ops.skinny_linear, x, weight, times)
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 32, 128])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    for dtype in args.dtype:
        for rows in args.rows:
            torch_s, fastbon_s = step_products(rows, getattr(torch, dtype))
            print(f"{dtype} {rows:4d} rows: every product of a decode step: torch {1e3 * torch_s:.2f} ms, fastbon "
                  f"{1e3 * fastbon_s:.2f} ms ({torch_s / fastbon_s:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
