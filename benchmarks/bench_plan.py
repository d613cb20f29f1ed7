"""Plan once, run per layer: the decode attention's cost per layer call with the batch planned per call (what the op
does when called alone, and what every layer did before the plan/run split) against a plan made once per batch.

    python benchmarks/bench_plan.py               # P=2048, n=32, the benchmark Llama's attention shape, fp32
    pytest benchmarks/bench_plan.py               # a seconds-long smoke run (CI)

Both sides run the same kernels on the same inputs, back to back, warmed; what differs is the planning (sorting the
rows by segment, building the work items) and the allocation of the workspace and output, per call or once.
"""

import argparse
import sys
import time

import torch

from fastbon import dispatch
from fastbon.ops.tree_attention import TreePlan


def _inputs(prompts, n, prefix, suffix, heads=8, kv_heads=4, head_dim=64, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=generator).to(dtype)

    rows = prompts * n
    return dict(q=rand(rows, heads, head_dim), prefix_k=rand(prompts, kv_heads, prefix, head_dim),
                prefix_v=rand(prompts, kv_heads, prefix, head_dim),
                prefix_lens=torch.full((prompts,), prefix, dtype=torch.int32),
                suffix_k=rand(rows, kv_heads, suffix, head_dim), suffix_v=rand(rows, kv_heads, suffix, head_dim),
                suffix_lens=torch.full((rows,), suffix, dtype=torch.int32),
                sample_to_prompt=torch.arange(prompts).repeat_interleave(n).to(torch.int32))


def _seconds_per_call(function, calls):
    function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def compare(prompts=1, n=32, prefix=2048, suffix=64, calls=200, backend="cpu"):
    inputs = _inputs(prompts, n, prefix, suffix)
    q = inputs["q"]
    scale = q.shape[-1] ** -0.5
    plan = TreePlan([inputs["prefix_lens"]], inputs["sample_to_prompt"][None], suffix, q.shape[1],
                    inputs["prefix_k"].shape[1], q.shape[2], q.dtype, q.device, backend)
    two_level = dispatch.implementation("shared_prefix_attention", backend)  # the backend function, unvalidated
    arguments = [inputs[name] for name in ("q", "prefix_k", "prefix_v", "prefix_lens", "suffix_k", "suffix_v",
                                           "suffix_lens", "sample_to_prompt")]

    def per_call():
        return two_level(*arguments, scale)

    def planned():
        return plan.run(q, [inputs["prefix_k"]], [inputs["prefix_v"]], inputs["suffix_k"], inputs["suffix_v"],
                        inputs["suffix_lens"], scale)

    torch.testing.assert_close(per_call(), planned(), rtol=0, atol=0)
    rows = {}
    for _ in range(2):  # alternate, so drift on a shared machine hits both sides
        for name, function in (("planned per call", per_call), ("planned once", planned)):
            rows.setdefault(name, []).append(_seconds_per_call(function, calls))
    best = {name: min(times) for name, times in rows.items()}
    for name, seconds in best.items():
        print(f"{name}: {1e6 * seconds:.1f} us per layer call (P={prefix}, n={n}, suffix {suffix}, {backend})")
    print(f"planned once is {best['planned per call'] / best['planned once']:.2f}x the per-call speed")
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--P", type=int, default=2048)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--suffix", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    compare(n=args.n, prefix=args.P, suffix=args.suffix, calls=args.calls)
    return 0


def test_plan_smoke():
    import pytest

    pytest.importorskip("fastbon._C")
    compare(n=4, prefix=64, suffix=4, calls=3)


if __name__ == "__main__":
    sys.exit(main())
