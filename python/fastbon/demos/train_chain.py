"""Train the search-task model shipped in ``fastbon/models/chain_model/``: a tiny Llama that adds chains of numbers.

Run ``python -m fastbon.demos.train_chain [--out DIR] [--steps N] [--seed S]``. Same recipe as
:mod:`fastbon.demos.train_default` (character tokenizer, ``LlamaForCausalLM`` from scratch, loss on the
completion only), on ``<bos>37+48+91=`` + ``37+48=85\\n85+91=176\\n<eos>`` (task in :mod:`fastbon.models.chain`).
It measures, with plain Hugging Face ``generate`` on held-out problems, the per-step accuracy (a step right
given the steps before it right: what checking and forking at each line exploits), end-to-end accuracy and
pass@n, and writes the model, tokenizer and TRAINING.txt to DIR.

Training stops early on purpose (``--stop-at-step-accuracy``): each line is usually right at temperature 1 but
not always, so a 4-step chain is right end to end only sometimes, and search that checks every line can fix
what best-of-n has to get right in one go.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastbon.demos.train_default import TASK_CHARACTERS, build_model, build_tokenizer, cpu_model_name, pass_at
from fastbon.models import CHAIN_MODEL_DIR
from fastbon.models.chain import (
    COMPLETION_TOKENS,
    DEFAULT_MAX_DIGITS,
    DEFAULT_MAX_OPERANDS,
    DEFAULT_MIN_DIGITS,
    DEFAULT_MIN_OPERANDS,
    check,
    make_problem,
    make_problems,
    steps_correct,
)

CHARACTERS = TASK_CHARACTERS + ["\n"]
MAX_POSITIONS = 128
# Held-out problems from their own seed, never trained on; periodic evaluations use the first few of them.
EVAL_SEED, EVAL_PROBLEMS, EVAL_SAMPLES = 12345, 200, 8
PERIODIC_EVAL_PROBLEMS, PERIODIC_EVAL_SAMPLES = 64, 4


def training_batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int, excluded_prompts: set[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + completion + <eos> rows, labels -100 everywhere but on the completion and <eos>."""
    rows, labels = [], []
    while len(rows) < batch_size:
        prompt, completion = make_problem(rng)
        if prompt in excluded_prompts:
            continue
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return input_ids, label_ids


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], samples_per_prompt: int, do_sample: bool) -> list:
    """``samples_per_prompt`` decoded completions per prompt from plain HF ``generate`` (T=1, top_k=0 if sampling).

    Grouped by prompt length so no batch needs padding (the model never saw left padding in training)."""
    completions: list[list[str]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    for indices in by_length.values():
        encoded = tokenizer([prompts[index] for index in indices], return_tensors="pt")
        output = model.generate(**encoded, max_new_tokens=COMPLETION_TOKENS, num_return_sequences=samples_per_prompt,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=False)
        for position, text in enumerate(texts):
            completions[indices[position // samples_per_prompt]].append(text)
    return completions


def step_accuracy(prompts: list[str], completions: list[list[str]]) -> float:
    """Right steps up to the first wrong one / steps tried up to it: P(step right | the steps before it right)."""
    right = tried = 0
    for prompt, texts in zip(prompts, completions, strict=True):
        for text in texts:
            lines, correct, first_wrong = steps_correct(prompt, text)
            steps = len(prompt.split("+")) - 1
            good = first_wrong if first_wrong is not None else min(lines, steps)
            right += good
            # A chain that stopped early without a wrong line failed its next step all the same.
            tried += good + (1 if good < steps else 0)
    return right / max(tried, 1)


def evaluate(model, tokenizer, problems: int = EVAL_PROBLEMS, samples: int = EVAL_SAMPLES) -> dict[str, float]:
    """Greedy and sampled (T=1) per-step and end-to-end accuracy, pass@{1,4,samples} on held-out problems."""
    model.eval()
    prompts = [prompt for prompt, _ in make_problems(problems, EVAL_SEED)]
    greedy = sample_completions(model, tokenizer, prompts, 1, do_sample=False)
    torch.manual_seed(EVAL_SEED)
    sampled = sample_completions(model, tokenizer, prompts, samples, do_sample=True)
    correct_counts = [sum(check(prompt, text) for text in texts)
                      for prompt, texts in zip(prompts, sampled, strict=True)]
    results = {
        "greedy_step_accuracy": step_accuracy(prompts, greedy),
        "greedy_accuracy": sum(check(prompt, texts[0]) for prompt, texts in zip(prompts, greedy, strict=True))
        / len(prompts),
        "sampled_step_accuracy_t1": step_accuracy(prompts, sampled),
        "sampled_accuracy_t1": sum(correct_counts) / (len(prompts) * samples),
    }
    for n in sorted({1, min(4, samples), samples}):
        results[f"pass@{n}"] = sum(pass_at(n, samples, correct) for correct in correct_counts) / len(prompts)
    return results


def format_results(results: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.3f}" for name, value in results.items())


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = build_tokenizer(CHARACTERS, MAX_POSITIONS)
    model = build_model(tokenizer, args.seed, MAX_POSITIONS)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    # Constant after warm-up, as in train_default: an N-step run is the first N steps of a longer one.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    excluded = {prompt for prompt, _ in make_problems(EVAL_PROBLEMS, EVAL_SEED)}
    data_rng = random.Random(args.seed)
    recent_losses: list[float] = []
    step = 0
    while step < args.steps:
        step += 1
        input_ids, labels = training_batch(tokenizer, data_rng, args.batch_size, excluded)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent_losses = (recent_losses + [loss.item()])[-50:]
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {sum(recent_losses) / len(recent_losses):.4f}  {elapsed:6.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            quick = evaluate(model, tokenizer, PERIODIC_EVAL_PROBLEMS, PERIODIC_EVAL_SAMPLES)
            print(f"  eval at step {step}: {format_results(quick)}", flush=True)
            model.train()
            # Stopping early is the point: a model right at every step would leave search nothing to fix.
            if args.stop_at_step_accuracy and quick["sampled_step_accuracy_t1"] >= args.stop_at_step_accuracy:
                break
    train_seconds = time.perf_counter() - started
    final_loss = sum(recent_losses) / len(recent_losses)
    results = evaluate(model, tokenizer)
    print(f"final after {step} steps: {format_results(results)}", flush=True)
    args.steps = step
    save(model, tokenizer, Path(args.out))
    write_training_notes(args, Path(args.out), train_seconds, final_loss, results)


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=COMPLETION_TOKENS)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_training_notes(args, out_dir: Path, train_seconds: float, final_loss: float, results: dict) -> None:
    size_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    lines = [
        "fastbon chain model: tiny Llama for chained addition, one step per line (see fastbon/models/chain.py)",
        "",
        f"command run:  python -m fastbon.demos.train_chain {' '.join(sys.argv[1:])}",
        f"same weights: python -m fastbon.demos.train_chain --steps {args.steps} --seed {args.seed}"
        f" --batch-size {args.batch_size} --lr {args.lr} --warmup {args.warmup} --threads {args.threads}",
        f"seed:         {args.seed}",
        f"training:     {args.steps} steps x {args.batch_size} problems, AdamW lr {args.lr} (warm-up {args.warmup}),"
        f" {DEFAULT_MIN_OPERANDS}-{DEFAULT_MAX_OPERANDS} operands of {DEFAULT_MIN_DIGITS}-{DEFAULT_MAX_DIGITS}"
        " digits, loss on the completion + <eos> only",
        f"wall time:    {train_seconds:.0f} s (training and periodic evaluations), torch threads: {args.threads}",
        f"machine:      {cpu_model_name()} (shared; torch {torch.__version__})",
        f"final loss:   {final_loss:.4f} (mean of the last 50 steps, per completion token)",
        f"model file:   model.safetensors, {size_mb:.2f} MB (float32)",
        "",
        f"evaluation:   {EVAL_PROBLEMS} held-out problems (seed {EVAL_SEED}, never trained on), plain HF generate,",
        f"              greedy, and sampling at temperature 1.0 with top_k=0, {EVAL_SAMPLES} samples per problem;",
        "              step accuracy = P(a line is right | the lines before it are right), by",
        "              fastbon.models.chain.steps_correct; accuracy = final sum right, fastbon.models.chain.check",
    ]
    lines += [f"  {name:<26}{value:.3f}" for name, value in results.items()]
    (out_dir / "TRAINING.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(CHAIN_MODEL_DIR), help="folder for the model and tokenizer files")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    # One thread: see train_default (on a shared 2-core machine a second OpenMP thread slows every step).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    parser.add_argument("--stop-at-step-accuracy", type=float, default=0.0,
                        help="end at the first periodic evaluation whose sampled (T=1) step accuracy reaches this")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
