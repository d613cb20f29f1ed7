"""A request's prefill: its prompt forwarded alone, one chunk per engine step, into the engine's KV blocks.

The chunks start at multiples of ``prefill_chunk`` from the prompt's first token whatever else runs, and a prefix
cache hit covers whole chunks only, so the products of every chunk have the same shapes and inputs, and the same
bits, as when the prompt runs alone on an idle engine; on CPU the linear layers run the fixed-order kernel, so they do
not depend on the thread count either. The prefill cache holds every key (full-attention layers,
whatever the model's windows): the decode attention applies the windows itself.
"""

import contextlib
import time

import torch
from transformers.cache_utils import DynamicCache

from . import hf
from .kv_blocks import BLOCK


def _seeded_cache(engine, request) -> DynamicCache:
    """A prefill cache holding the request's prompt up to where its prefill stands (cached blocks, at the start)."""
    cache = DynamicCache()
    if request.prefilled:
        keys, values = engine.pool.read_prompt(request.prompt_blocks, request.prefilled)
        for index, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True)):
            cache.update(layer_keys, layer_values, index)
    return cache


def forward_chunk(engine, request):
    """Forward the request's next chunk and store its keys and values in the request's prompt blocks (and its full
    blocks in the prefix cache). Returns the model's output (next-token logits at the chunk's last position) and
    the prefill cache, kept on the request until its prompt is done."""
    model, device = engine.model, engine.device
    start = request.prefilled
    end = min(request.prompt.numel(), start + engine.prefill_chunk)
    if engine.pool is not None:  # the blocks first: a full pool leaves the request where it stands
        needed = -(-end // BLOCK) - len(request.prompt_blocks)
        if not engine.pool.can_allocate(needed):
            engine.prefix_cache.evict(needed)
        while len(request.prompt_blocks) < -(-end // BLOCK):
            request.prompt_blocks.append(engine.allocate_block())
    cache = request.prefill_cache if request.prefill_cache is not None else _seeded_cache(engine, request)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in hf.forward_parameters(model) else {}
    ids = request.prompt[start:end].to(device)[None]
    began = time.perf_counter()
    # The fixed-order products here too (routing.SkinnyLinears): BLAS's sums depend on its thread count, which a
    # Ray worker, a loaded machine or another process sets differently.
    with torch.no_grad(), engine.decoder.linears or contextlib.nullcontext():
        out = model(input_ids=ids, attention_mask=torch.ones((1, end), dtype=torch.int64, device=device),
                    position_ids=torch.arange(start, end, device=device)[None], use_cache=True,
                    **{hf.cache_argument(model): cache}, **extra)
    if not torch.isfinite(out.logits[0, -1]).all() and end == request.prompt.numel():
        raise FloatingPointError("the model produced NaN or infinite logits in the prefill")
    if engine.pool is None:
        engine.make_pool([(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in cache.layers],
                         cache.layers[0].keys.dtype)
        while len(request.prompt_blocks) < -(-end // BLOCK):
            request.prompt_blocks.append(engine.allocate_block())
    engine.pool.write_prompt(request.prompt_blocks, [layer.keys[0, :, start:end] for layer in cache.layers],
                             [layer.values[0, :, start:end] for layer in cache.layers], start)
    request.prefilled = end
    request.stats["prefill_seconds"] = request.stats.get("prefill_seconds", 0.0) + time.perf_counter() - began
    request.prefill_cache = cache
    request.stats["prefill_tokens"] += end - start
    engine.counters["prefill_tokens"] += end - start
    if engine.use_prefix_cache:
        if request.cache_keys is None:
            from .engine_memory import prefix_keys, weights_version

            request.cache_keys = prefix_keys(request.prompt, weights_version(model))
        for index in range(start // BLOCK, end // BLOCK):
            engine.prefix_cache.insert(request.cache_keys[index], request.prompt_blocks[index])
    return out, cache
