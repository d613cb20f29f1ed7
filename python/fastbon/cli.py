"""``fastbon run | batch | demo | bench``: best-of-n from the command line.

Nothing here imports torch or transformers before a command runs, so ``fastbon --help`` answers at once
(tests/test_imports.py times it).
"""

import argparse
import sys
import time

DEVICE_HELP = "default: cuda when available, else cpu"


def _sampling_arguments(parser):
    parser.add_argument("-n", type=int, default=16, help="samples per prompt")
    parser.add_argument("-k", type=int, default=1, help="how many of the n to print, best first")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def _load(model_dir, device):
    """(model, tokenizer, description): a local HF folder, or the embedded default model."""
    if model_dir is None:
        from .models import load_default_model

        model, tokenizer = load_default_model(device=device)
        return model, tokenizer, "the embedded default model (fastbon.models, trained by fastbon.demos.train_default)"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), model_dir


def run(args) -> int:
    from . import generate
    from .config import SamplingConfig
    from .demos.common import default_device

    # Every option checked before the model loads (the same messages as every other way in).
    SamplingConfig(n=args.n, k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    args.device = args.device or default_device()
    model, tokenizer, description = _load(args.model, args.device)
    prompt = args.prompt if args.prompt is not None else "123+456="
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    start = time.perf_counter()
    result = generate(model, input_ids, n=args.n, k=args.k, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      seed=args.seed, return_all=True, compile=args.compile)
    elapsed = time.perf_counter() - start
    generated = int(result.all_lengths.sum())
    print(f"model: {description}")
    print(f"prompt: {prompt!r}  (best {args.k} of n={args.n}, score = mean log-probability)")
    for rank in range(args.k):
        length = int(result.lengths[0, rank])
        text = tokenizer.decode(result.sequences[0, rank, :length], skip_special_tokens=True)
        print(f"#{rank + 1}  score {result.scores[0, rank].item():+.4f}  {length} tokens  {text!r}")
    print(f"{generated} tokens in {elapsed:.2f} s = {generated / elapsed:.1f} tokens/s")
    return 0


def _batch_arguments(parser):
    parser.add_argument("input", help="a JSONL or Parquet file: a 'prompt' column (or chat 'messages'), optional 'id'")
    parser.add_argument("-o", "--output", required=True, help="the output folder of Parquet parts (rerun to resume)")
    parser.add_argument("--model", default=None, help="a local Hugging Face model folder (default: embedded)")
    _sampling_arguments(parser)
    parser.add_argument("--all", dest="return_all", action="store_true", help="write all n samples, not the best k")
    parser.add_argument("--score", default="mean_logprob",
                        help="mean_logprob | sum_logprob | a reward-model folder | module:function "
                             "(function(tokenizer) returns a score callable, e.g. fastbon.scoring.verifier(check, "
                             "tokenizer))")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeat for more)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--logprobs", default="raw", help="raw | processed (log-probs after temperature)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on GPUs)")
    parser.add_argument("--batch-prompts", type=int, default=16, help="prompts per fastbon.generate call and part")
    parser.add_argument("--jsonl", action="store_true", help="also write each part as JSONL (OUTPUT/_jsonl)")
    parser.add_argument("--ray", nargs="?", const=True, default=False, metavar="ADDRESS",
                        help="run on Ray Data: the cluster at ADDRESS, or a local one (put it after INPUT)")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (one GPU each on GPU nodes)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="CPU threads per Ray actor on CPU nodes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def batch(args) -> int:
    from .jobs import run as run_batch

    summary = run_batch(args.input, args.output, model=args.model, n=args.n, k=args.k, return_all=args.return_all,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        seed=args.seed, score=args.score, stop=args.stop, logprobs=args.logprobs, dtype=args.dtype,
                        jsonl=args.jsonl, batch_prompts=args.batch_prompts, device=args.device, ray=args.ray,
                        workers=args.workers, threads_per_worker=args.threads_per_worker, progress=not args.quiet)
    print(f"prompts: {summary['prompts']} generated, {summary['skipped']} already in {args.output} (skipped); "
          f"{summary['parts']} parts, {summary['samples']} samples, {summary['tokens']} tokens in "
          f"{summary['seconds']:.1f} s = {summary['prompts_per_s']:.2f} prompts/s, {summary['tokens_per_s']:.1f} "
          "tokens/s")
    return 0


def _demo_or_bench(command: str, argv: list) -> int:
    """Options first (``--help`` and errors answer before torch loads), then the module that runs them."""
    from .demos import options

    if command == "bench":
        bench_args = options.parse_bench(argv)
        from .demos.bench import run as run_bench

        return run_bench(bench_args)
    if "--search" in argv:
        search_args = options.parse_search([arg for arg in argv if arg != "--search"])
        from .demos.demo_search import run as run_search_demo

        return run_search_demo(search_args)
    demo_args = options.parse_demo(argv)
    from .demos.demo import run as run_demo

    return run_demo(demo_args)


def serve(args) -> int:
    from .serve import main as serve_main

    return serve_main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastbon", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="best-of-n on one prompt")
    run_parser.add_argument("--model", default=None, help="a local Hugging Face model folder (default: embedded)")
    run_parser.add_argument("--prompt", default=None)
    _sampling_arguments(run_parser)
    run_parser.add_argument("--compile", action="store_true", help="the decode step under torch.compile")
    run_parser.set_defaults(handler=run)
    batch_parser = commands.add_parser("batch", help="best-of-n over a file of prompts into Parquet, resumable")
    _batch_arguments(batch_parser)
    batch_parser.set_defaults(handler=batch)
    from .serve import add_arguments as serve_arguments  # argparse only: no torch, no FastAPI

    serve_parser = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (needs fastbon[serve])")
    serve_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve)
    # bench and demo parse their own options (fastbon bench --help, fastbon demo --help).
    commands.add_parser("bench", add_help=False, help="best-of-n vs HF generate over a grid, CSV + plot")
    commands.add_parser("demo", add_help=False, help="accuracy vs n on the embedded model, table + plot")
    args, rest = parser.parse_known_args(argv)
    if args.command in ("bench", "demo"):
        return _demo_or_bench(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.handler(args)
    except (ValueError, TypeError) as error:  # a bad option: one line naming it, exit status 2 (argparse's)
        commands.choices[args.command].error(str(error))


if __name__ == "__main__":
    sys.exit(main())
