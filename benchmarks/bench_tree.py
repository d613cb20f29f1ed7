"""The KV tree's common prefix: prompts sharing a long prefix, stored and prefilled once (three levels) against
today's two-level cache (each prompt's whole KV stored per prompt), in one run.

    python benchmarks/bench_tree.py                 # 8 prompts = a 2,048-token prefix + 64 own tokens, n=16, 64 new
    pytest benchmarks/bench_tree.py                 # a seconds-long smoke run (CI)

The model is the 56M benchmark Llama in fp32 (``fastbon.demos.bench.llama_model``). The two-level side is the same code
with the common-prefix detection off (``fastbon.prefill.COMMON_PREFIX_MIN`` past every prompt), so the samples are
the same on both sides. Each side is warmed by one small untimed call; reported: prefix KV bytes, prefill seconds,
end-to-end seconds, and whether the samples are equal.
"""

import argparse
import sys
import time

import torch

import fastbon
from fastbon import prefill as prefill_module
from fastbon.demos.bench import llama_model

FULL_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=500, intermediate=128)


def _prompts(vocab, num_prompts, common, own):
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(1, vocab, (common,), generator=generator)
    return [torch.cat([shared, torch.randint(1, vocab, (own,), generator=generator)]) for _ in range(num_prompts)]


def _timed(model, prompts, n, new_tokens, share):
    saved = prefill_module.COMMON_PREFIX_MIN
    prefill_module.COMMON_PREFIX_MIN = saved if share else 1 << 62
    try:
        fastbon.generate(model, [prompt[:64] for prompt in prompts[:2]], n=2, max_new_tokens=2, seed=1)  # warm-up
        start = time.perf_counter()
        result = fastbon.generate(model, prompts, n=n, k=n, max_new_tokens=new_tokens, seed=0, eos_token_id=[])
        seconds = time.perf_counter() - start
    finally:
        prefill_module.COMMON_PREFIX_MIN = saved
    return result, seconds


def compare(shape, num_prompts=8, common=2048, own=64, n=16, new_tokens=64):
    torch.manual_seed(0)
    model = llama_model(**shape)
    prompts = _prompts(model.config.vocab_size, num_prompts, common, own)
    rows = {}
    for name, share in (("two-level", False), ("three-level", True)):
        result, seconds = _timed(model, prompts, n, new_tokens, share)
        stats = result.stats
        rows[name] = dict(result=result, seconds=seconds, prefill=stats["prefill_seconds"],
                          kv_mb=stats["prefix_kv_bytes"] / 2**20, prefill_tokens=stats["prefill_tokens"])
        print(f"{name}: prefix KV {rows[name]['kv_mb']:.1f} MB, prefill {stats['prefill_tokens']} tokens in "
              f"{rows[name]['prefill']:.2f} s, end to end {seconds:.2f} s", flush=True)
    two, three = rows["two-level"], rows["three-level"]
    same = torch.equal(two["result"].sequences, three["result"].sequences)
    print(f"prefix KV bytes {three['kv_mb'] / two['kv_mb']:.3f}x (target <= 1/6 = 0.167); prefill "
          f"{two['prefill'] / three['prefill']:.2f}x faster (target >= 4); end to end "
          f"{two['seconds'] / three['seconds']:.2f}x faster (target >= 1.5); same samples: {same}")
    return rows, same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--common", type=int, default=2048)
    parser.add_argument("--own", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    compare(FULL_SHAPE, args.prompts, args.common, args.own, args.n, args.new_tokens)
    return 0


def test_tree_smoke():
    rows, same = compare(TINY_SHAPE, num_prompts=3, common=80, own=5, n=2, new_tokens=4)
    assert same and rows["three-level"]["kv_mb"] < rows["two-level"]["kv_mb"]


if __name__ == "__main__":
    sys.exit(main())
