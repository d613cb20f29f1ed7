"""``fastbon demo --search``: where checking each step beats checking the end — accuracy vs generated tokens.

On the chain model that ships inside fastbon (a tiny Llama trained by ``fastbon.demos.train_chain`` to add chains
of numbers one line per step, right at most steps but not all), for several budgets n, each method gets n
samples / particles per problem and returns one answer, judged by the answer key (``fastbon.models.chain.check``):

- best-of-n, one ``fastbon.generate`` call per n, its samples re-ranked by four rules: the first sample, mean
  log-prob, majority vote on the final result, and the final verifier (a calculator over every line, no key);
- best-of-n + pruning: ``fastbon.Pruning`` drops the half of the samples with the most wrong lines so far;
- particle filtering (``fastbon.search.particle_filter``) resampling every ``--every`` tokens by the step checker
  (``fastbon.scoring.step_checker``, which judges the lines finished so far), or by the model's mean log-prob so
  far (no checker);
- beam search (``fastbon.search.beam_search``) keeping the beams with the fewest wrong lines.

Search methods pick their final answer with the same final verifier as best-of-n (the checker-free particle filter
with mean log-prob). Compute is ``result.stats["tokens_generated"]``. Writes search.csv and search.png to ``--out``.
"""

import os
import sys
import time

import torch

from .. import generate, search
from ..models import load_chain_model
from ..models.chain import COMPLETION_TOKENS, check, extract_answer, make_problems, steps_correct, verify
from ..scoring import Pruning, majority, mean_logprob_so_far, step_checker, verifier
from .common import default_device, synchronize, write_csv
from .demo import accuracies, first_sample
from .options import DEFAULT_EVERY

# Beam search spends its budget n as n / BEAM_EXPAND beams, each expanded into BEAM_EXPAND candidates per step.
BEAM_EXPAND = 4
BEST_OF_N_RULES = ("first_sample", "mean_logprob", "majority", "verifier")
METHOD_LABELS = {
    "best_of_n/first_sample": "best-of-n, first sample",
    "best_of_n/mean_logprob": "best-of-n, mean log-prob",
    "best_of_n/majority": "best-of-n, majority vote",
    "best_of_n/verifier": "best-of-n, final verifier",
    "best_of_n+pruning": "best-of-n + pruning (step checker)",
    "particle_filter/checker": "particle filter, step checker",
    "particle_filter/mean_logprob": "particle filter, mean log-prob",
    "beam_search/checker": "beam search, step checker",
}
CSV_FIELDS = ["method", "n", "problems", "accuracy", "generated_tokens", "seconds", "us_per_token"]


def final_verifier(tokenizer):
    """Best-of-n's ``score=``: 1 when the calculator finds every line right and the chain complete, else 0."""
    return verifier(lambda prompts, texts: [verify(prompt, text) for prompt, text in zip(prompts, texts, strict=True)],
                    tokenizer)


def timed(device, call, *args, **kwargs):
    """(what ``call(*args, **kwargs)`` returns, its wall seconds), ``device`` synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = call(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - start


def best_accuracy(result, prompt_texts, tokenizer) -> float:
    """Share of problems whose returned (best) sample has the right final sum."""
    texts = [tokenizer.decode(result.sequences[b, 0, :int(result.lengths[b, 0])], skip_special_tokens=True)
             for b in range(len(prompt_texts))]
    return sum(check(prompt, text) for prompt, text in zip(prompt_texts, texts, strict=True)) / len(prompt_texts)


def search_methods(model, tokenizer, n, seed, every=DEFAULT_EVERY) -> dict:
    """Each method that returns one pick per prompt, as a function of the prompt ids: name -> call."""
    checker = step_checker(steps_correct, tokenizer)
    verified = final_verifier(tokenizer)
    common = dict(max_new_tokens=COMPLETION_TOKENS, temperature=1.0, top_k=0, seed=seed)
    methods = {"best_of_n+pruning": lambda ids: generate(model, ids, n=n, score=verified, **common,
                                                         prune=Pruning(every=16, keep=0.5, score=checker))}
    methods["particle_filter/checker"] = lambda ids: search.particle_filter(
        model, ids, n, step_score=checker, every=every, score=verified, **common)
    methods["particle_filter/mean_logprob"] = lambda ids: search.particle_filter(
        model, ids, n, step_score=mean_logprob_so_far, every=every, score="mean_logprob", **common)
    methods["beam_search/checker"] = lambda ids: search.beam_search(
        model, ids, max(1, n // BEAM_EXPAND), min(n, BEAM_EXPAND), step_score=checker, every=every,
        score=verified, **common)
    return methods


def run_demo(model, tokenizer, problems, ns, seed, every=DEFAULT_EVERY, progress=False) -> list:
    device = model.get_output_embeddings().weight.device
    prompt_texts = [prompt for prompt, _ in problems]
    prompt_ids = [torch.tensor(ids, device=device) for ids in tokenizer(prompt_texts)["input_ids"]]
    rules = {"first_sample": first_sample, "mean_logprob": "mean_logprob",
             "majority": majority(extract_answer, tokenizer), "verifier": final_verifier(tokenizer)}
    # Warm every method up on a small call so the first row does not pay one-time costs (thread pools, lazy setup).
    for call in search_methods(model, tokenizer, 2, seed, every).values():
        call(prompt_ids[:2])
    rows = []
    for n in ns:
        result, seconds = timed(device, generate, model, prompt_ids, n=n, max_new_tokens=COMPLETION_TOKENS,
                                temperature=1.0, top_k=0, seed=seed, return_all=True)
        tokens = int(result.stats["tokens_generated"])
        picked = accuracies(result, prompt_ids, prompt_texts, tokenizer, tokenizer.pad_token_id, rules, check)
        # One call, re-ranked four ways: every best-of-n row shares its tokens and its time.
        rows += [row(f"best_of_n/{rule}", n, problems, picked[rule], tokens, seconds) for rule in BEST_OF_N_RULES]
        for method, call in search_methods(model, tokenizer, n, seed, every).items():
            result, seconds = timed(device, call, prompt_ids)
            rows.append(row(method, n, problems, best_accuracy(result, prompt_texts, tokenizer),
                            int(result.stats["tokens_generated"]), seconds))
        if progress:
            print(f"  n={n} done", file=sys.stderr, flush=True)
    return rows


def row(method, n, problems, accuracy, tokens, seconds) -> dict:
    return dict(method=method, n=n, problems=len(problems), accuracy=accuracy, generated_tokens=tokens,
                seconds=seconds, us_per_token=1e6 * seconds / max(tokens, 1))


def table(rows) -> str:
    lines = [f"{'method':<36} {'n':>3} {'accuracy':>8} {'tokens':>8} {'seconds':>8} {'us/token':>8}"]
    order = list(METHOD_LABELS)
    # Grouped by budget, so methods at (about) equal generated tokens sit together.
    for r in sorted(rows, key=lambda r: (r["n"], order.index(r["method"]))):
        lines.append(f"{METHOD_LABELS[r['method']]:<36} {r['n']:>3} {r['accuracy']:>8.3f} {r['generated_tokens']:>8} "
                     f"{r['seconds']:>8.2f} {r['us_per_token']:>8.1f}")
    return "\n".join(lines)


def comparison(rows) -> str:
    """Particle filtering with the checker vs best-of-n with the final verifier, n by n: accuracy and cost."""
    by_key = {(r["method"], r["n"]): r for r in rows}
    lines = []
    for n in sorted({r["n"] for r in rows}):
        filtered, best = by_key[("particle_filter/checker", n)], by_key[("best_of_n/verifier", n)]
        lines.append(f"n={n}: particle filter (checker) {filtered['accuracy']:.3f} vs best-of-n (final verifier) "
                     f"{best['accuracy']:.3f}: {100 * (filtered['accuracy'] - best['accuracy']):+.1f} points; "
                     f"tokens {filtered['generated_tokens'] / best['generated_tokens']:.2f}x, "
                     f"wall per token {filtered['us_per_token'] / best['us_per_token']:.2f}x")
    return "\n".join(lines)


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: the demo also runs in CI and over ssh, without a display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.2, 4.6))
    for method, label in METHOD_LABELS.items():
        points = sorted((r["generated_tokens"], r["accuracy"]) for r in rows if r["method"] == method)
        if points:
            style = "-" if method.startswith(("particle", "beam")) else "--"
            axis.plot(*zip(*points, strict=True), marker="o", linestyle=style, label=label)
    axis.set_xscale("log", base=2)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("generated tokens (all problems)")
    axis.set_ylabel("accuracy (answer key)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args) -> int:
    """``fastbon demo --search`` with the options ``options.parse_search`` read."""
    args.device = args.device or default_device()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args, args.count, args.ns)
    finally:
        torch.set_num_threads(previous_threads)  # the caller (a test session, say) keeps its own setting


def _demo(args, count, ns) -> int:
    model, tokenizer = load_chain_model(device=args.device)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    try:
        problems = make_problems(count, args.seed, *args.operands, *args.digits)
    except ValueError as error:
        raise SystemExit(f"fastbon demo --search: --operands / --digits: {error}") from None
    print(f"model: the embedded chain model (fastbon.models.load_chain_model): fastbon's own "
          f"{parameters / 1e6:.2f}M-parameter Llama, trained from scratch by fastbon.demos.train_chain to add "
          "chains of numbers one step per line (no download)")
    print(f"task:  {count} chain problems of {args.operands[0]}-{args.operands[1]} operands with "
          f"{args.digits[0]}-{args.digits[1]} digits (seed {args.seed}); temperature 1, top_k=0, "
          f"up to {COMPLETION_TOKENS} new tokens, on {args.device} "
          f"({args.threads} CPU thread{'s' if args.threads > 1 else ''}); "
          f"search checkpoints every {args.every} tokens; accuracy = final sum right (answer key)")
    started = time.perf_counter()
    rows = run_demo(model, tokenizer, problems, ns, args.seed, args.every, progress=sys.stderr.isatty())
    print(table(rows))
    print(comparison(rows))
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "search.csv"), os.path.join(args.out, "search.png")
    write_csv(rows, csv_path, CSV_FIELDS)
    plot(rows, png_path, f"fastbon search vs best-of-n on its embedded chain model ({count} problems)")
    print(f"wrote {csv_path} and {png_path} ({time.perf_counter() - started:.1f} s)")
    return 0
