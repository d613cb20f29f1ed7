"""Prompts in: the checks every prompt batch passes before any work, the one left-padding routine, and the sampling
seed of a prompt keyed by itself (data-set jobs and the lm-eval adapter)."""

import hashlib
import json

import torch


def left_pad(sequences, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors as a left-padded [R, L] id tensor and its 0/1 int64 mask: the last column is every row's last
    token, which is where a causal LM's next-token logits (or a reward model's score) are read."""
    width = max(sequence.numel() for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.int64, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64, device=device)
    for row, sequence in enumerate(sequences):
        ids[row, width - sequence.numel():] = sequence.to(device)
        mask[row, width - sequence.numel():] = 1
    return ids, mask


def _rows_from_padded(input_ids: torch.Tensor, attention_mask) -> list:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must hold integers or bools (0/1), got {attention_mask.dtype}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}")
    mask = attention_mask.cpu().long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    rows = []
    for position, (ids, row_mask) in enumerate(zip(input_ids.cpu(), mask, strict=True)):
        valid = row_mask.nonzero().flatten()
        if valid.numel() and valid[-1] - valid[0] + 1 != valid.numel():
            raise ValueError(f"attention_mask row {position} must mark one contiguous run of tokens")
        rows.append(ids[valid])
    return rows


def prepare_prompts(input_ids, attention_mask, vocab_size: int, device) -> list:
    """The B prompts as 1-D int64 CPU tensors without padding, from a padded batch (left or right padding, with
    ``attention_mask``) or a list of 1-D tensors; every id checked to lie in [0, vocab_size)."""
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
    elif isinstance(input_ids, torch.Tensor):
        if input_ids.device != torch.device(device):
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        rows = _rows_from_padded(input_ids, attention_mask)
    else:
        raise TypeError(f"input_ids must be a tensor or a list of 1-D tensors, got {type(input_ids).__name__}")
    for position, prompt in enumerate(rows):
        if prompt.numel() == 0:
            raise ValueError(f"input_ids: prompt {position} is empty")
        if prompt.device != torch.device(device):
            raise ValueError(f"input_ids[{position}] is on {prompt.device} but the model is on {device}")
    rows = [prompt.cpu().to(torch.int64) for prompt in rows]
    for position, prompt in enumerate(rows):
        low, high = int(prompt.min()), int(prompt.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids: prompt {position} holds token id {bad}, outside the model's vocabulary "
                             f"[0, {vocab_size})")
    return rows


def special_ids(model, eos_token_id) -> tuple[list, int]:
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


def prompt_seed(seed: int, key) -> int:
    """The sampling seed of one prompt: a stable 63-bit hash of a run's ``seed`` and the prompt's own ``key`` (a
    data-set row's id, an lm-eval request), the same in every process (Python's ``hash`` is salted per process). What
    makes a prompt's samples the same whatever batch, worker or resume it runs in. ``key``: an int, a string, or a
    NumPy/Arrow scalar of either."""
    key = json.dumps([seed, key.item() if hasattr(key, "item") else key]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
