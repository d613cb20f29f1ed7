"""The memory budget of a call: its bytes estimated before any allocation, the rows admitted to decode together,
and the rows preempted when the suffixes grow past it.

Bytes of a call, from the model's config (weights are already resident and not counted):
  prefix      every prompt's KV, stored once: sum_b len_b x kv_bytes_per_token (+ the prefill's own cache)
  prefill     the largest prefill forward's activations (rows x width x (hidden, MLP and eager-attention terms))
  per row     what one decoding sample holds at a suffix capacity of C positions: C x (its KV + its result token
              and log-prob columns), plus its logits row, the sampler's workspace over the vocabulary and one
              layer's activations
Memory follows the tokens generated, so rows are admitted by what they hold now (the first suffix block), not by
``max_new_tokens``. When the suffix is about to double past the budget, finished rows leave first, then the
newest samples are preempted: they decode again from the prompt in a later wave (``Budget.rows_fitting``). Every
wave reads the same prefill and prefix KV (the prompts are not prefilled again), and a sample's tokens depend only
on its own seed and history, so any split into waves gives the single-wave result. A call whose one row at
``max_new_tokens`` cannot fit is refused with the numbers before the prefill.
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
    """The estimate (bytes): ``prefix``, ``prefill`` (peak activations of one prefill forward), ``per_token`` and
    ``per_row_fixed`` (a row at a suffix capacity of C holds C x per_token + per_row_fixed) and ``per_row`` (a
    row at max_new_tokens)."""
    sizes = _config_sizes(model)
    kv, element, vocab = sizes["kv_bytes_per_token"], sizes["element"], sizes["vocab"]
    prefix = kv * len(prompt_lengths) * max(prompt_lengths) + kv * min(BUCKET_TOKENS, sum(prompt_lengths))
    chunk = min(max(prompt_lengths), PREFILL_CHUNK)
    tokens = min(BUCKET_TOKENS, sum(prompt_lengths), len(prompt_lengths) * chunk)
    per_token_activation = (8 * sizes["hidden"] + 3 * sizes["intermediate"]) * element
    attention_scores = sizes["heads"] * chunk * max(prompt_lengths) * 4  # eager / math attention's [H, q, k] scores
    prefill_peak = tokens * per_token_activation + min(len(prompt_lengths), tokens // chunk + 1) * attention_scores
    per_token = kv + 16  # suffix KV + result token and log-prob columns
    # The logits row, its float32 copy and the sampler's / log-softmax workspace, and one layer's activations.
    per_row_fixed = 6 * vocab * 4 + per_token_activation
    return dict(prefix=prefix, prefill=prefill_peak + len(prompt_lengths) * vocab * 4, per_token=per_token,
                per_row_fixed=per_row_fixed, per_row=max_new_tokens * per_token + per_row_fixed)


class Budget:
    """A call's budget against its estimate: how many rows fit at a given suffix capacity."""

    def __init__(self, budget: int, estimate: dict):
        self.budget, self.estimate = budget, estimate
        self.fixed = estimate["prefix"] + estimate["prefill"]

    def rows_fitting(self, capacity: int) -> int:
        """The rows whose suffixes of ``capacity`` positions fit beside the prefix and prefill."""
        room = self.budget - self.fixed
        return max(0, room // (capacity * self.estimate["per_token"] + self.estimate["per_row_fixed"]))


def call_budget(model, prompt_lengths: list, max_new_tokens: int, max_memory, device) -> Budget:
    """The call's ``Budget`` (``max_memory``, or by default a share of what the device has free). Refuses, before
    any allocation, a call in which not even one row reaching ``max_new_tokens`` fits."""
    budget = parse_budget(max_memory)
    if budget is None:
        budget = int(DEFAULT_SHARE * free_bytes(device))
    estimate = call_bytes(model, prompt_lengths, max_new_tokens)
    fits = Budget(budget, estimate)
    if fits.rows_fitting(max_new_tokens) < 1:
        mib = 2**20
        raise MemoryError(
            f"this call cannot fit in max_memory={budget / mib:.1f} MiB: the prompts' KV and prefill need "
            f"{fits.fixed / mib:.1f} MiB and each decoding sample up to {estimate['per_row'] / mib:.1f} MiB "
            f"(max_new_tokens={max_new_tokens}); raise max_memory, or lower max_new_tokens or the prompts' lengths")
    return fits
