"""Best-of-n decoding: prefill each prompt once, fork n samples over a shared prefix, decode, score, select."""

from dataclasses import dataclass, field

import torch

from . import hf
from .decode import FINISH_REASONS, LOGPROB_MODES, PRUNED, DecodeSettings, decode
from .memory import parse_budget
from .ops.sampling import sampling_params
from .ops.topk import select_topk
from .prompts import prepare_prompts, special_ids
from .scoring import Pruning, Samples, check_score, compute_scores
from .stop_strings import StopStrings

__all__ = ["FINISH_REASONS", "GenerationResult", "generate"]


@dataclass
class GenerationResult:
    """The best k of n samples per prompt (and all n with ``return_all=True``).

    sequences [B, k, T] generated ids only, padded with the pad id; lengths [B, k]; scores [B, k];
    token_logprobs [B, k, T] per-token log-probabilities in the call's ``logprobs`` mode (0 on padding);
    ``indices`` [B, k] which of the n samples each is; finish_reasons [B, k] int8 indices into
    ``fastbon.FINISH_REASONS``. ``stats`` holds what the run did: tokens prefilled, KV bytes (the suffix at its
    peak), decode steps, tokens generated (the rows each step ran: finished and pruned samples leave the batch),
    samples pruned.
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    token_logprobs: torch.Tensor
    indices: torch.Tensor
    finish_reasons: torch.Tensor | None = None
    all_sequences: torch.Tensor | None = None
    all_lengths: torch.Tensor | None = None
    all_scores: torch.Tensor | None = None
    all_token_logprobs: torch.Tensor | None = None
    all_finish_reasons: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


def _positive_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")


def check_seed(seed, num_prompts: int | None = None) -> None:
    """``seed`` is None, an int, or one int per prompt."""
    if seed is None:
        return
    if isinstance(seed, (list, tuple)):
        if num_prompts is not None and len(seed) != num_prompts:
            raise ValueError(f"seed must hold one int per prompt ({num_prompts}), got {len(seed)}")
        for position, value in enumerate(seed):
            _check_int(f"seed[{position}]", value)
        return
    if isinstance(seed, torch.Tensor):
        raise TypeError("seed must be an int, a list of ints (one per prompt) or None, got a tensor: pass .tolist()")
    _check_int("seed", seed)


def sample_seeds(seed, num_prompts: int, n: int) -> torch.Tensor:
    """The Philox seed of each of the B·n samples (prompt-major). With one seed per prompt, prompt b's n seeds come
    from ``seed[b]`` alone — what an int seed gives a batch of one prompt — so its samples never depend on which
    prompts share its batch."""
    def draw(count, value):
        generator = torch.Generator().manual_seed(value) if value is not None else None
        return torch.randint(-(2**63), 2**63 - 1, (count,), generator=generator, dtype=torch.int64)

    if isinstance(seed, (list, tuple)):
        return torch.cat([draw(n, value % 2**64) for value in seed])
    return draw(num_prompts * n, None if seed is None else seed % 2**64)


def _check_settings(n, k, max_new_tokens, score, prune, return_all, logprobs, repetition_penalty):
    n = _positive_int("n", n)
    k = _positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= n, got k={k} > n={n}")
    _positive_int("max_new_tokens", max_new_tokens)
    check_score(score)
    if prune is not None:
        if not isinstance(prune, Pruning):
            raise TypeError(f"prune must be a fastbon.Pruning or None, got {type(prune).__name__}")
        prune.check()
    if not isinstance(return_all, bool):
        raise TypeError(f"return_all must be a bool, got {type(return_all).__name__}")
    if logprobs not in LOGPROB_MODES:
        raise ValueError(f"logprobs must be one of {LOGPROB_MODES}, got {logprobs!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) or not (
            0 < repetition_penalty < float("inf")):
        raise ValueError(f"repetition_penalty must be a positive finite number, got {repetition_penalty!r}")


def generate(model, input_ids, n=16, k=1, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             eos_token_id=None, score="mean_logprob", seed=None, attention_mask=None, return_all=False, prune=None,
             backend=None, logprobs="raw", stop_strings=None, tokenizer=None, repetition_penalty=1.0,
             max_memory=None, compile=False):
    """Best-of-n sampling from a Hugging Face causal LM with one shared KV cache per prompt.

    Args:
        model: a Hugging Face decoder-only causal LM (``fastbon.hf.check_model`` says what is served).
        input_ids: [B, L] ids with ``attention_mask`` (left or right padding, unequal lengths), or a list of
            1-D id tensors, on the model's device.
        n: samples per prompt. k: how many of them to return (best first), 1 <= k <= n.
        max_new_tokens: the most tokens each sample generates (memory follows what is generated, not this).
        temperature, top_k, top_p, min_p: sampling (temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off).
        eos_token_id: an id or a list; default the model's generation config. A sample stops at EOS and is padded.
        score: "mean_logprob" (default), "sum_logprob", or a callable taking ``fastbon.scoring.Samples`` and
            returning [B, n] scores (higher is better).
        seed: an int makes the run reproducible; a list of B ints gives each prompt its own seed (its samples then
            depend on nothing else in the batch); None draws the seeds from torch's generator.
        return_all: also return all n samples with their scores.
        prune: a ``fastbon.Pruning`` to drop each prompt's weakest partial samples at checkpoints (they leave
            the batch, so later steps cost less; they come back unfinished, with score -inf).
        backend: force one backend for every op (see ``fastbon.backends()``).
        logprobs: "raw" — log_softmax(logits), the model's own probability of each token (default); or
            "processed" — log_softmax(logits / temperature) after ``repetition_penalty`` (TRL's policy log-probs,
            vLLM's processed log-probs; at temperature 0 the temperature is taken as 1). Scores use the same mode.
        stop_strings: strings that end a sample when its decoded completion first contains one; the token that
            completes it is kept whole (as Hugging Face does), nothing after it. Needs ``tokenizer``.
        repetition_penalty: Hugging Face's repetition penalty over prompt + generated tokens (1 = off).
        max_memory: the bytes this call may use beyond the model (an int or "512MiB"; default 90 % of what the
            device has free). Rows are admitted by what they hold now; when the suffixes would grow past it the
            newest samples are preempted and decoded again in a later wave that shares the prefill (same results);
            a call that cannot fit even one sample is refused with the numbers before the prefill
            (``fastbon.memory``).
        compile: run the decode steps under ``torch.compile`` (``fastbon.compiled``): same tokens as eager; the
            first call of each shape pays the compile time (``stats["compile_seconds"]``), later calls reuse it.

    Returns:
        GenerationResult: sequences/lengths/scores/token_logprobs/finish_reasons of the best k per prompt, and all
        n on request.
    """
    _check_settings(n, k, max_new_tokens, score, prune, return_all, logprobs, repetition_penalty)
    parse_budget(max_memory)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    stops = StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
    hf.check_model(model, 0)
    eos_ids, pad_token_id = special_ids(model, eos_token_id)
    device = model.get_output_embeddings().weight.device
    prompts = prepare_prompts(input_ids, attention_mask, model.get_input_embeddings().weight.shape[0], device)
    num_prompts = len(prompts)
    check_seed(seed, num_prompts)
    hf.check_model(model, max(prompt.numel() for prompt in prompts) + max_new_tokens)
    params = sampling_params(num_prompts * n, device, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, seed=sample_seeds(seed, num_prompts, n).to(device))
    settings = DecodeSettings(n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_token_id=pad_token_id,
                              backend=backend, prune=prune, logprobs=logprobs, stops=stops,
                              repetition_penalty=float(repetition_penalty), compile=compile)
    stats = {}
    with torch.no_grad():
        output = decode(model, prompts, params, settings, stats, max_memory)
        return select_best(output, prompts, n, score, k, return_all, backend, pad_token_id, stats)


def select_best(output, prompts: list, n: int, score, k: int, return_all: bool, backend, pad_token_id: int,
                stats: dict) -> GenerationResult:
    """The call's ``GenerationResult`` from the decode's per-sample output (``decode.DecodeOutput``, prompt-major):
    every sample scored, the best k per prompt selected on the device."""
    num_prompts = len(prompts)
    device = output.tokens.device
    samples = Samples(prompts=[prompt.to(device) for prompt in prompts],
                      sequences=output.tokens.view(num_prompts, n, -1), lengths=output.lengths.view(num_prompts, n),
                      token_logprobs=output.logprobs.view(num_prompts, n, -1), pad_token_id=pad_token_id)
    finish_reasons = output.finish_reasons.masked_fill(output.pruned, PRUNED).view(num_prompts, n)
    # A pruned sample is unfinished: it ranks below every sample that ran to the end.
    scores = compute_scores(score, samples).masked_fill(output.pruned.view(num_prompts, n), float("-inf"))
    best_scores, best = select_topk(scores, k, backend=backend)

    def pick(values):
        index = best.view(num_prompts, k, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
        return values.gather(1, index)

    result = GenerationResult(sequences=pick(samples.sequences), lengths=pick(samples.lengths), scores=best_scores,
                              token_logprobs=pick(samples.token_logprobs), indices=best,
                              finish_reasons=pick(finish_reasons), stats=stats)
    if return_all:
        result.all_sequences, result.all_lengths = samples.sequences, samples.lengths
        result.all_scores, result.all_token_logprobs = scores, samples.token_logprobs
        result.all_finish_reasons = finish_reasons
    return result
