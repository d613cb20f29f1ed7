"""The one backend registry: which implementation of an op runs, for every op.

It maps (op, backend) to an ``Implementation``: the function (loaded on first use) and what it can take, checked by
``Implementation.supports(dtype, device, features, levels)``. Built-in backends implement the same contract (see
``fastbon.ops.reference``):
  torch   plain PyTorch, any device: the oracle
  triton  ``fastbon.kernels`` (glue in ``fastbon.ops._triton``); CUDA tensors, or CPU tensors under
          ``TRITON_INTERPRET=1`` (tests only)
  cpu     the C++/OpenMP extension ``fastbon._C``, CPU tensors
  cuda    the C++/CUDA part of the same extension, CUDA tensors
``register_backend`` adds another (a simulator, an out-of-tree kernel library) for any subset of the ops: it runs
only when asked for by name.

Choosing: ``backend=`` on a call, else ``FASTBON_BACKEND`` (read here only: ``requested_backend``), forces one. A
forced backend that cannot take a call raises (``ValueError`` naming what it lacks, ``TypeError`` for a dtype): a
forced name never silently runs another backend. Without one, the default order of the tensors' device picks the
first backend that takes the call; when a backend ahead of it in that order declines, the reason is logged once per
(op, device, backend, reason), as vLLM's sampler warns once when it falls back.
"""

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

import torch

BACKENDS = ("torch", "triton", "cpu", "cuda")
OPS = ("shared_prefix_attention", "tree_attention", "sample", "select_topk", "skinny_linear")
FEATURES = ("window", "softcap", "sinks")  # the attention ops' optional features

# The argument whose dtype picks the backend (named in the error when a requested backend does not take it).
DTYPE_ARGUMENT = {"shared_prefix_attention": "q", "tree_attention": "q", "sample": "logits", "select_topk": "scores",
                  "skinny_linear": "x"}

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BELOW_FLOAT64 = (torch.float16, torch.bfloat16, torch.float32)
_SCORE_FLOATS = (torch.float32, torch.float64)
# The dtypes each public op accepts.
OP_DTYPES = {"shared_prefix_attention": _ALL_FLOATS, "tree_attention": _ALL_FLOATS, "sample": _ALL_FLOATS,
             "select_topk": _SCORE_FLOATS, "skinny_linear": _ALL_FLOATS}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op and what it takes.

    ``load`` returns the function with the op's backend contract (for tree_attention: an object with
    ``plan_tree(plan)`` and ``tree_attention(plan, ...)``, as ``fastbon.ops.reference``). ``levels`` is the range of
    tree levels it takes (tree_attention only). ``default_dtypes`` / ``default_max_rows`` narrow where the default
    order picks it (where it measured faster), not what it can run when asked for.
    """

    load: Callable[[], Callable]
    dtypes: tuple[torch.dtype, ...]
    features: frozenset = frozenset(FEATURES)
    levels: tuple[int, int | None] = (0, None)
    default_dtypes: tuple[torch.dtype, ...] | None = None
    default_max_rows: int | None = None
    batch_invariant: bool = False

    def function(self) -> Callable:
        # Loaded per resolution, not cached: a module attribute replaced later (a test's patch) is the one that runs.
        return self.load()

    def supports(self, dtype: torch.dtype | None, device: torch.device, features=(), levels: int = 1) -> str | None:
        """None when this implementation takes the call, else what it lacks (a phrase). ``device`` is checked by the
        backend's availability (``unavailable_reason``); dtype None means any dtype the op accepts."""
        del device  # the backend's availability covers devices: one place for it
        lacking = sorted(set(features) - self.features)
        if lacking:
            return f"no {' / '.join(lacking)} (it implements {', '.join(sorted(self.features)) or 'none of them'})"
        low, high = self.levels
        if levels < low or (high is not None and levels > high):
            span = f"exactly {low}" if high == low else f"{low} to {high}" if high is not None else f"at least {low}"
            return f"no trees of {levels} levels (it takes {span})"
        if dtype is not None and dtype not in self.dtypes:
            return f"no {_dtype_name(dtype)} (it takes {', '.join(map(_dtype_name, self.dtypes))})"
        return None


def _attribute(module: str, name: str) -> Callable[[], Callable]:
    return lambda: getattr(importlib.import_module(module), name)


def _module(module: str) -> Callable[[], Callable]:
    return lambda: importlib.import_module(module)


def _cuda_one_level_tree():
    from .ops.one_level_tree import OneLevelTree

    return OneLevelTree(importlib.import_module("fastbon._cpp_ops").shared_prefix_attention)


def _torch_linear():
    return torch.nn.functional.linear


_REFERENCE, _TRITON, _CPP = "fastbon.ops.reference", "fastbon.ops._triton", "fastbon._cpp_ops"
_NO_FEATURES = frozenset()
# The built-in table. Why each row's limits: the triton and cuda attention kernels and the cuda sampler accumulate
# in float32 and refuse float64 (the triton sampler reads float64 and computes in float32); the CUDA attention
# kernels implement none of window / softcap / sinks and have no tree kernel (a one-level tree runs their two-level
# kernel); the skinny product's cpu kernel takes 16- and 32-bit floats, and on a GPU the product is cuBLAS's
# (streaming the weights, which cuBLAS already does). The torch and cpu backends are batch-invariant: a row's result
# is the same in any batch (the cpu kernels sum each row in a fixed order); the triton and cuda kernels promise
# nothing of the kind (their tiles and splits follow the batch).
_BUILTIN: dict[tuple[str, str], Implementation] = {
    ("shared_prefix_attention", "torch"): Implementation(_attribute(_REFERENCE, "shared_prefix_attention"), _ALL_FLOATS,
                                                         batch_invariant=True),
    ("shared_prefix_attention", "triton"): Implementation(_attribute(_TRITON, "shared_prefix_attention"),
                                                          _BELOW_FLOAT64),
    ("shared_prefix_attention", "cpu"): Implementation(_attribute(_CPP, "shared_prefix_attention"), _ALL_FLOATS,
                                                       batch_invariant=True),
    ("shared_prefix_attention", "cuda"): Implementation(_attribute(_CPP, "shared_prefix_attention"), _BELOW_FLOAT64,
                                                        features=_NO_FEATURES),
    ("tree_attention", "torch"): Implementation(_module(_REFERENCE), _ALL_FLOATS, batch_invariant=True),
    ("tree_attention", "triton"): Implementation(_module(_TRITON), _BELOW_FLOAT64),
    ("tree_attention", "cpu"): Implementation(_module(_CPP), _ALL_FLOATS, batch_invariant=True),
    ("tree_attention", "cuda"): Implementation(_cuda_one_level_tree, _BELOW_FLOAT64, features=_NO_FEATURES,
                                               levels=(1, 1)),
    ("sample", "torch"): Implementation(_attribute(_REFERENCE, "sample"), _ALL_FLOATS, batch_invariant=True),
    ("sample", "triton"): Implementation(_attribute(_TRITON, "sample"), _ALL_FLOATS),
    ("sample", "cpu"): Implementation(_attribute(_CPP, "sample"), _ALL_FLOATS, batch_invariant=True),
    ("sample", "cuda"): Implementation(_attribute(_CPP, "sample"), _BELOW_FLOAT64),
    ("select_topk", "torch"): Implementation(_attribute(_REFERENCE, "select_topk"), _SCORE_FLOATS,
                                             batch_invariant=True),
    ("select_topk", "triton"): Implementation(_attribute(_TRITON, "select_topk"), _SCORE_FLOATS),
    ("select_topk", "cpu"): Implementation(_attribute(_CPP, "select_topk"), _SCORE_FLOATS, batch_invariant=True),
    ("select_topk", "cuda"): Implementation(_attribute(_CPP, "select_topk"), _SCORE_FLOATS),
    # torch's BLAS rounds some batch sizes differently from others (MKL's float32 GEMM): not batch-invariant.
    ("skinny_linear", "torch"): Implementation(_torch_linear, _ALL_FLOATS),
    # Picked by default for float32 and bfloat16 up to 32 rows, where it measured faster than torch's (float16 weights
    # widen slowly; past 32 rows a BLAS GEMM reuses each weight tile enough: benchmarks/RESULTS.md).
    ("skinny_linear", "cpu"): Implementation(_attribute(_CPP, "skinny_linear"), _BELOW_FLOAT64,
                                             default_dtypes=(torch.float32, torch.bfloat16), default_max_rows=32,
                                             batch_invariant=True),
    ("skinny_linear", "cuda"): Implementation(_torch_linear, _ALL_FLOATS),
}

# Default order per device. On CPU tensors the C++ op is the default once it measured faster than torch
# (benchmarks/RESULTS.md). On CUDA tensors the attention and sampling ops prefer triton until benchmarks/gpu_check.sh
# has run the cuda kernels on a GPU and timed them against it: they are tested under the CUDA emulator and
# compile-checked with nvcc, but have never run on a GPU. The skinny product on a GPU is cuBLAS's.
_DEFAULT_ORDER = {
    "cpu": {op: ("cpu", "torch") for op in OPS},
    "cuda": {**{op: ("triton", "cuda", "torch") for op in OPS}, "skinny_linear": ("cuda", "torch")},
}

_REGISTERED: dict[str, dict[str, Implementation]] = {}
_REGISTERED_DEVICES: dict[str, tuple[str, ...]] = {}


def register_backend(name: str, implementations: Mapping[str, Callable], *, device_types: tuple[str, ...],
                     dtypes: Mapping[str, tuple[torch.dtype, ...]] | None = None,
                     features: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Make ``name`` a backend the ops it implements accept as ``backend=name`` (or ``FASTBON_BACKEND=name``).

    Args:
        name: a new name (not a built-in backend, not already registered).
        implementations: a function per op it supplies (any of ``OPS``), each with the backend contract of
            ``fastbon.ops.reference`` (inputs validated and contiguous); for tree_attention an object with
            ``plan_tree`` and ``tree_attention``. A backend with shared_prefix_attention and no tree_attention
            serves one-level trees through it.
        device_types: the tensor device types it runs on, e.g. ("cpu",).
        dtypes: per op, the dtypes it takes (default: every dtype the public op accepts).
        features: per attention op, the optional features (``FEATURES``) it implements (default: none).

    Example:
        >>> register_backend("emulated", {"sample": emulator.sample}, device_types=("cpu",))
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in BACKENDS or name in _REGISTERED:
        raise ValueError(f"name {name!r} is already a backend")
    if not isinstance(implementations, Mapping) or not implementations or not set(implementations) <= set(OPS):
        raise ValueError(f"implementations must map some of the ops {OPS}, got {implementations!r}")
    if not all(callable(function) or op == "tree_attention" for op, function in implementations.items()):
        raise TypeError("implementations must map each op to a callable")
    if not isinstance(device_types, tuple) or not device_types or not all(isinstance(d, str) for d in device_types):
        raise ValueError(f"device_types must be a non-empty tuple of device type names, got {device_types!r}")
    dtypes = {op: OP_DTYPES[op] for op in implementations} | dict(dtypes or {})
    if set(dtypes) != set(implementations) or not all(set(dtypes[op]) <= set(OP_DTYPES[op]) for op in dtypes):
        raise ValueError(f"dtypes must give, for each op of implementations, dtypes that op accepts, got {dtypes!r}")
    features = dict(features or {})
    if not set(features) <= set(implementations) or not all(set(f) <= set(FEATURES) for f in features.values()):
        raise ValueError(f"features must give, for ops of implementations, some of {FEATURES}, got {features!r}")
    table = {}
    for op, function in implementations.items():
        table[op] = Implementation(lambda function=function: function, tuple(dtypes[op]),
                                   features=frozenset(features.get(op, ())))
    if "shared_prefix_attention" in table and "tree_attention" not in table:
        two_level = table["shared_prefix_attention"]

        def one_level_tree(two_level=two_level):
            from .ops.one_level_tree import OneLevelTree

            return OneLevelTree(two_level.function())

        table["tree_attention"] = Implementation(one_level_tree, two_level.dtypes, two_level.features, levels=(1, 1))
    _REGISTERED[name] = table
    _REGISTERED_DEVICES[name] = device_types


def unregister_backend(name: str) -> None:
    """Remove a backend added with ``register_backend``."""
    if name not in _REGISTERED:
        raise ValueError(f"name {name!r} is not a registered backend (registered: {tuple(_REGISTERED)})")
    del _REGISTERED[name], _REGISTERED_DEVICES[name]


def names() -> tuple[str, ...]:
    """Every backend name: the built-in ones, then the registered ones."""
    return BACKENDS + tuple(_REGISTERED)


def entry(op: str, backend: str) -> Implementation | None:
    """The registry's entry for ``op`` on ``backend`` (None: the backend has no such op)."""
    if backend in _REGISTERED:
        return _REGISTERED[backend].get(op)
    return _BUILTIN.get((op, backend))


def dtypes(op: str, backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes of ``op``'s main argument (``DTYPE_ARGUMENT``) that ``backend`` takes (() without the op)."""
    found = entry(op, backend)
    return found.dtypes if found is not None else ()


def requested_backend(backend: str | None = None) -> str | None:
    """The backend a call asks for: ``backend``, else ``FASTBON_BACKEND`` (the one place it is read), else None."""
    return backend if backend is not None else os.environ.get("FASTBON_BACKEND") or None


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
        device_types = _REGISTERED_DEVICES[backend]
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
    """Each backend: whether it can run here ('available (devices)' or the reason it cannot, for CPU tensors and for
    CUDA tensors when a GPU is present), its ops, and those whose per-row results do not depend on the batch (the
    others: not promised)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    status = {}
    for backend in names():
        reasons = [unavailable_reason(backend, device) for device in devices]
        usable = [str(device) for device, reason in zip(devices, reasons, strict=True) if reason is None]
        where = f"available ({', '.join(usable)})" if usable else reasons[-1]
        ops = [op for op in OPS if entry(op, backend) is not None]
        invariant = [op for op in ops if entry(op, backend).batch_invariant]
        promise = f"batch-invariant: {', '.join(invariant)}" if invariant else "batch invariance: not promised"
        status[backend] = f"{where}; ops: {', '.join(ops)}; {promise}"
    return status


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _declines(op: str, backend: str, device: torch.device, dtype, features, levels) -> str | None:
    """Why ``backend`` cannot take this call of ``op`` (None: it can)."""
    implementation = entry(op, backend)
    if implementation is None:
        return f"backend {backend!r} has no {op}"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        return reason
    return implementation.supports(dtype, device, features, levels)


_LOGGED: set = set()


def _log_once(op: str, device: torch.device, declined: str, reason: str, chosen: str) -> None:
    key = (op, device.type, declined, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning("fastbon: %s on %s runs on backend %r: backend %r declines it: %s", op, device.type, chosen,
                       declined, reason)


def resolve(op: str, device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None, *,
            features=(), levels: int = 1, rows: int | None = None) -> str:
    """The backend that runs ``op`` on ``device`` for inputs of ``dtype`` (of ``DTYPE_ARGUMENT[op]``; None: not known
    yet, so one that takes every dtype the op accepts), with the optional ``features`` (names in ``FEATURES``),
    ``levels`` tree levels (tree_attention) and ``rows`` product rows (skinny_linear).

    The one asked for (argument, then FASTBON_BACKEND) runs or raises: ValueError naming what it lacks, TypeError
    when it does not take ``dtype``. Else the first of the device's default order that takes the call, the reasons
    of those before it logged once."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    features = tuple(features)
    requested = requested_backend(backend)
    if requested is not None:
        if requested not in names():
            raise ValueError(f"backend must be one of {names()} or None, got {requested!r}")
        reason = _declines(op, requested, device, None, features, levels)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot run {op} on {device.type}: {reason}")
        if dtype is not None and dtype not in dtypes(op, requested):
            taking = [name for name in names() if dtype in dtypes(op, name)]
            accepted = ", ".join(map(_dtype_name, dtypes(op, requested)))
            raise TypeError(f"{DTYPE_ARGUMENT[op]} must be one of ({accepted}) for backend={requested!r}, got "
                            f"{_dtype_name(dtype)}; backends that take {_dtype_name(dtype)}: {', '.join(taking)}")
        return requested
    declined = []
    for candidate in _DEFAULT_ORDER.get(device.type, {}).get(op, ("torch",)):
        implementation = entry(op, candidate)
        wanted = OP_DTYPES[op] if dtype is None else (dtype,)
        reason = _declines(op, candidate, device, None, features, levels)
        if reason is None and not set(wanted) <= set(implementation.dtypes):
            reason = f"no {', '.join(_dtype_name(d) for d in wanted if d not in implementation.dtypes)}"
        if reason is None:
            # Where it measured slower (dtypes, rows), the default passes it by: a choice, not a fallback to log.
            if (implementation.default_dtypes is not None and not set(wanted) <= set(implementation.default_dtypes)) \
                    or (implementation.default_max_rows is not None and (rows is None
                                                                          or rows > implementation.default_max_rows)):
                continue
            for name, why in declined:
                _log_once(op, device, name, why, candidate)
            return candidate
        declined.append((candidate, reason))
    return "torch"


def implementation(op: str, backend: str):
    """The function implementing ``op`` on ``backend`` (backend contract, inputs already validated)."""
    found = entry(op, backend)
    if found is None:
        raise ValueError(f"backend {backend!r} has no {op}")
    return found.function()
