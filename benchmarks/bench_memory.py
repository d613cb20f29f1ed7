"""Memory that follows the tokens generated, and the memory budget.

    python benchmarks/bench_memory.py follow     # best-of-32, max_new_tokens 100_000 vs 2_000, samples stop at EOS
    python benchmarks/bench_memory.py budget     # best-of-1024 at P=2048 under max_memory=512MiB vs unbounded
    python benchmarks/bench_memory.py engine     # 200 requests x n=8 through one engine under max_memory=256MiB
    pytest benchmarks/bench_memory.py            # a seconds-long smoke run of both (CI)

``follow``: a random-weight Llama whose EOS is a token it draws about once per few hundred steps, so samples end
at EOS after a few hundred tokens; the same call with max_new_tokens 100_000 and 2_000 (same seed: same samples
unless one would pass 2,000). Reports peak RSS growth against the KV bytes of the tokens generated, and time per
generated token. ``budget``: peak RSS growth under max_memory vs without, and whether the results are equal.
Each run is in its own subprocess, so one run's allocator cache does not hide the next one's growth.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastbon
from fastbon.demos.bench import PeakMemory, llama_model

FOLLOW_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, intermediate=1376)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=500, intermediate=128)


def _pick_eos(model, eos_rate):
    """End-of-sequence ids drawn together at about ``eos_rate`` per step, so samples stop after about 1 / eos_rate
    tokens. A random-weight model's next-token distribution is close to uniform (its logits spread by about 0.5), so
    a fixed set of eos_rate x vocab ids is drawn at about that rate wherever the samples wander. Ids picked from a
    trial run's counts are not: the ones seen most were lucky, and their rate later fell (samples then ran ~4x longer
    than asked)."""
    count = max(1, round(eos_rate * model.config.vocab_size))
    return list(range(1, 1 + count))


def _kv_bytes_per_token(model):
    config = model.config
    return 2 * config.num_hidden_layers * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 4


def run_once(kind, shape, max_new_tokens, n, prompt_len, max_memory=None, eos_rate=1 / 300):
    model = llama_model(**shape)
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    if kind == "follow":
        model.generation_config.eos_token_id = _pick_eos(model, eos_rate)
    start = time.perf_counter()
    with PeakMemory("cpu") as peak:
        result = fastbon.generate(model, prompt, n=n, k=n, max_new_tokens=max_new_tokens, top_p=0.95, seed=0,
                                  max_memory=max_memory)
    seconds = time.perf_counter() - start
    generated = int(result.lengths.sum())
    return dict(seconds=seconds, peak_mb=peak.peak_bytes / 2**20, generated=generated,
                longest=int(result.lengths.max()), mean=generated / n,
                generated_kv_mb=generated * _kv_bytes_per_token(model) / 2**20,
                prefix_kv_mb=result.stats["prefix_kv_bytes"] / 2**20,
                # Per token of the output: tokens decoded again after a preemption count as cost, not output.
                ms_per_token=1000 * seconds / max(1, generated), decoded=result.stats["tokens_generated"],
                preempted=result.stats["preempted"],
                sequences=result.sequences[0].tolist())


def run_engine(shape, requests, n, max_new_tokens, max_memory, eos_rate=1 / 256):
    """Many requests (prompts of 64-512 tokens) through one engine under ``max_memory``: the peak RSS growth."""
    from fastbon.engine import Engine
    from fastbon.memory import parse_budget

    model = llama_model(**shape)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, model.config.vocab_size, (int(length),), generator=generator)
               for length in torch.randint(64, 513, (requests,), generator=generator)]
    config = fastbon.SamplingConfig(n=n, max_new_tokens=max_new_tokens, eos_token_id=_pick_eos(model, eos_rate),
                                    seed=0)
    start = time.perf_counter()
    with PeakMemory("cpu") as peak:
        engine = Engine(model, max_memory=max_memory, max_rows=64, background=False)
        handles = [engine.submit(prompt, config.replace(seed=index)) for index, prompt in enumerate(prompts)]
        engine.run_until(lambda: all(handle.done() for handle in handles))
    stats = engine.stats
    model_mb = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / 2**20
    return dict(seconds=time.perf_counter() - start, peak_mb=peak.peak_bytes / 2**20, model_mb=model_mb,
                budget_mb=parse_budget(max_memory) / 2**20, peak_kv_mb=stats["peak_kv_bytes"] / 2**20,
                tokens=stats["tokens_generated"], preempted=stats["preempted"], finished=stats["requests_finished"])


def _in_subprocess(**arguments):
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_memory as b; "
            f"r = b.run_once(**{arguments!r}); print(json.dumps(r))")
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def follow(shape, n=32, prompt_len=64, long=100_000, short=2_000, eos_rate=1 / 300):
    runs = {}
    for tokens in (short, long):
        run = runs[tokens] = _in_subprocess(kind="follow", shape=shape, max_new_tokens=tokens, n=n,
                                            prompt_len=prompt_len, eos_rate=eos_rate)
        print(f"max_new_tokens={tokens}: {run['seconds']:.2f} s, {run['generated']} tokens (mean {run['mean']:.0f}, "
              f"longest {run['longest']}), peak RSS growth {run['peak_mb']:.1f} MB, KV of the generated tokens "
              f"{run['generated_kv_mb']:.1f} MB, {run['ms_per_token']:.3f} ms per generated token "
              f"({run['preempted']} rows preempted)", flush=True)
    big = runs[long]
    print(f"peak RSS growth / (2 x generated KV + 256 MB) = {big['peak_mb'] / (2 * big['generated_kv_mb'] + 256):.2f}"
          f" (target <= 1); time per token {long} / {short}: {big['ms_per_token'] / runs[short]['ms_per_token']:.2f}x "
          "(target <= 1.5)")
    return runs


def budget(shape, n=1024, prompt_len=2048, new_tokens=64, max_memory="512MiB"):
    bounded = _in_subprocess(kind="budget", shape=shape, max_new_tokens=new_tokens, n=n, prompt_len=prompt_len,
                             max_memory=max_memory)
    unbounded = _in_subprocess(kind="budget", shape=shape, max_new_tokens=new_tokens, n=n, prompt_len=prompt_len)
    for name, run in (("max_memory=" + str(max_memory), bounded), ("unbounded", unbounded)):
        print(f"{name}: {run['seconds']:.2f} s ({run['preempted']} rows preempted), "
              f"peak RSS growth {run['peak_mb']:.1f} MB")
    print(f"equal results: {bounded['sequences'] == unbounded['sequences']}")
    return bounded, unbounded


def engine(shape, requests=200, n=8, max_new_tokens=1024, max_memory="256MiB"):
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_memory as b; "
            f"r = b.run_engine({shape!r}, {requests}, {n}, {max_new_tokens}, {max_memory!r}); print(json.dumps(r))")
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    run = json.loads(output.strip().splitlines()[-1])
    print(f"{run['finished']} requests, {run['tokens']} tokens in {run['seconds']:.1f} s under max_memory="
          f"{max_memory}: peak RSS growth {run['peak_mb']:.1f} MB (budget {run['budget_mb']:.0f} MiB; the KV pool "
          f"peaked at {run['peak_kv_mb']:.1f} MiB; {run['preempted']} rows preempted); peak RSS growth / (budget + "
          f"model's {run['model_mb']:.0f} MiB) = {run['peak_mb'] / (run['budget_mb'] + run['model_mb']):.2f} "
          "(target <= 1)")
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["follow", "budget", "engine"])
    parser.add_argument("--eos-rate", type=float, default=1 / 300, help="follow: EOS draws per step (about)")
    parser.add_argument("--requests", type=int, default=200, help="engine: requests of n=8")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="engine")
    args = parser.parse_args(argv)
    if args.what == "follow":
        follow(FOLLOW_SHAPE, eos_rate=args.eos_rate)
    elif args.what == "engine":
        engine(FOLLOW_SHAPE, requests=args.requests, max_new_tokens=args.max_new_tokens)
    else:
        budget(FOLLOW_SHAPE)
    return 0


def test_memory_smoke():
    runs = follow(TINY_SHAPE, n=4, prompt_len=8, long=2_000, short=100, eos_rate=1 / 20)
    assert runs[2_000]["longest"] < 2_000
    bounded, unbounded = budget(TINY_SHAPE, n=8, prompt_len=32, new_tokens=260, max_memory=2**20)
    assert bounded["preempted"] > 0 and bounded["sequences"] == unbounded["sequences"]
    run = engine(TINY_SHAPE, requests=12, n=2, max_new_tokens=64, max_memory=2**24)
    assert run["finished"] == 12 and run["peak_kv_mb"] <= run["budget_mb"]


if __name__ == "__main__":
    sys.exit(main())
