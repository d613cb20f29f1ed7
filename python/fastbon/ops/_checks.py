"""Argument checks shared by the public ops: one clear error that names the argument."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, value, *, ndim: int, dtypes: tuple, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).removeprefix('torch.')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def in_range(name: str, value: torch.Tensor, low: int, high: int) -> None:
    """Every element in [low, high] (a host sync: only for the public op entry, never in the decode loop)."""
    if value.numel() and (int(value.min()) < low or int(value.max()) > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got values in [{int(value.min())}, {int(value.max())}]")
