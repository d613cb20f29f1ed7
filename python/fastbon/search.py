"""Search over partial samples: particle filtering and beam search, guided by a step score, on forking KV.

Both decode a population of rows per prompt in lockstep and stop at checkpoints (every ``every`` tokens) to score
each partial sample with ``step_score(Samples) -> [B, width]`` log-weights. Then the population is rebuilt from its
best members: particle filtering (sequential Monte Carlo) resamples n particles from the weights, beam search keeps
the best ``beams`` and expands each into ``expand`` children. A child continues its parent: the parent's tokens so
far and its KV, which the children read as one more shared level of the cache (``SharedPrefixCache.fork``): no KV
is copied or recomputed, and the KV bytes grow only by what is generated after the fork. Each row keeps its own
sampling seed, so children of one parent diverge; with the same ``seed`` a search gives the same result.

Rows that finished (EOS) stay in the population, masked, until every row has: a finished particle can be resampled
(its children are finished too), a finished beam keeps its place while it is among the best.
"""

import torch

from . import hf
from .decode import SYNC_EVERY, DecodeOutput, DecodeSettings, _Run
from .generate import GenerationResult, _check_settings, check_seed, sample_seeds, select_best
from .memory import call_budget, parse_budget
from .ops.sampling import sampling_params
from .ops.topk import select_topk
from .prefill import prefill
from .prompts import prepare_prompts, special_ids

RESAMPLE = ("systematic", "multinomial")


def check_weights(weights, num_prompts: int, width: int) -> torch.Tensor:
    """``step_score``'s output as float64 [B, width] log-weights; one clear error for a wrong type or shape, NaN or
    +inf, or a prompt whose weights are all -inf (nothing could be kept)."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"step_score must return a torch.Tensor of log-weights, got {type(weights).__name__}")
    if tuple(weights.shape) != (num_prompts, width):
        raise ValueError(f"step_score must return log-weights of shape [B, width] = {(num_prompts, width)}, got "
                         f"{tuple(weights.shape)}")
    weights = weights.detach().double()
    if torch.isnan(weights).any():
        raise ValueError("step_score returned NaN log-weights")
    if (weights == float("inf")).any():
        raise ValueError("step_score returned +inf log-weights")
    dead = torch.isneginf(weights).all(dim=1)
    if dead.any():
        raise ValueError(f"step_score gave every partial sample of prompt {int(dead.nonzero()[0])} log-weight -inf; "
                         "give wrong steps a finite penalty (e.g. log(1e-3)) so the search can go on")
    return weights


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


def _search(model, input_ids, width, choose, *, step_score, every, temperature, top_k, top_p, min_p, max_new_tokens,
            eos_token_id, seed, attention_mask, backend, score, k, return_all, max_memory, what):
    """The decode loop with checkpoints: at each, ``choose(weights, finished, generator) -> parents`` [B, width]
    (each new row's parent among its prompt's rows) and a fork."""
    _check_search(every, step_score)
    _check_settings(width, k, max_new_tokens, score if score is not None else "mean_logprob", None, return_all,
                    "raw", 1.0)
    parse_budget(max_memory)
    hf.check_model(model, 0)
    eos_ids, pad_token_id = special_ids(model, eos_token_id)
    device = model.get_output_embeddings().weight.device
    prompts = prepare_prompts(input_ids, attention_mask, model.get_input_embeddings().weight.shape[0], device)
    num_prompts, num_rows = len(prompts), len(prompts) * width
    check_seed(seed, num_prompts)
    hf.check_model(model, max(prompt.numel() for prompt in prompts) + max_new_tokens)
    # Every row of a prompt is ranked against the others at each checkpoint: they must decode together.
    budget = call_budget(model, [prompt.numel() for prompt in prompts], max_new_tokens, max_memory, device)
    fitting = budget.rows_fitting(max_new_tokens)
    if fitting < num_rows:
        raise MemoryError(f"{what} = {width} rows per prompt x {num_prompts} prompts = {num_rows} rows must decode "
                          f"together, and only {fitting} fit in max_memory={budget.budget / 2**20:.1f} MiB "
                          f"(each up to {budget.estimate['per_row'] / 2**20:.1f} MiB); lower them or max_new_tokens")
    params = sampling_params(num_rows, device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             seed=sample_seeds(seed, num_prompts, width).to(device))
    settings = DecodeSettings(n=width, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_token_id=pad_token_id,
                              backend=backend, prune=None, logprobs="raw", stops=None, repetition_penalty=1.0)
    generator = torch.Generator().manual_seed((0 if seed is None else hash(tuple(seed)) if isinstance(
        seed, (list, tuple)) else seed) % 2**63)
    stats = {"checkpoints": 0}
    with torch.no_grad():
        hf.route_attention(model.config._attn_implementation)
        prefilled = prefill(model, prompts, pad_token_id, device, stats)
        stats["prefix_kv_bytes"] = prefilled.nbytes()
        device_prompts = [prompt.to(device) for prompt in prompts]
        # Suffix buffers sized to one checkpoint interval: each fork freezes them whole into a level.
        run = _Run(model, prefilled, device_prompts, torch.arange(num_rows, device=device), params, settings, stats,
                   first_capacity=every)
        all_rows = run.batch.sample_ids
        first_row = (torch.arange(num_prompts, device=device) * width)[:, None]
        kv_bytes = stats["generated_kv_bytes"] = []  # after each checkpoint's fork, then at the end
        while run.steps < max_new_tokens:
            run.step()
            at_checkpoint = run.steps % every == 0 and run.steps < max_new_tokens
            if run.steps % SYNC_EVERY == 0 or at_checkpoint or run.steps == max_new_tokens:
                if bool(run.not_finite):
                    raise FloatingPointError("the model produced NaN or infinite logits during decoding")
                if bool(run.batch.finished.all()):
                    break
            if at_checkpoint:
                weights = check_weights(step_score(run.samples_so_far(all_rows, device_prompts)), num_prompts, width)
                parents = choose(weights, run.batch.finished.view(num_prompts, width).cpu(), generator)
                run.fork((parents.to(device) + first_row).flatten(), min(every, max_new_tokens - run.steps))
                stats["checkpoints"] += 1
                kv_bytes.append(run.cache.nbytes()[1])
        kv_bytes.append(run.cache.nbytes()[1])
        stats.update(decode_steps=run.steps, tokens_generated=run.tokens_generated,
                     suffix_kv_bytes=run.peak_suffix_bytes, levels=run.cache.num_levels)
        output = _output(run)
        final_score = score if score is not None else step_score
        return select_best(output, prompts, width, final_score, k, return_all, backend, pad_token_id, stats)


def _output(run) -> DecodeOutput:
    steps = run.steps
    return DecodeOutput(tokens=run.tokens[:, :steps], logprobs=run.logprobs[:, :steps], lengths=run.lengths,
                        finish_reasons=run.finish_reasons, pruned=run.pruned)


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


__all__ = ["RESAMPLE", "beam_search", "check_weights", "particle_filter", "resample_parents"]
