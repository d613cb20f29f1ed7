"""The engine's memory: its arguments checked, the KV pool sized by the budget, and the prefix cache's keys."""

import hashlib

import torch

from .config import check_int
from .kv_blocks import BLOCK
from .memory import DEFAULT_SHARE, call_bytes, free_bytes, parse_budget


def check_engine_arguments(max_rows, prefill_chunk, compile, prefix_cache, background, max_memory) -> None:
    if max_rows is not None:
        check_int("max_rows", max_rows, 1)
    check_int("prefill_chunk", prefill_chunk, BLOCK)
    if prefill_chunk % BLOCK:
        raise ValueError(f"prefill_chunk must be a multiple of {BLOCK} (the KV block), got {prefill_chunk}")
    for name, value in (("compile", compile), ("prefix_cache", prefix_cache), ("background", background)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    parse_budget(max_memory)


def pool_blocks(engine, layer_shapes: list, dtype) -> tuple[int, int]:
    """(the KV blocks the budget holds beside one prefill chunk's activations, the blocks' worth each decoding row
    holds for its logits, sampler workspace and activations: reserved while it decodes) from
    ``fastbon.memory.call_bytes``'s terms."""
    budget = parse_budget(engine.max_memory)
    if budget is None:
        budget = int(DEFAULT_SHARE * free_bytes(engine.device))
    # The prefill's activations: of a chunk, or of the longest prompt queued when the pool is made when shorter.
    queued = [request.prompt.numel() for request in (*engine.waiting, *engine.prefilling)]
    estimate = call_bytes(engine.model, [min(engine.prefill_chunk, max(queued, default=engine.prefill_chunk))], 1)
    element = torch.empty((), dtype=dtype).element_size()
    block_bytes = BLOCK * element * sum(heads * (key_dim + value_dim) for heads, key_dim, value_dim in layer_shapes)
    fixed = estimate["prefill"] + estimate["prefix"]
    blocks = (budget - fixed) // block_bytes
    if blocks < 2:
        mib = 2**20
        raise MemoryError(f"max_memory={budget / mib:.1f} MiB holds no KV block: a prefill chunk of "
                          f"{engine.prefill_chunk} tokens needs {fixed / mib:.1f} MiB and a block "
                          f"{block_bytes / mib:.2f} MiB; raise max_memory or lower prefill_chunk")
    return int(blocks), -(-estimate["per_row_fixed"] // block_bytes)


def weights_version(model) -> tuple:
    """What changes whenever a weight changes in place (an optimizer step, a load_state_dict): every parameter's
    identity and version counter."""
    return tuple((id(parameter), parameter._version) for parameter in model.parameters())


def prefix_keys(prompt: torch.Tensor, version: tuple) -> list:
    """One key per full block of ``prompt``: a digest of the weights' version and the prompt's tokens up to the
    block's end (chained, so a key names the whole prefix)."""
    digest = hashlib.sha256(repr(hash(version)).encode())
    keys = []
    tokens = prompt.numpy()
    for start in range(0, prompt.numel() - BLOCK + 1, BLOCK):
        digest.update(tokens[start:start + BLOCK].tobytes())
        keys.append(digest.copy().hexdigest())
    return keys
