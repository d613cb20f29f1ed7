"""Padding-free prefill: prompts of unequal length bucketed by length vs one left-padded batch, same run.

    python benchmarks/bench_prefill.py [--lengths 2048 64 64 64] [--n 8] [--new-tokens 64]
    pytest benchmarks/bench_prefill.py       # a seconds-long smoke run (CI)

The padded path is fastbon's own prefill with bucketing turned off (every prompt in one bucket:
``fastbon.prefill.PADDING_SLACK = inf``), so the two rows differ only in what the prefill forwards. Each side is
warmed by one untimed call of the same shapes. Reports prefill tokens (the tokens through the embedding layer)
and end-to-end time.
"""

import argparse
import math
import sys
import time

import torch

import fastbon
from fastbon import prefill
from fastbon.demos.bench import llama_model

CPU_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=500, intermediate=128)


def compare(model, lengths, n, new_tokens, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, model.config.vocab_size, (length,), generator=generator) for length in lengths]
    runs = {}
    for name, slack in (("padded", math.inf), ("padding-free", prefill.PADDING_SLACK)):
        default, prefill.PADDING_SLACK = prefill.PADDING_SLACK, slack
        try:
            fastbon.generate(model, prompts, n=n, max_new_tokens=new_tokens, top_p=0.95, seed=seed)  # warm-up
            start = time.perf_counter()
            result = fastbon.generate(model, prompts, n=n, max_new_tokens=new_tokens, top_p=0.95, seed=seed)
            runs[name] = dict(seconds=time.perf_counter() - start, prefill_tokens=result.stats["prefill_tokens"],
                              sequences=result.sequences)
        finally:
            prefill.PADDING_SLACK = default
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 64, 64, 64])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    runs = compare(llama_model(**CPU_SHAPE), args.lengths, args.n, args.new_tokens)
    total = sum(args.lengths)
    print(f"prompt lengths {args.lengths} (sum {total}), n={args.n}, {args.new_tokens} new tokens")
    for name, run in runs.items():
        print(f"{name:>12}: {run['seconds']:.2f} s, {run['prefill_tokens']} prefill tokens "
              f"({run['prefill_tokens'] / total:.2f}x the sum of lengths)")
    padded, free = runs["padded"], runs["padding-free"]
    print(f"padding-free is {padded['seconds'] / free['seconds']:.2f}x faster end to end; same samples: "
          f"{torch.equal(padded['sequences'], free['sequences'])}")
    return 0


def test_prefill_smoke():
    runs = compare(llama_model(**TINY_SHAPE), [64, 8, 8, 8], n=2, new_tokens=4)
    assert runs["padding-free"]["prefill_tokens"] == 88 < runs["padded"]["prefill_tokens"] == 256


if __name__ == "__main__":
    sys.exit(main())
