"""The memory budget of a call: its bytes estimated before any allocation, and the decode split into waves of
rows that fit.

Bytes of a call, from the model's config (weights are already resident and not counted):
  prefix      every prompt's KV, stored once: sum_b len_b x kv_bytes_per_token (+ the prefill's own cache)
  prefill     the largest prefill forward's activations (rows x width x (hidden, MLP and eager-attention terms))
  per row     what one decoding sample can hold: its suffix KV at max_new_tokens (the worst case: memory grows with
              the tokens, but a sample may not stop early), its result columns, its logits row and the sampler's
              workspace over the vocabulary, and one layer's activations
When prefix + prefill + all rows exceed the budget, the rows decode in waves of as many as fit, every wave reading
the same prefill and prefix KV (the prompts are not prefilled again); each sample's tokens depend only on its own
seed and history, so the waves give the single-wave result. When not even one row fits, the call is refused with
the numbers before the prefill.
"""

import re

import torch

from .prefill import BUCKET_TOKENS, PREFILL_CHUNK

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
    """The estimate (bytes): ``prefix``, ``prefill`` (peak activations of one prefill forward) and ``per_row``."""
    sizes = _config_sizes(model)
    kv, element, vocab = sizes["kv_bytes_per_token"], sizes["element"], sizes["vocab"]
    prefix = kv * len(prompt_lengths) * max(prompt_lengths) + kv * min(BUCKET_TOKENS, sum(prompt_lengths))
    chunk = min(max(prompt_lengths), PREFILL_CHUNK)
    tokens = min(BUCKET_TOKENS, sum(prompt_lengths), len(prompt_lengths) * chunk)
    per_token_activation = (8 * sizes["hidden"] + 3 * sizes["intermediate"]) * element
    attention_scores = sizes["heads"] * chunk * max(prompt_lengths) * 4  # eager / math attention's [H, q, k] scores
    prefill_peak = tokens * per_token_activation + min(len(prompt_lengths), tokens // chunk + 1) * attention_scores
    per_row = (max_new_tokens * (kv + 16)  # suffix KV + result token and log-prob columns
               + 6 * vocab * 4  # the logits row, its float32 copy and the sampler's / log-softmax workspace
               + per_token_activation)
    return dict(prefix=prefix, prefill=prefill_peak + len(prompt_lengths) * vocab * 4, per_row=per_row)


def wave_rows(model, prompt_lengths: list, n: int, max_new_tokens: int, max_memory, device) -> tuple[int, dict]:
    """(rows decoded together, the estimate). All B·n rows when they fit; otherwise as many as fit."""
    budget = parse_budget(max_memory)
    if budget is None:
        budget = int(DEFAULT_SHARE * free_bytes(device))
    estimate = call_bytes(model, prompt_lengths, max_new_tokens)
    fixed = estimate["prefix"] + estimate["prefill"]
    rows = (budget - fixed) // estimate["per_row"] if budget > fixed else 0
    estimate.update(budget=budget, rows=len(prompt_lengths) * n)
    if rows < 1:
        mib = 2**20
        raise MemoryError(
            f"this call cannot fit in max_memory={budget / mib:.1f} MiB: the prompts' KV and prefill need "
            f"{fixed / mib:.1f} MiB and each decoding sample up to {estimate['per_row'] / mib:.1f} MiB "
            f"(max_new_tokens={max_new_tokens}); raise max_memory, or lower max_new_tokens or the prompts' lengths")
    return int(min(rows, len(prompt_lengths) * n)), estimate
