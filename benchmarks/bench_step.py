"""How close a decode step comes to the time its matrix products need at the machine's large-GEMM rate.

    python benchmarks/bench_step.py               # best-of-32 at P=2048 on the benchmark Llama, fp32
    pytest benchmarks/bench_step.py               # a seconds-long smoke run (CI)

The rate is measured here, in the same process: a square fp32 matmul large enough to be compute-bound. The decode
step's matrix products are every linear layer of the model, the LM head included, over the n rows (2 x params x n
FLOPs; attention's own products are not counted, so the ratio charges fastbon's attention to the step); a second
ratio counts attention's q·K and p·V products too (at the middle of the generation's key count). The step
time is a timed ``fastbon.generate`` call's decode (its total minus its prefill) over the forwards it ran, after
an untimed warm-up call; the median of ``--repeats`` timed calls (calls moved by up to 15 % here).
"""

import argparse
import sys
import time

import torch

import fastbon
from fastbon.demos.bench import llama_model

FULL_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=500, intermediate=128)


def gemm_rate(size=2048, repeats=5) -> float:
    """FLOP/s of a size x size x size fp32 matmul (the best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def linear_flops_per_step(model, rows: int) -> int:
    """2 x the weights of every linear layer (LM head included, the embedding table excluded) x rows."""
    weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    return 2 * weights * rows


def attention_flops_per_step(model, prompt_len: int, n: int, new_tokens: int) -> float:
    """2 x 2 x query heads x head_dim x keys x n per layer (q·K and p·V), keys at the middle of the generation."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    keys = prompt_len + new_tokens / 2
    return 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * keys * n


def measure(shape, prompt_len=2048, n=32, new_tokens=64, compile=False, repeats=3):
    torch.manual_seed(0)
    model = llama_model(**shape)
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    settings = dict(n=n, k=1, max_new_tokens=new_tokens, top_p=0.95, seed=0, eos_token_id=[], compile=compile)
    fastbon.generate(model, prompt, **settings)  # warm-up (and, with compile, the compile)
    steps = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fastbon.generate(model, prompt, **settings)
        total = time.perf_counter() - start
        forwards = result.stats["decode_steps"] - 1  # the first token is drawn from the prefill's logits
        steps.append((total - result.stats["prefill_seconds"]) / forwards)
    step = sorted(steps)[len(steps) // 2]
    rate = gemm_rate()
    gemm_step = linear_flops_per_step(model, n) / rate
    with_attention = gemm_step + attention_flops_per_step(model, prompt_len, n, new_tokens) / rate
    print(f"large-GEMM rate {rate / 1e9:.1f} GFLOP/s; decode step {1e3 * step:.1f} ms (P={prompt_len}, n={n}, "
          f"{'compiled' if compile else 'eager'}, median of {repeats}: {1e3 * min(steps):.1f}-{1e3 * max(steps):.1f}); "
          f"its linear layers' products at that rate {1e3 * gemm_step:.1f} ms: "
          f"step / GEMM time = {step / gemm_step:.2f} (target <= 1.5); with attention's products too "
          f"{1e3 * with_attention:.1f} ms: {step / with_attention:.2f}")
    return step, gemm_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--P", type=int, default=2048)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="the decode step under torch.compile")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median step is reported")
    args = parser.parse_args(argv)
    measure(FULL_SHAPE, args.P, args.n, args.new_tokens, args.compile, args.repeats)
    return 0


def test_step_smoke():
    step, gemm_step = measure(TINY_SHAPE, prompt_len=16, n=2, new_tokens=4, repeats=1)
    assert step > 0 and gemm_step > 0


if __name__ == "__main__":
    sys.exit(main())
