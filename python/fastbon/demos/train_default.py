"""Train the default model shipped in ``fastbon/models/addition_model/``: a tiny Llama that adds numbers.

Run ``python -m fastbon.demos.train_default [--out DIR] [--steps N] [--seed S]``. It builds the character-level
tokenizer, trains ``LlamaForCausalLM`` from scratch on ``<bos>a+b=c<eos>`` with the loss on the answer only,
measures greedy / sampled accuracy and pass@n with plain Hugging Face ``generate`` on held-out problems, and
writes config.json, generation_config.json, model.safetensors, the tokenizer files and TRAINING.txt to DIR.

Training is stopped early on purpose (by ``--steps``): the model should be right often but not always at
temperature 1, so best-of-n with the exact verifier in :mod:`fastbon.models.arithmetic` clearly beats one sample.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastbon.models import DEFAULT_MODEL_DIR
from fastbon.models.arithmetic import (
    ANSWER_TOKENS,
    DEFAULT_MAX_DIGITS,
    DEFAULT_MIN_DIGITS,
    check,
    make_problem,
    make_problems,
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TASK_CHARACTERS = list("0123456789+=")
MIN_DIGITS, MAX_DIGITS = DEFAULT_MIN_DIGITS, DEFAULT_MAX_DIGITS
MAX_NEW_TOKENS = ANSWER_TOKENS
# The held-out problems come from their own seed and are never trained on.
EVAL_SEED, EVAL_PROBLEMS, EVAL_SAMPLES = 12345, 200, 16


def build_tokenizer(
    characters: list[str] = TASK_CHARACTERS, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """One token per character; ``tokenizer(text)`` prepends <bos>, decoding concatenates characters."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # "." alone skips newlines (Oniguruma has no dotall flag here), and the chain task writes one step per line.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    # Prompts always start with <bos>, in training and in generation, so the tokenizer adds it itself.
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    # WordLevel decoding would join tokens with spaces; the characters must be glued back together.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=model_max_length,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, max_positions: int = 64) -> LlamaForCausalLM:
    """The shipped models' tiny Llama (the addition and chain models share it; only the positions differ)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def training_batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int, excluded_prompts: set[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos>a+b=c<eos>`` rows and labels that are -100 everywhere but on ``c<eos>``.

    Right padding needs no attention mask: causal attention never lets a real token see the pads after it.
    """
    rows, labels = [], []
    while len(rows) < batch_size:
        prompt, answer = make_problem(rng, MIN_DIGITS, MAX_DIGITS)
        if prompt in excluded_prompts:
            continue
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return input_ids, label_ids


@torch.no_grad()
def sample_completions(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    samples_per_prompt: int,
    do_sample: bool,
) -> list[list[str]]:
    """``samples_per_prompt`` decoded completions per prompt from plain HF ``generate`` (T=1, top_k=0 if sampling).

    Prompts are grouped by length so no batch needs padding: the model never saw left padding in training,
    and this keeps the measurement about the model, not about position-id handling of padded prompts.
    """
    completions: list[list[str]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    for indices in by_length.values():
        encoded = tokenizer([prompts[index] for index in indices], return_tensors="pt")
        output = model.generate(
            **encoded,
            max_new_tokens=MAX_NEW_TOKENS,
            num_return_sequences=samples_per_prompt,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=False)
        for position, text in enumerate(texts):
            completions[indices[position // samples_per_prompt]].append(text)
    return completions


def pass_at(n: int, samples: int, correct: int) -> float:
    """Unbiased pass@n from ``correct`` of ``samples`` draws (Chen et al., 2021): 1 - C(s-c, n) / C(s, n)."""
    return 1.0 - math.comb(samples - correct, n) / math.comb(samples, n)


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int = EVAL_SEED) -> dict[str, float]:
    """Greedy accuracy, sampled (T=1) accuracy and pass@{1,4,16} on the held-out problems."""
    model.eval()
    prompts = [prompt for prompt, _ in make_problems(EVAL_PROBLEMS, EVAL_SEED, MIN_DIGITS, MAX_DIGITS)]
    greedy = sample_completions(model, tokenizer, prompts, 1, do_sample=False)
    torch.manual_seed(seed)
    sampled = sample_completions(model, tokenizer, prompts, EVAL_SAMPLES, do_sample=True)
    correct_counts = [
        sum(check(prompt, text) for text in texts) for prompt, texts in zip(prompts, sampled, strict=True)
    ]
    results = {
        "greedy_accuracy": sum(check(prompt, texts[0]) for prompt, texts in zip(prompts, greedy, strict=True))
        / len(prompts),
        "sampled_accuracy_t1": sum(correct_counts) / (len(prompts) * EVAL_SAMPLES),
    }
    for n in (1, 4, 16):
        results[f"pass@{n}"] = sum(pass_at(n, EVAL_SAMPLES, correct) for correct in correct_counts) / len(prompts)
    return results


def cpu_model_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    # Linear warm-up, then a constant rate: a run of N steps is exactly the first N steps of a longer run,
    # so the step count that lands the accuracy target can be read off one long run.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    excluded = {prompt for prompt, _ in make_problems(EVAL_PROBLEMS, EVAL_SEED, MIN_DIGITS, MAX_DIGITS)}
    data_rng = random.Random(args.seed)
    recent_losses: list[float] = []
    results: dict[str, float] | None = None
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
        results = None
        if args.eval_every and step % args.eval_every == 0:
            results = evaluate(model, tokenizer)
            print(f"  eval at step {step}: {format_results(results)}", flush=True)
            model.train()
            # Stopping early is the point: a fully trained model would leave best-of-n nothing to fix.
            if args.stop_at_accuracy and results["sampled_accuracy_t1"] >= args.stop_at_accuracy:
                break
    train_seconds = time.perf_counter() - started
    final_loss = sum(recent_losses) / len(recent_losses)
    if results is None:
        results = evaluate(model, tokenizer)
    print(f"final after {step} steps: {format_results(results)}", flush=True)
    args.steps = step
    save(model, tokenizer, Path(args.out))
    write_training_notes(args, Path(args.out), train_seconds, final_loss, results)


def format_results(results: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.3f}" for name, value in results.items())


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_training_notes(
    args: argparse.Namespace, out_dir: Path, train_seconds: float, final_loss: float, results: dict[str, float]
) -> None:
    size_mb = (out_dir / "model.safetensors").stat().st_size / 1e6
    lines = [
        "fastbon default model: tiny Llama for multi-digit addition (see fastbon/models/arithmetic.py)",
        "",
        f"command run:  python -m fastbon.demos.train_default {' '.join(sys.argv[1:])}",
        f"same weights: python -m fastbon.demos.train_default --steps {args.steps} --seed {args.seed}"
        f" --batch-size {args.batch_size} --lr {args.lr} --warmup {args.warmup} --threads {args.threads}",
        "              (the rate is constant after warm-up and evaluation never touches the training data stream,",
        "              so stopping early at step N gives the weights of an N-step run)",
        f"seed:         {args.seed}",
        f"training:     {args.steps} steps x {args.batch_size} problems, AdamW lr {args.lr} (warm-up {args.warmup}),"
        f" operands {MIN_DIGITS}-{MAX_DIGITS} digits, loss on answer + <eos> only",
        f"wall time:    {train_seconds:.0f} s (training and periodic evaluations), torch threads: {args.threads}",
        f"machine:      {cpu_model_name()} (shared; torch {torch.__version__})",
        f"final loss:   {final_loss:.4f} (mean of the last 50 steps, per answer token)",
        f"model file:   model.safetensors, {size_mb:.2f} MB (float32)",
        "",
        f"evaluation:   {EVAL_PROBLEMS} held-out problems (seed {EVAL_SEED}, never trained on), plain HF generate,",
        f"              sampling at temperature 1.0 with top_k=0, {EVAL_SAMPLES} samples per problem,",
        "              exact verifier fastbon.models.arithmetic.check",
    ]
    lines += [f"  {name:<22}{value:.3f}" for name, value in results.items()]
    (out_dir / "TRAINING.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="folder for the model and tokenizer files")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    # One thread by default: on a shared 2-core machine two OpenMP threads spin against other jobs and ran ~6x
    # slower per step than one in our measurements.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    parser.add_argument(
        "--stop-at-accuracy",
        type=float,
        default=0.0,
        help="end at the first periodic evaluation whose sampled (T=1) accuracy reaches this (0: never)",
    )
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
