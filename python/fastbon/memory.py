"""Memory: the budget a ``max_memory`` string or int names, what the device has free, and the bytes a prefill and a
decoding row need beyond their KV, estimated from the model's config before any allocation.

Terms (weights are already resident and not counted):
  prefill     one prefill forward's peak activations (tokens x (hidden, MLP and eager-attention terms)) and its
              prefill cache's KV
  per row     what one decoding row holds besides its KV blocks: its logits row, their float32 copy, the sampler's
              workspace over the vocabulary and one layer's activations
The engine (``fastbon.engine_memory``) gives the KV pool what the budget holds beyond the prefill, reserves each
decoding row's share while it decodes, evicts cached prompt blocks, then preempts the newest rows.
"""

import re

import torch

# Of the memory free when the call starts, this share is the default budget (the rest absorbs allocator slack).
DEFAULT_SHARE = 0.9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(max_memory) -> int | None:
    """``max_memory`` as bytes: None, an int, or a string such as "512MiB" / "2GB"."""
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B|B)?\s*", max_memory, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"max_memory must be a number of bytes or a size like '512MiB', got {max_memory!r}")
        return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes or a size like '512MiB', got {max_memory!r}")
    return max_memory


def free_bytes(device: torch.device) -> int:
    """What the device has free now: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the host's available memory from /proc/meminfo: pass max_memory=")


def _config_sizes(model) -> dict:
    config = model.get_text_config() if hasattr(model, "get_text_config") else model.config
    # transformers' attribute maps give every config these names (GPT-2's n_head, n_embd, n_layer included).
    heads, hidden, layers = config.num_attention_heads, config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    element = next(model.parameters()).element_size()
    return dict(heads=heads, hidden=hidden, kv_bytes_per_token=2 * layers * kv_heads * head_dim * element,
                intermediate=intermediate, element=element, vocab=model.get_output_embeddings().weight.shape[0])


def call_bytes(model, prompt_lengths: list, max_new_tokens: int) -> dict:
    """The estimate (bytes): ``prefix``, ``prefill`` (peak activations of one prefill forward), ``per_token`` and
    ``per_row_fixed`` (a row at a suffix capacity of C holds C x per_token + per_row_fixed) and ``per_row`` (a
    row at max_new_tokens)."""
    sizes = _config_sizes(model)
    kv, element, vocab = sizes["kv_bytes_per_token"], sizes["element"], sizes["vocab"]
    prefix = kv * sum(prompt_lengths)
    chunk = max(prompt_lengths)
    tokens = sum(prompt_lengths)
    per_token_activation = (8 * sizes["hidden"] + 3 * sizes["intermediate"]) * element
    attention_scores = sizes["heads"] * chunk * max(prompt_lengths) * 4  # eager / math attention's [H, q, k] scores
    prefill_peak = tokens * per_token_activation + min(len(prompt_lengths), tokens // chunk + 1) * attention_scores
    per_token = kv + 16  # suffix KV + result token and log-prob columns
    # The logits row, its float32 copy and the sampler's / log-softmax workspace, and one layer's activations.
    per_row_fixed = 6 * vocab * 4 + per_token_activation
    return dict(prefix=prefix, prefill=prefill_peak + len(prompt_lengths) * vocab * 4, per_token=per_token,
                per_row_fixed=per_row_fixed, per_row=max_new_tokens * per_token + per_row_fixed)
