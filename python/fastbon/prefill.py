"""Prefill: each prompt forwarded once, in buckets of similar length, into the prefix of a SharedPrefixCache.

A left-padded batch of prompts of unequal length forwards rows x the longest length, so one 2,048-token prompt
beside three 64-token ones costs 4 x 2,048 tokens. Prompts are bucketed by length instead (longest first; a
bucket grows while its padded size stays within ``PADDING_SLACK`` of its tokens), so the forwarded tokens stay
within 10 % of the sum of the prompt lengths. Bucketing, unlike one packed row, keeps every architecture's own
masks (sliding-window layers, chunked attention) exactly as in a plain batched forward. A bucket longer than
``PREFILL_CHUNK`` tokens is forwarded in chunks through its cache, so activations stay bounded for long prompts.
A prefix every prompt starts with (a system prompt, the same few-shot examples) is forwarded once, stored once as
the root level of the KV tree, and each prompt's rest is forwarded after it.
Prefill caches hold every key (full-attention layers, whatever the model's windows): the decode attention
applies the windows itself.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from . import hf
from .cache import PrefixLevel
from .prompts import left_pad

PADDING_SLACK = 1.1
PREFILL_CHUNK = 8192  # tokens per row per forward
BUCKET_TOKENS = 32768  # rows x length per forward
# A prefix common to every prompt is prefilled and stored once from this many tokens on (a shorter one saves less
# than the extra level costs to read).
COMMON_PREFIX_MIN = 32


def length_buckets(lengths: list) -> list:
    """Prompt indices grouped into buckets, longest first: padded tokens <= PADDING_SLACK x real tokens per bucket
    and rows x width <= BUCKET_TOKENS (one row always fits)."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    buckets, current, tokens = [], [], 0
    for index in order:
        if current:
            width = lengths[current[0]]
            rows = len(current) + 1
            if rows * width > PADDING_SLACK * (tokens + lengths[index]) or rows * width > BUCKET_TOKENS:
                buckets.append(current)
                current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    buckets.append(current)
    return buckets


@dataclass
class Prefilled:
    """What the prefill hands the decode loop: next-token logits [B, V], the KV levels (``PrefixLevel``, root
    first), and each prompt's length int64 [B] (where its first generated token sits)."""

    logits: torch.Tensor
    levels: list
    prompt_lens: torch.Tensor

    def nbytes(self) -> int:
        return sum(level.nbytes() for level in self.levels)


def common_prefix_length(prompts: list) -> int:
    """The tokens every prompt starts with that are worth storing once: their longest common prefix, at most the
    shortest prompt's length minus one (each prompt keeps a token of its own, whose logits the first sample draws
    from), and 0 below ``COMMON_PREFIX_MIN`` tokens or for a single prompt."""
    if len(prompts) < 2:
        return 0
    shortest = min(prompt.numel() for prompt in prompts) - 1
    if shortest < COMMON_PREFIX_MIN:
        return 0
    heads = torch.stack([prompt[:shortest] for prompt in prompts])
    differs = (heads != heads[:1]).any(dim=0).nonzero()
    length = int(differs[0]) if differs.numel() else shortest
    return length if length >= COMMON_PREFIX_MIN else 0


def _seeded_cache(common: DynamicCache | None, rows: int) -> DynamicCache:
    """A prefill cache for ``rows`` prompts that already holds the common prefix's KV (each row its own view of it:
    transformers' cache concatenates onto it, so the copy lasts only for this bucket's forward)."""
    cache = DynamicCache()
    if common is not None:
        for index, layer in enumerate(common.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
    return cache


def _forward_chunks(model, ids, mask, positions, cache, extra, past: int):
    """Forward ``ids`` [rows, width] after ``past`` cached tokens, in chunks of PREFILL_CHUNK; the last output."""
    cache_argument = hf.cache_argument(model)
    width = ids.shape[1]
    past_mask = mask.new_ones((ids.shape[0], past))
    for start in range(0, width, PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, width)
        out = model(input_ids=ids[:, start:end], attention_mask=torch.cat([past_mask, mask[:, :end]], dim=1),
                    position_ids=past + positions[:, start:end], use_cache=True, **{cache_argument: cache}, **extra)
    return out


def prefill(model, prompts: list, pad_token_id: int, device, stats: dict) -> Prefilled:
    """Forward every prompt once. One level — prompt b's keys and values in positions [0, len_b) of segment b — or,
    when the prompts share a common prefix worth it (``common_prefix_length``), two: that prefix forwarded and
    stored once, then each prompt's rest after it."""
    extra = {"logits_to_keep": 1} if "logits_to_keep" in hf.forward_parameters(model) else {}
    common_length = common_prefix_length(prompts)
    stats["common_prefix_tokens"] = common_length
    stats["prefill_tokens"] = stats.get("prefill_tokens", 0)
    levels, common = [], None
    if common_length:
        common = DynamicCache()
        head = prompts[0][:common_length].to(device)[None]
        _forward_chunks(model, head, torch.ones_like(head), torch.arange(common_length, device=device)[None], common,
                        extra, 0)
        stats["prefill_tokens"] += common_length
        levels.append(PrefixLevel([layer.keys.clone() for layer in common.layers],
                                  [layer.values.clone() for layer in common.layers],
                                  torch.tensor([common_length], dtype=torch.int32, device=device),
                                  torch.zeros(len(prompts), dtype=torch.int64, device=device)))
    rests = [prompt[common_length:] for prompt in prompts]
    lengths = [rest.numel() for rest in rests]
    longest = max(lengths)
    logits, prefix_keys, prefix_values = None, None, None
    for bucket in length_buckets(lengths):
        ids, mask = left_pad([rests[index] for index in bucket], pad_token_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _seeded_cache(common, len(bucket))
        out = _forward_chunks(model, ids, mask, positions, cache, extra, common_length)
        stats["prefill_tokens"] += ids.numel()
        bucket_logits = out.logits[:, -1]
        if logits is None:
            logits = bucket_logits.new_empty((len(prompts), bucket_logits.shape[-1]))
            prefix_keys = [layer.keys.new_zeros((len(prompts), layer.keys.shape[1], longest, layer.keys.shape[3]))
                           for layer in cache.layers]
            prefix_values = [layer.values.new_zeros((len(prompts), *prefix.shape[1:]))
                             for layer, prefix in zip(cache.layers, prefix_keys, strict=True)]
        width = ids.shape[1]
        for row, index in enumerate(bucket):
            logits[index] = bucket_logits[row]
            skip = common_length + width - lengths[index]
            for layer, keys, values in zip(cache.layers, prefix_keys, prefix_values, strict=True):
                keys[index, :, :lengths[index]] = layer.keys[row, :, skip:]
                values[index, :, :lengths[index]] = layer.values[row, :, skip:]
        del cache, out
    prefix_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    levels.append(PrefixLevel(prefix_keys, prefix_values, prefix_lens, torch.arange(len(prompts), device=device)))
    prompt_lens = torch.tensor([prompt.numel() for prompt in prompts], dtype=torch.int64, device=device)
    return Prefilled(logits, levels, prompt_lens)
