"""Search over partial samples: particle filtering and beam search, guided by a step score, on the engine.

Each prompt is one engine request whose fork hook (``ForkHook``) runs at checkpoints (every ``every`` of its own
tokens): its partial samples are scored with ``step_score(Samples) -> [1, width]`` log-weights and the population is
rebuilt from its best members: particle filtering (sequential Monte Carlo) resamples n particles from the weights,
beam search keeps the best ``beams`` and expands each into ``expand`` children. A child continues its parent: the
parent's tokens so far and its KV, whose full blocks the children share (read once per step for all of them) and
whose partial last block each child copies (``fastbon.engine_policies.fork``). Each row keeps its own sampling
seed, so children of one parent diverge; with the same ``seed`` a search gives the same result, whatever else the
engine runs.

Rows that finished (EOS) stay in the population until every row has: a finished particle can be resampled (its
children are finished too), a finished beam keeps its place while it is among the best.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import SamplingConfig
from .engine_policies import check_weights
from .generate import GenerationResult, run_requests
from .ops.topk import select_topk
from .seeds import check_seed

RESAMPLE = ("systematic", "multinomial")


def resample_parents(weights: torch.Tensor, method: str, generator: torch.Generator) -> torch.Tensor:
    """int64 [B, n] parent indices drawn in proportion to exp(weights) [B, n] (float64 log-weights, on the CPU).

    systematic: one uniform u per prompt, the n points (u + j) / n on the weights' CDF (low variance: a particle of
    weight w gets floor(n w) or ceil(n w) children); multinomial: n independent draws."""
    probs = torch.softmax(weights, dim=1)
    num_prompts, n = probs.shape
    if method == "multinomial":
        return torch.multinomial(probs, n, replacement=True, generator=generator)
    points = (torch.rand((num_prompts, 1), generator=generator, dtype=torch.float64)
              + torch.arange(n, dtype=torch.float64)) / n
    cumulative = probs.cumsum(dim=1)
    cumulative[:, -1] = 1.0  # rounding must not leave the last points past the end
    return torch.searchsorted(cumulative, points, right=True).clamp(max=n - 1)


def _check_search(every, step_score):
    if isinstance(every, bool) or not isinstance(every, int):
        raise TypeError(f"every must be an int, got {type(every).__name__}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not callable(step_score):
        raise TypeError(f"step_score must be a callable taking fastbon.scoring.Samples, got "
                        f"{type(step_score).__name__}")


@dataclass
class ForkHook:
    """What makes a request a search: at every ``every`` of its steps the engine scores its partial samples with
    ``step_score`` and rebuilds the population from ``choose(weights [1, width], finished [1, width], generator)
    -> parents [1, width]`` (``fastbon.engine_policies.fork``)."""

    every: int
    step_score: Callable
    choose: Callable
    generator: torch.Generator


def _search(model, input_ids, width, choose, *, step_score, every, temperature, top_k, top_p, min_p, max_new_tokens,
            eos_token_id, seed, attention_mask, backend, score, k, return_all, max_memory, what):
    """The prompts as requests whose fork hook ``choose`` picks each new row's parent at every checkpoint."""
    _check_search(every, step_score)
    config = SamplingConfig(n=width, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
                            score=score if score is not None else step_score, return_all=return_all)
    check_seed(seed)

    def hook(prompt_index: int) -> ForkHook:
        base = 0 if seed is None else seed[prompt_index] if isinstance(seed, (list, tuple)) else seed
        generator = torch.Generator().manual_seed((base * 1_000_003 + prompt_index) % 2**63)
        return ForkHook(every, step_score, choose, generator)

    try:
        return run_requests(model, input_ids, attention_mask, config, seed, backend=backend, max_memory=max_memory,
                            search=hook)
    except ValueError as error:
        if "must decode together" in str(error):
            raise MemoryError(f"{what} = {width} rows per prompt must decode together: {error}") from error
        raise


def particle_filter(model, input_ids, n, *, step_score, every, resample="systematic", temperature=1.0,
                    top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=128, eos_token_id=None, seed=None,
                    attention_mask=None, backend=None, score=None, k=1, return_all=False,
                    max_memory=None) -> GenerationResult:
    """Particle filtering (sequential Monte Carlo) over n particles per prompt, guided by a step score.

    Args:
        model, input_ids, attention_mask, temperature, top_k, top_p, min_p, max_new_tokens, eos_token_id, seed,
            backend, k, return_all, max_memory: as in ``fastbon.generate`` (n particles = n samples).
        step_score: ``Samples -> [B, n]`` log-weights of each partial sample (e.g. ``fastbon.scoring.step_checker``,
            or ``fastbon.scoring.mean_logprob_so_far`` without a checker); finite for the samples worth keeping.
        every: tokens between checkpoints (>= 1): at each, the n particles of each prompt are resampled in
            proportion to exp(step_score).
        resample: "systematic" (default, low variance) or "multinomial".
        score: how the final particles are ranked (as in ``fastbon.generate``); default ``step_score``.

    Returns:
        GenerationResult of the best k final particles per prompt; ``stats`` adds ``checkpoints``,
        ``generated_kv_bytes`` (the KV bytes of the generated tokens after each checkpoint) and ``levels``.

    Example:
        >>> result = particle_filter(model, ids, 16, step_score=step_checker(tokenizer), every=8, seed=0)
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")

    def choose(weights, finished, generator):
        return resample_parents(weights, resample, generator)

    return _search(model, input_ids, n, choose, step_score=step_score, every=every, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                   seed=seed, attention_mask=attention_mask, backend=backend, score=score, k=k,
                   return_all=return_all, max_memory=max_memory, what="n")


def beam_search(model, input_ids, beams, expand, *, step_score, every, temperature=1.0, top_k=0, top_p=1.0,
                min_p=0.0, max_new_tokens=128, eos_token_id=None, seed=None, attention_mask=None, backend=None,
                score=None, k=1, return_all=False, max_memory=None) -> GenerationResult:
    """Sampled beam search over partial samples: ``beams`` x ``expand`` rows per prompt; at every checkpoint the best
    ``beams`` by ``step_score`` are kept and each forks into ``expand`` children that sample on independently.

    Args:
        beams, expand: beams kept per prompt and children per beam (>= 1 each); beams x expand rows decode at once.
        step_score, every, score, and the rest: as in ``particle_filter``.

    Returns:
        GenerationResult of the best k of the final beams x expand rows per prompt (k <= beams x expand).
    """
    for name, value in (("beams", beams), ("expand", expand)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    width = beams * expand
    copy_index = torch.arange(width) % expand

    def choose(weights, finished, generator):
        # A finished beam's children are identical copies: only its first one competes.
        candidates = weights.masked_fill(finished & (copy_index > 0), float("-inf"))
        _, best = select_topk(candidates, beams)
        return best.sort(dim=1).values.repeat_interleave(expand, dim=1)

    return _search(model, input_ids, width, choose, step_score=step_score, every=every, temperature=temperature,
                   top_k=top_k, top_p=top_p, min_p=min_p, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                   seed=seed, attention_mask=attention_mask, backend=backend, score=score, k=k,
                   return_all=return_all, max_memory=max_memory, what="beams x expand")


__all__ = ["RESAMPLE", "ForkHook", "beam_search", "check_weights", "particle_filter", "resample_parents"]
