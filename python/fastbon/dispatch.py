"""Which implementation of an op runs: availability of each backend and the default choice per device.

Backends implement the same contract (see ``fastbon.ops.reference``):
  torch   plain PyTorch, any device: the oracle
  triton  ``kernels/<op>.py``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests only)
  cpu     the C++/OpenMP extension ``fastbon._C``, CPU tensors
  cuda    the C++/CUDA part of the same extension, CUDA tensors
``FASTBON_BACKEND`` forces one backend for every op; ``backend=`` on a call forces it for that call.
"""

import importlib
import os
from functools import cache

import torch

BACKENDS = ("torch", "triton", "cpu", "cuda")
OPS = ("shared_prefix_attention", "sample", "select_topk")

# Default order per device. On CPU tensors the C++ op is the default once it measured faster than torch
# (benchmarks/RESULTS.md). On CUDA tensors the order is provisional until gpu_check.sh has timed both: attention
# prefers triton (both run the prefix pass on tensor cores, triton with 64-row tiles that take fewer trips through
# shared memory than the CUDA kernel's 16-row warp tiles); the other ops prefer the CUDA kernels.
_DEFAULT_ORDER = {
    "cpu": {op: ("cpu", "torch") for op in OPS},
    "cuda": {op: ("cuda", "triton", "torch") for op in OPS} | {
        "shared_prefix_attention": ("triton", "cuda", "torch")},
}

# Backends whose kernels accumulate in float32 and refuse float64 inputs.
_FLOAT32_ONLY = ("triton", "cuda")


@cache
def _triton_status() -> str | None:
    """None when Triton imports, else why not."""
    try:
        importlib.import_module("triton")
    except Exception as error:  # noqa: BLE001 - any import failure means the backend is absent
        return f"triton does not import: {error}"
    return None


@cache
def _extension_status() -> tuple[str | None, bool]:
    """(None when fastbon._C imports else why not, whether it was built with CUDA)."""
    try:
        extension = importlib.import_module("fastbon._C")
    except Exception as error:  # noqa: BLE001
        return f"C++ extension fastbon._C is not built: {error}", False
    return None, bool(getattr(extension, "built_with_cuda", False))


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on tensors of ``device``, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _triton_status() is not None:
            return _triton_status()
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    reason, with_cuda = _extension_status()
    if reason is not None:
        return reason
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, not {device.type}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, not {device.type}"
        if not with_cuda:
            return "fastbon._C was built without CUDA"
    return None


def backends() -> dict[str, str]:
    """Each backend and whether it can run here: 'available' or the reason it cannot (for CPU tensors, and for
    CUDA tensors when a GPU is present)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    status = {}
    for backend in BACKENDS:
        reasons = [unavailable_reason(backend, device) for device in devices]
        usable = [str(device) for device, reason in zip(devices, reasons, strict=True) if reason is None]
        status[backend] = f"available ({', '.join(usable)})" if usable else reasons[-1]
    return status


def resolve(op: str, device: torch.device, backend: str | None, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on ``device``: the one asked for (argument, then FASTBON_BACKEND), else the
    first available in the default order that computes in ``dtype``.
    Raises ValueError when the one asked for cannot run."""
    requested = backend if backend is not None else os.environ.get("FASTBON_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot run {op} on {device.type}: {reason}")
        return requested
    for candidate in _DEFAULT_ORDER.get(device.type, {}).get(op, ("torch",)):
        if dtype == torch.float64 and candidate in _FLOAT32_ONLY:
            continue
        if unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


def implementation(op: str, backend: str):
    """The function implementing ``op`` on ``backend`` (backend contract, inputs already validated)."""
    if backend == "torch":
        module = importlib.import_module("fastbon.ops.reference")
    elif backend == "triton":
        module = importlib.import_module(f"fastbon.kernels.{op}")
    else:
        module = importlib.import_module("fastbon._cpp_ops")
    return getattr(module, op)
