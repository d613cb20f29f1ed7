"""Early pruning vs plain best-of-n at equal n: tokens generated, wall time, and the best score kept.

    python benchmarks/bench_pruning.py [--P 512] [--n 32] [--new-tokens 64] [--every 16] [--keep 0.5]
    pytest benchmarks/bench_pruning.py        # a seconds-long smoke run (CI)

Both runs draw the same samples (per-sample Philox seeds), so a pruned run's survivors are exactly the plain
run's samples: the comparison isolates what pruning saves and what best score it gives up.
"""

import argparse
import sys
import time

import torch

import fastbon
from fastbon.demos.bench import llama_model

CPU_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=500, intermediate=128)


def compare(model, prompt_len, n, new_tokens, every, keep, seed=0) -> dict:
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    runs = {}
    for name, prune in (("plain", None), ("pruned", fastbon.Pruning(every=every, keep=keep))):
        start = time.perf_counter()
        result = fastbon.generate(model, prompt, n=n, max_new_tokens=new_tokens, top_p=0.95, seed=seed, prune=prune)
        runs[name] = dict(seconds=time.perf_counter() - start, tokens=result.stats["tokens_generated"],
                          best_score=result.scores[0, 0].item())
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--P", type=int, default=512)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke run)")
    args = parser.parse_args(argv)
    model = llama_model(**(TINY_SHAPE if args.tiny else CPU_SHAPE))
    runs = compare(model, args.P, args.n, args.new_tokens, args.every, args.keep)
    plain, pruned = runs["plain"], runs["pruned"]
    print(f"P={args.P} n={args.n} new_tokens={args.new_tokens} prune every {args.every} keep {args.keep}")
    for name, run in runs.items():
        print(f"{name:>7}: {run['seconds']:.2f} s, {run['tokens']} tokens generated, best mean log-prob "
              f"{run['best_score']:.4f}")
    print(f"pruning: {plain['seconds'] / pruned['seconds']:.2f}x faster, {pruned['tokens'] / plain['tokens']:.0%} "
          f"of the tokens, best score {pruned['best_score'] - plain['best_score']:+.4f}")
    return 0


def test_pruning_smoke():
    model = llama_model(**TINY_SHAPE)
    runs = compare(model, prompt_len=16, n=8, new_tokens=8, every=2, keep=0.5)
    assert runs["pruned"]["tokens"] < runs["plain"]["tokens"]
    assert runs["pruned"]["best_score"] <= runs["plain"]["best_score"] + 1e-4, "survivors are a subset of the plain run"


if __name__ == "__main__":
    sys.exit(main())
