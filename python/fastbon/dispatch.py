"""Which implementation of an op runs: availability of each backend, the dtypes it takes, the default choice per
device, and backends registered at run time.

Built-in backends implement the same contract (see ``fastbon.ops.reference``):
  torch   plain PyTorch, any device: the oracle
  triton  ``kernels/<op>.py``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests only)
  cpu     the C++/OpenMP extension ``fastbon._C``, CPU tensors
  cuda    the C++/CUDA part of the same extension, CUDA tensors
``FASTBON_BACKEND`` forces one backend for every op; ``backend=`` on a call forces it for that call.
``register_backend`` adds another (a simulator, an out-of-tree kernel library): it runs only when asked for by name.
"""

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

import torch

BACKENDS = ("torch", "triton", "cpu", "cuda")
OPS = ("shared_prefix_attention", "sample", "select_topk")

# The argument whose dtype picks the backend (named in the error when a requested backend does not take it).
DTYPE_ARGUMENT = {"shared_prefix_attention": "q", "sample": "logits", "select_topk": "scores"}

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BELOW_FLOAT64 = (torch.float16, torch.bfloat16, torch.float32)
_SCORE_FLOATS = (torch.float32, torch.float64)
# What each built-in backend's kernels take. The torch and cpu backends compute float64 in float64; the triton
# sampler reads float64 logits and computes in float32; the triton and cuda attention kernels and the cuda sampler
# accumulate in float32 and refuse float64 (csrc/bindings/cuda_ops.cpp, kernels/tree_attention.py).
_DTYPES = {
    "torch": {"shared_prefix_attention": _ALL_FLOATS, "sample": _ALL_FLOATS, "select_topk": _SCORE_FLOATS},
    "cpu": {"shared_prefix_attention": _ALL_FLOATS, "sample": _ALL_FLOATS, "select_topk": _SCORE_FLOATS},
    "triton": {"shared_prefix_attention": _BELOW_FLOAT64, "sample": _ALL_FLOATS, "select_topk": _SCORE_FLOATS},
    "cuda": {"shared_prefix_attention": _BELOW_FLOAT64, "sample": _BELOW_FLOAT64, "select_topk": _SCORE_FLOATS},
}
# The dtypes each public op accepts: with dtype=None, resolve picks a backend that takes all of them.
_OP_DTYPES = {op: _DTYPES["torch"][op] for op in OPS}

# Default order per device. On CPU tensors the C++ op is the default once it measured faster than torch
# (benchmarks/RESULTS.md). On CUDA tensors every op prefers triton until benchmarks/gpu_check.sh has run the cuda
# kernels on a GPU and timed them against it: they are tested under the CUDA emulator and compile-checked with nvcc,
# but have never run on a GPU.
_DEFAULT_ORDER = {
    "cpu": {op: ("cpu", "torch") for op in OPS},
    "cuda": {op: ("triton", "cuda", "torch") for op in OPS},
}


@dataclass(frozen=True)
class RegisteredBackend:
    """A backend added with ``register_backend``."""

    implementations: Mapping[str, Callable]
    device_types: tuple[str, ...]
    dtypes: Mapping[str, tuple[torch.dtype, ...]]


_REGISTERED: dict[str, RegisteredBackend] = {}


def register_backend(name: str, implementations: Mapping[str, Callable], *, device_types: tuple[str, ...],
                     dtypes: Mapping[str, tuple[torch.dtype, ...]] | None = None) -> None:
    """Make ``name`` a backend every op accepts as ``backend=name`` (or ``FASTBON_BACKEND=name``).

    Args:
        name: a new name (not a built-in backend, not already registered).
        implementations: one function per op in ``OPS``, each with the backend contract of ``fastbon.ops.reference``
            (inputs validated and contiguous).
        device_types: the tensor device types it runs on, e.g. ("cpu",).
        dtypes: per op, the dtypes it takes (default: every dtype the public op accepts).

    Example:
        >>> register_backend("emulated", {op: getattr(emulator, op) for op in OPS}, device_types=("cpu",))
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in BACKENDS or name in _REGISTERED:
        raise ValueError(f"name {name!r} is already a backend")
    if not isinstance(implementations, Mapping) or set(implementations) != set(OPS):
        raise ValueError(f"implementations must map exactly the ops {OPS}, got {implementations!r}")
    if not all(callable(function) for function in implementations.values()):
        raise TypeError("implementations must map each op to a callable")
    if not isinstance(device_types, tuple) or not device_types or not all(isinstance(d, str) for d in device_types):
        raise ValueError(f"device_types must be a non-empty tuple of device type names, got {device_types!r}")
    dtypes = dict(_OP_DTYPES if dtypes is None else dtypes)
    if set(dtypes) != set(OPS) or not all(set(dtypes[op]) <= set(_OP_DTYPES[op]) for op in OPS):
        raise ValueError(f"dtypes must give, for each op in {OPS}, dtypes that op accepts, got {dtypes!r}")
    _REGISTERED[name] = RegisteredBackend(dict(implementations), device_types, {op: tuple(dtypes[op]) for op in OPS})


def unregister_backend(name: str) -> None:
    """Remove a backend added with ``register_backend``."""
    if name not in _REGISTERED:
        raise ValueError(f"name {name!r} is not a registered backend (registered: {tuple(_REGISTERED)})")
    del _REGISTERED[name]


def names() -> tuple[str, ...]:
    """Every backend name: the built-in ones, then the registered ones."""
    return BACKENDS + tuple(_REGISTERED)


def dtypes(op: str, backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes of ``op``'s main argument (``DTYPE_ARGUMENT``) that ``backend`` takes."""
    if backend in _REGISTERED:
        return _REGISTERED[backend].dtypes[op]
    return _DTYPES[backend][op]


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
    if backend in _REGISTERED:
        device_types = _REGISTERED[backend].device_types
        return None if device.type in device_types else f"backend {backend!r} runs on {device_types} tensors only"
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
    for backend in names():
        reasons = [unavailable_reason(backend, device) for device in devices]
        usable = [str(device) for device, reason in zip(devices, reasons, strict=True) if reason is None]
        status[backend] = f"available ({', '.join(usable)})" if usable else reasons[-1]
    return status


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve(op: str, device: torch.device, backend: str | None, dtype: torch.dtype | None) -> str:
    """The backend that runs ``op`` on ``device`` for inputs of ``dtype`` (the dtype of ``DTYPE_ARGUMENT[op]``):
    the one asked for (argument, then FASTBON_BACKEND), else the first available in the default order that takes
    ``dtype``. ``dtype=None`` (not known yet) picks a backend that takes every dtype the op accepts.

    Raises ValueError when the one asked for cannot run here, TypeError when it does not take ``dtype``."""
    requested = backend if backend is not None else os.environ.get("FASTBON_BACKEND") or None
    if requested is not None:
        if requested not in names():
            raise ValueError(f"backend must be one of {names()} or None, got {requested!r}")
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot run {op} on {device.type}: {reason}")
        if dtype is not None and dtype not in dtypes(op, requested):
            taking = [name for name in names() if dtype in dtypes(op, name)]
            accepted = ", ".join(map(_dtype_name, dtypes(op, requested)))
            raise TypeError(f"{DTYPE_ARGUMENT[op]} must be one of ({accepted}) for backend={requested!r}, got "
                            f"{_dtype_name(dtype)}; backends that take {_dtype_name(dtype)}: {', '.join(taking)}")
        return requested
    wanted = _OP_DTYPES[op] if dtype is None else (dtype,)
    for candidate in _DEFAULT_ORDER.get(device.type, {}).get(op, ("torch",)):
        if set(wanted) <= set(dtypes(op, candidate)) and unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


def implementation(op: str, backend: str):
    """The function implementing ``op`` on ``backend`` (backend contract, inputs already validated)."""
    if backend in _REGISTERED:
        return _REGISTERED[backend].implementations[op]
    if backend == "torch":
        module = importlib.import_module("fastbon.ops.reference")
    elif backend == "triton":
        module = importlib.import_module(f"fastbon.kernels.{op}")
    else:
        module = importlib.import_module("fastbon._cpp_ops")
    return getattr(module, op)
