"""Best-of-n decoding: prefill each prompt once, fork n samples over a shared prefix, decode, score, select."""

import math
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from . import hf
from .cache import SharedPrefixCache
from .ops.sampling import sample_implementation, sampling_params
from .ops.topk import select_topk
from .scoring import Pruning, Samples, check_score, compute_scores

# The host reads the "all finished" and "NaN seen" flags once per this many steps, never every step.
SYNC_EVERY = 8


@dataclass
class GenerationResult:
    """The best k of n samples per prompt (and all n with ``return_all=True``).

    sequences [B, k, T] generated ids only, padded with the pad id; lengths [B, k]; scores [B, k];
    token_logprobs [B, k, T] raw model log-probabilities (0 on padding); ``indices`` [B, k] which of the n
    samples each is. ``stats`` holds what the run did: tokens prefilled, KV bytes, decode steps, tokens
    generated (the rows each step ran: finished and pruned samples leave the batch) and samples pruned.
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    token_logprobs: torch.Tensor
    indices: torch.Tensor
    all_sequences: torch.Tensor | None = None
    all_lengths: torch.Tensor | None = None
    all_scores: torch.Tensor | None = None
    all_token_logprobs: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


def _positive_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def prepare_prompts(input_ids, attention_mask, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded [B, L] id tensor and its 0/1 mask, from a padded batch (left or right padding,
    with ``attention_mask``) or a list of 1-D tensors."""
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask must be None when input_ids is a list of 1-D tensors")
        if not input_ids:
            raise ValueError("input_ids must hold at least one prompt")
        rows = []
        for position, prompt in enumerate(input_ids):
            prompt = torch.as_tensor(prompt)
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise ValueError(f"input_ids[{position}] must be a 1-D integer tensor, got {prompt.dtype} "
                                 f"{tuple(prompt.shape)}")
            rows.append(prompt)
    else:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor or a list of 1-D tensors, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None and attention_mask.dim() == 1 else (
                attention_mask)
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
        rows = []
        for position, (ids, mask) in enumerate(zip(input_ids.cpu(), attention_mask.cpu(), strict=True)):
            valid = mask.nonzero().flatten()
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1")
            if valid.numel() and valid[-1] - valid[0] + 1 != valid.numel():
                raise ValueError(f"attention_mask row {position} must mark one contiguous run of tokens")
            rows.append(ids[valid])
    for position, prompt in enumerate(rows):
        if prompt.numel() == 0:
            raise ValueError(f"input_ids: prompt {position} is empty")
    width = max(prompt.numel() for prompt in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for row, prompt in enumerate(rows):
        ids[row, width - prompt.numel():] = prompt
        mask[row, width - prompt.numel():] = 1
    return ids.to(device), mask.to(device)


def _special_ids(model, eos_token_id):
    """(eos ids as a list, pad id) from the arguments or the model's generation config."""
    generation_config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    eos_ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if any(isinstance(token, bool) or not isinstance(token, int) or token < 0 for token in eos_ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    pad_token_id = getattr(generation_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad_token_id)


class _Batch:
    """The rows still decoding: per-row state that shrinks together when samples finish or are pruned.

    ``sample_ids`` maps each row to its sample (prompt-major, so a prompt's rows stay adjacent; prompts hold
    different numbers of rows once samples finish); the result buffers are indexed by it and never shrink.
    """

    def __init__(self, sample_ids, next_position, params):
        self.sample_ids, self.next_position, self.params = sample_ids, next_position, params
        self.finished = torch.zeros_like(sample_ids, dtype=torch.bool)
        self.token = None  # the previous step's draw, fed back from step 1 on
        self._refresh()

    def _refresh(self):
        rows = self.sample_ids.shape[0]
        self.rows = torch.arange(rows, device=self.sample_ids.device)
        # A prepared 4-D mask makes HF skip its mask construction; the fastbon attention reads lengths instead.
        self.decode_mask = torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=self.sample_ids.device)

    def select(self, rows):
        self.sample_ids, self.next_position = self.sample_ids[rows], self.next_position[rows]
        self.finished, self.token, self.params = self.finished[rows], self.token[rows], self.params.select(rows)
        self._refresh()


def _prune(prune: Pruning, batch: _Batch, cache, samples_so_far, num_prompts: int, candidates, pruned, stats):
    """Keep the best ``prune.keep`` of each prompt's candidates (its samples not pruned yet, finished or not; the
    same number for every prompt) by the partial score; the others are marked in ``pruned`` and their rows leave
    the batch. Returns the new candidates."""
    per_prompt = candidates.shape[0] // num_prompts
    keep = max(prune.min_keep, math.ceil(per_prompt * prune.keep))
    if keep >= per_prompt:
        return candidates
    partial = compute_scores(prune.score, samples_so_far(candidates))
    _, best = select_topk(partial, keep)
    kept = candidates.view(num_prompts, per_prompt).gather(1, best.sort(dim=-1).values).flatten()
    is_kept = torch.zeros_like(pruned)
    is_kept[kept] = True
    pruned[candidates[~is_kept[candidates]]] = True
    _keep_rows(batch, cache, is_kept[batch.sample_ids].nonzero().flatten())
    stats["pruned"] = stats.get("pruned", 0) + (per_prompt - keep) * num_prompts
    return kept


def _keep_rows(batch: _Batch, cache, rows) -> None:
    batch.select(rows)
    cache.select_samples(rows)


def _decode(model, prompt_ids, prompt_mask, prompts, n, max_new_tokens, params, eos_ids, pad_token_id, backend,
            prune, stats):
    """Prefill once, then sample n continuations per prompt in lockstep. Returns tokens [N, T], token
    log-probabilities [N, T], lengths [N] and a pruned flag [N], with N = B·n, samples of one prompt adjacent.
    ``prompts`` are the B prompts without padding, as partial-score callables see them."""
    device = prompt_ids.device
    num_prompts = prompt_ids.shape[0]
    num_samples = num_prompts * n
    cache_argument = hf.cache_argument(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in hf.forward_parameters(model) else {}

    prompt_cache = DynamicCache(config=model.config)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                   **{cache_argument: prompt_cache}, **extra).logits[:, -1]
    stats["prefill_tokens"] = prompt_ids.numel()
    cache = SharedPrefixCache.from_prompt_cache(prompt_cache, prompt_mask, n, max_new_tokens, backend)
    del prompt_cache
    stats["prefix_kv_bytes"], stats["suffix_kv_bytes"] = cache.nbytes()
    sample = sample_implementation(device, backend)

    row_index = cache.sample_to_prompt.long()  # step 0 samples every sample of a prompt from the prompt's row
    batch = _Batch(torch.arange(num_samples, device=device), cache.prefix_lens.long()[row_index], params)
    tokens = torch.full((num_samples, max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
    logprobs = torch.zeros((num_samples, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(num_samples, dtype=torch.int64, device=device)
    not_finite = torch.zeros((), dtype=torch.bool, device=device)
    pruned = torch.zeros(num_samples, dtype=torch.bool, device=device)
    candidates = torch.arange(num_samples, device=device)  # samples not pruned: what pruning ranks
    eos = torch.tensor(eos_ids, dtype=torch.int64, device=device)

    def samples_so_far(sample_ids):
        ids = sample_ids.view(num_prompts, -1)
        return Samples(prompts=prompts, sequences=tokens[ids, :steps], lengths=lengths[ids],
                       token_logprobs=logprobs[ids, :steps], pad_token_id=pad_token_id, sample_ids=ids % n)

    steps, tokens_generated = 0, 0
    with hf.decode_attention(model):
        for step in range(max_new_tokens):
            if step > 0:
                logits = model(input_ids=batch.token[:, None], position_ids=batch.next_position[:, None],
                               attention_mask=batch.decode_mask, use_cache=True,
                               **{cache_argument: cache, hf.CACHE_KWARG: cache}, **extra).logits[:, -1]
                cache.advance()
                batch.next_position = batch.next_position + 1
                row_index = batch.rows
            step_index = torch.full_like(batch.sample_ids, step)
            params = batch.params
            batch.token, token_logprob = sample(logits.contiguous(), row_index, params.temperature, params.top_k,
                                                params.top_p, params.min_p, params.seed, step_index)
            live = ~batch.finished
            tokens[batch.sample_ids, step] = torch.where(live, batch.token, pad_token_id)
            logprobs[batch.sample_ids, step] = torch.where(live, token_logprob, 0.0)
            lengths[batch.sample_ids] += live
            not_finite |= (live & ~torch.isfinite(token_logprob)).any()
            if eos.numel():
                batch.finished |= torch.isin(batch.token, eos)
            steps, tokens_generated = step + 1, tokens_generated + batch.sample_ids.shape[0]
            if steps % SYNC_EVERY == 0 or steps == max_new_tokens:
                if bool(not_finite):
                    raise FloatingPointError("the model produced NaN or infinite logits during decoding")
                unfinished = (~batch.finished).nonzero().flatten()
                if unfinished.numel() == 0 or steps == max_new_tokens:
                    break
                # Finished samples leave the batch while the host looks anyway.
                if unfinished.numel() < batch.sample_ids.numel():
                    _keep_rows(batch, cache, unfinished)
            if prune is not None and steps % prune.every == 0 and steps < max_new_tokens:
                candidates = _prune(prune, batch, cache, samples_so_far, num_prompts, candidates, pruned, stats)
                if not bool((~batch.finished).any()):  # only finished samples survived (pruning read the host anyway)
                    break
    stats["decode_steps"], stats["tokens_generated"] = steps, tokens_generated
    return tokens[:, :steps], logprobs[:, :steps], lengths, pruned


def generate(model, input_ids, n=16, k=1, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             eos_token_id=None, score="mean_logprob", seed=None, attention_mask=None, return_all=False, prune=None,
             backend=None):
    """Best-of-n sampling from a Hugging Face causal LM with one shared KV cache per prompt.

    Args:
        model: a Hugging Face causal LM of a supported family (Llama, Qwen2, Qwen3, Mistral, GPT-2).
        input_ids: [B, L] ids with ``attention_mask`` (left or right padding, unequal lengths), or a list of
            1-D id tensors.
        n: samples per prompt. k: how many of them to return (best first), 1 <= k <= n.
        max_new_tokens: the most tokens each sample generates.
        temperature, top_k, top_p, min_p: sampling (temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off).
        eos_token_id: an id or a list; default the model's generation config. A sample stops at EOS and is padded.
        score: "mean_logprob" (default), "sum_logprob", or a callable taking ``fastbon.scoring.Samples`` and
            returning [B, n] scores (higher is better).
        seed: an int makes the run reproducible; None draws the per-sample seeds from torch's generator.
        return_all: also return all n samples with their scores.
        prune: a ``fastbon.Pruning`` to drop each prompt's weakest partial samples at checkpoints (they leave
            the batch, so later steps cost less; they come back unfinished, with score -inf).
        backend: force one backend for every op (see ``fastbon.backends()``).

    Returns:
        GenerationResult: sequences/lengths/scores/token_logprobs of the best k per prompt, and all n on request.
    """
    n = _positive_int("n", n)
    k = _positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= n, got k={k} > n={n}")
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    check_score(score)
    if prune is not None:
        if not isinstance(prune, Pruning):
            raise TypeError(f"prune must be a fastbon.Pruning or None, got {type(prune).__name__}")
        prune.check()
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not isinstance(return_all, bool):
        raise TypeError(f"return_all must be a bool, got {type(return_all).__name__}")
    hf.check_model(model, 0)
    eos_ids, pad_token_id = _special_ids(model, eos_token_id)
    device = model.get_output_embeddings().weight.device
    prompt_ids, prompt_mask = prepare_prompts(input_ids, attention_mask, pad_token_id, device)
    hf.check_model(model, prompt_ids.shape[1] + max_new_tokens)
    num_prompts = prompt_ids.shape[0]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    row_seeds = torch.randint(-(2**63), 2**63 - 1, (num_prompts * n,), generator=generator, dtype=torch.int64)
    params = sampling_params(num_prompts * n, device, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, seed=row_seeds.to(device))
    stats = {}
    with torch.no_grad():
        prompts = [ids[mask.bool()] for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
        tokens, logprobs, lengths, pruned = _decode(model, prompt_ids, prompt_mask, prompts, n, max_new_tokens, params,
                                                    eos_ids, pad_token_id, backend, prune, stats)
        samples = Samples(prompts=prompts, sequences=tokens.view(num_prompts, n, -1),
                          lengths=lengths.view(num_prompts, n), token_logprobs=logprobs.view(num_prompts, n, -1),
                          pad_token_id=pad_token_id)
        # A pruned sample is unfinished: it ranks below every sample that ran to the end.
        scores = compute_scores(score, samples).masked_fill(pruned.view(num_prompts, n), float("-inf"))
        best_scores, best = select_topk(scores, k, backend=backend)

        def pick(values):
            index = best.view(num_prompts, k, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
            return values.gather(1, index)

        result = GenerationResult(sequences=pick(samples.sequences), lengths=pick(samples.lengths),
                                  scores=best_scores, token_logprobs=pick(samples.token_logprobs), indices=best,
                                  stats=stats)
        if return_all:
            result.all_sequences, result.all_lengths = samples.sequences, samples.lengths
            result.all_scores, result.all_token_logprobs = scores, samples.token_logprobs
    return result
