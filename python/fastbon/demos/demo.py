"""``fastbon demo``: spending more samples at run time makes the embedded model better.

On the default model that ships inside fastbon (a tiny Llama trained from scratch by
``fastbon.demos.train_default`` to add numbers), for each n, one ``fastbon.generate`` call draws n samples per
problem; the SAME samples are then ranked by four rules, and each rule's pick is checked exactly:

- first sample: sample 0, what n = 1 would give (the control: it must not improve with n);
- mean log-prob: the sample the model itself finds most probable per token;
- majority vote: the most common answer (self-consistency);
- verifier: the exact checker ``fastbon.models.arithmetic.check`` (= pass@n, the ceiling of best-of-n).

The same prompts at the same n also go through Hugging Face ``generate(num_return_sequences=n)`` so the table
can show fastbon's speedup measured in the same run. Writes demo.csv and demo.png to ``--out``.
"""

import os
import sys
import time

import torch

from .. import generate
from ..models import load_default_model
from ..models.arithmetic import (
    ANSWER_TOKENS,
    DEFAULT_MAX_DIGITS,
    DEFAULT_MIN_DIGITS,
    check,
    extract_answer,
    make_problems,
)
from ..ops.topk import select_topk
from ..scoring import Samples, compute_scores, majority, verifier
from .common import default_device, synchronize, write_csv

RULES = ("first_sample", "mean_logprob", "majority", "verifier")
RULE_LABELS = {"first_sample": "first sample", "mean_logprob": "mean log-prob", "majority": "majority vote",
               "verifier": "verifier (pass@n)"}
CSV_FIELDS = ["n", "problems", *RULES, "generated_tokens", "fastbon_s", "fastbon_tokens_per_s", "hf_s", "speedup"]


def first_sample(samples: Samples) -> torch.Tensor:
    """A score decreasing in the sample index, so sample 0 always wins: n samples, scored as if one was drawn."""
    return -torch.arange(samples.lengths.shape[1], dtype=torch.float32).expand(samples.lengths.shape)


def rule_scores(tokenizer) -> dict:
    """Each rule as a fastbon score (a built-in name or a callable(Samples) -> [B, n]); the pick is the best."""

    def check_all(prompts, texts):
        return [check(prompt, text) for prompt, text in zip(prompts, texts, strict=True)]

    return {"first_sample": first_sample, "mean_logprob": "mean_logprob",
            "majority": majority(extract_answer, tokenizer), "verifier": verifier(check_all, tokenizer)}


def run_fastbon(model, prompt_ids, n, seed):
    """(GenerationResult with all n samples, seconds)."""
    device = model.get_output_embeddings().weight.device
    synchronize(device)
    start = time.perf_counter()
    result = generate(model, prompt_ids, n=n, k=1, max_new_tokens=ANSWER_TOKENS, temperature=1.0, top_k=0,
                      return_all=True, seed=seed)
    synchronize(device)
    return result, time.perf_counter() - start


def run_hf(model, batch, n, seed, pad_token_id) -> float:
    """Seconds HF generate takes for the same prompts, n and token limit (top_k=0: HF would default to 50)."""
    torch.manual_seed(seed)
    synchronize(batch["input_ids"].device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                       temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n, max_new_tokens=ANSWER_TOKENS,
                       pad_token_id=pad_token_id)
    synchronize(batch["input_ids"].device)
    return time.perf_counter() - start


def accuracies(result, prompt_ids, prompt_texts, tokenizer, pad_token_id, rules=None, answer_check=check) -> dict:
    """Accuracy of each rule's pick, all rules (default :func:`rule_scores`) re-scoring the same n samples per
    prompt; ``answer_check(prompt_text, completion_text)`` judges a pick."""
    samples = Samples(prompts=prompt_ids, sequences=result.all_sequences, lengths=result.all_lengths,
                      token_logprobs=result.all_token_logprobs, pad_token_id=pad_token_id)
    texts = samples.texts(tokenizer)
    correct = torch.tensor([[answer_check(prompt, text) for text in row]
                            for prompt, row in zip(prompt_texts, texts, strict=True)])
    scores = {}
    for rule, score in (rules if rules is not None else rule_scores(tokenizer)).items():
        _, picks = select_topk(compute_scores(score, samples).cpu(), 1)  # the selection generate itself uses
        scores[rule] = correct.gather(1, picks).float().mean().item()
    return scores


def run_demo(model, tokenizer, problems, ns, seed, time_hf=True, progress=True) -> list:
    device = model.get_output_embeddings().weight.device
    pad_token_id = tokenizer.pad_token_id
    prompt_texts = [prompt for prompt, _ in problems]
    prompt_ids = [torch.tensor(ids, device=device) for ids in tokenizer(prompt_texts)["input_ids"]]
    # HF needs one padded batch; the tokenizer pads on the left, as decoder-only generation requires.
    batch = tokenizer(prompt_texts, padding=True, return_tensors="pt").to(device)
    # Warm both sides up on a small call so the first row does not pay one-time costs (thread pools, lazy setup).
    run_fastbon(model, prompt_ids[:2], 2, seed)
    if time_hf:
        run_hf(model, {key: value[:2] for key, value in batch.items()}, 2, seed, pad_token_id)
    if progress:
        from tqdm import tqdm

        ns = tqdm(ns, desc="best-of-n demo", unit="n", leave=False)
    rows = []
    for n in ns:
        result, fastbon_s = run_fastbon(model, prompt_ids, n, seed)
        generated = int(result.all_lengths.sum())
        row = dict(n=n, problems=len(problems), **accuracies(result, prompt_ids, prompt_texts, tokenizer,
                                                             pad_token_id),
                   generated_tokens=generated, fastbon_s=fastbon_s, fastbon_tokens_per_s=generated / fastbon_s)
        if time_hf:
            row["hf_s"] = run_hf(model, batch, n, seed, pad_token_id)
            row["speedup"] = row["hf_s"] / fastbon_s
        rows.append(row)
    return rows


def table(rows) -> str:
    header = (f"{'n':>3} {'first':>6} {'mean-lp':>7} {'majority':>8} {'verifier':>8} {'tokens':>7} "
              f"{'fastbon s':>9} {'tok/s':>8} {'HF s':>7} {'speedup':>7}")
    lines = [header]
    for row in rows:
        lines.append(f"{row['n']:>3} {row['first_sample']:>6.3f} {row['mean_logprob']:>7.3f} "
                     f"{row['majority']:>8.3f} {row['verifier']:>8.3f} {row['generated_tokens']:>7} "
                     f"{row['fastbon_s']:>9.3f} {row['fastbon_tokens_per_s']:>8.0f} "
                     f"{row.get('hf_s', float('nan')):>7.3f} {row.get('speedup', float('nan')):>6.2f}x")
    return "\n".join(lines)


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: the demo also runs in CI and over ssh, without a display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    ns = [row["n"] for row in rows]
    for rule in RULES:
        axis.plot(ns, [row[rule] for row in rows], marker="o", label=RULE_LABELS[rule])
    axis.set_xscale("log", base=2)
    axis.set_xticks(ns, [str(n) for n in ns])
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("samples per problem n")
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args) -> int:
    """``fastbon demo`` with the options ``options.parse_demo`` read."""
    args.device = args.device or default_device()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args, args.count, args.ns)
    finally:
        torch.set_num_threads(previous_threads)  # the caller (a test session, say) keeps its own setting


def _demo(args, count, ns) -> int:
    model, tokenizer = load_default_model(device=args.device)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    problems = make_problems(count, args.seed, DEFAULT_MIN_DIGITS, DEFAULT_MAX_DIGITS)
    print(f"model: the embedded default model (fastbon.models.load_default_model): fastbon's own "
          f"{parameters / 1e6:.2f}M-parameter Llama, trained from scratch by fastbon.demos.train_default to add "
          "numbers (no download)")
    print(f"task:  {count} addition problems, operands of {DEFAULT_MIN_DIGITS}-{DEFAULT_MAX_DIGITS} digits "
          f"(seed {args.seed}); "
          f"sampling at temperature 1, top_k=0, up to {ANSWER_TOKENS} new tokens, on {args.device} "
          f"({args.threads} CPU thread{'s' if args.threads > 1 else ''})")
    print("       one fastbon.generate call per n; every rule re-ranks the SAME samples; accuracy = exact check")
    started = time.perf_counter()
    # A progress bar only where someone watches: in a log its carriage returns would run into the table.
    rows = run_demo(model, tokenizer, problems, ns, args.seed, time_hf=not args.no_hf, progress=sys.stderr.isatty())
    print(table(rows))
    print("first = sample 0 only; verifier = pass@n; tok/s = fastbon generated tokens per second; "
          "speedup = HF generate(num_return_sequences=n) time / fastbon time, same prompts, n and token limit")
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "demo.csv"), os.path.join(args.out, "demo.png")
    write_csv(rows, csv_path, CSV_FIELDS)
    plot(rows, png_path, f"fastbon best-of-n on its embedded addition model ({count} problems)")
    print(f"wrote {csv_path} and {png_path} ({time.perf_counter() - started:.1f} s)")
    return 0
