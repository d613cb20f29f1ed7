"""Prefill: each prompt forwarded once, in buckets of similar length, into the prefix of a SharedPrefixCache.

A left-padded batch of prompts of unequal length forwards rows x the longest length, so one 2,048-token prompt
beside three 64-token ones costs 4 x 2,048 tokens. Prompts are bucketed by length instead (longest first; a
bucket grows while its padded size stays within ``PADDING_SLACK`` of its tokens), so the forwarded tokens stay
within 10 % of the sum of the prompt lengths. Bucketing, unlike one packed row, keeps every architecture's own
masks (sliding-window layers, chunked attention) exactly as in a plain batched forward. A bucket longer than
``PREFILL_CHUNK`` tokens is forwarded in chunks through its cache, so activations stay bounded for long prompts.
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


def prefill(model, prompts: list, pad_token_id: int, device, stats: dict) -> Prefilled:
    """Forward every prompt once into one level: prompt b's keys and values in positions [0, len_b) of segment b."""
    cache_argument = hf.cache_argument(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in hf.forward_parameters(model) else {}
    lengths = [prompt.numel() for prompt in prompts]
    longest = max(lengths)
    logits, prefix_keys, prefix_values = None, None, None
    stats["prefill_tokens"] = stats.get("prefill_tokens", 0)
    for bucket in length_buckets(lengths):
        ids, mask = left_pad([prompts[index] for index in bucket], pad_token_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        width = ids.shape[1]
        for start in range(0, width, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, width)
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                        use_cache=True, **{cache_argument: cache}, **extra)
        stats["prefill_tokens"] += ids.numel()
        bucket_logits = out.logits[:, -1]
        if logits is None:
            logits = bucket_logits.new_empty((len(prompts), bucket_logits.shape[-1]))
            prefix_keys = [layer.keys.new_zeros((len(prompts), layer.keys.shape[1], longest, layer.keys.shape[3]))
                           for layer in cache.layers]
            prefix_values = [layer.values.new_zeros((len(prompts), *prefix.shape[1:]))
                             for layer, prefix in zip(cache.layers, prefix_keys, strict=True)]
        for row, index in enumerate(bucket):
            logits[index] = bucket_logits[row]
            skip = width - lengths[index]
            for layer, keys, values in zip(cache.layers, prefix_keys, prefix_values, strict=True):
                keys[index, :, :lengths[index]] = layer.keys[row, :, skip:]
                values[index, :, :lengths[index]] = layer.values[row, :, skip:]
        del cache, out
    prefix_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    level = PrefixLevel(prefix_keys, prefix_values, prefix_lens, torch.arange(len(prompts), device=device))
    return Prefilled(logits, [level], prefix_lens.long())
