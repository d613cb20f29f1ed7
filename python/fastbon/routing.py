"""Per-forward routing of a model's attention and linear layers into fastbon's kernels, installed on first use.

The unmodified HF model runs every forward and nothing about the model changes, ever: attention is routed per
forward. The first decode of a model wraps the attention implementation it runs ("sdpa", "eager",
"flash_attention_2", ...) once, process-wide, in a router that runs fastbon's shared-prefix decode attention when
the forward was given the engine's ``PagedCache`` as ``shared_prefix_cache=`` (only fastbon's decode steps pass one)
and the wrapped function otherwise. So fastbon's calls and HF's own on one model, from any number of threads, never
see each other, and importing fastbon changes nothing in transformers. The model's linear layers are routed the
same way, per forward and per thread (``SkinnyLinears``).
"""

import functools
import inspect
import os
import threading

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import capabilities
from .ops.attention import attention_features
from .ops.skinny_linear import DEFAULT_DTYPES, cpu_reason

CACHE_KWARG = "shared_prefix_cache"
EAGER = "eager"  # not in transformers' registry: each modeling file has its own eager_attention_forward


def shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                                    s_aux=None, **kwargs):
    """AttentionInterface function for decode steps: query [N, Hq, 1, D] -> ([N, 1, Hq, D], None).

    ``key``/``value`` are the suffix buffers the cache returned; the shared levels and the lengths come from the
    ``fastbon.kv_blocks.PagedCache`` passed down the forward as the keyword ``shared_prefix_cache``. The layer's sliding
    window comes from the model's config (``capabilities.layer_window``: the mask transformers would build, which
    ``attention_mask`` stands for and fastbon does not build), the soft-cap and sinks from the keywords the model
    passes (``softcap=``, ``s_aux=``) or its module's ``sinks``; decoding runs without dropout, as under eval().
    """
    cache = kwargs[CACHE_KWARG]
    if query.shape[2] != 1:
        raise RuntimeError("the fastbon attention runs only decode steps of fastbon.generate (one token per sample)")
    layer = cache.layers[module.layer_idx]
    if not torch.compiler.is_compiling():  # counted on the eager first step, where the routing is checked
        cache.attention_calls += 1
    features = layer.attention_features
    if features is None:
        if key is not layer.suffix_keys:
            raise RuntimeError(f"{type(module).__name__} changed the keys between the cache update and attention; "
                               "fastbon's decode attention reads the cache's own keys and cannot serve it")
        features = layer.attention_features = _layer_features(module, layer, query, softcap, s_aux)
    # The plan (backend, row grouping, workspace) was made when the batch last changed: no per-layer validation,
    # allocation or sorting here.
    plan = cache.plan(query.shape[1], layer.suffix_keys)
    out = plan.run(query[:, :, 0].contiguous(), layer.level_keys, layer.level_values, layer.suffix_keys,
                   layer.suffix_values, cache.suffix_lens, scaling if scaling is not None else query.shape[-1] ** -0.5,
                   *features)
    return out[:, None], None


def _layer_features(module, layer, query, softcap, sinks):
    """(window, softcap, sinks) of one cache layer in the op's form; a window no query of the cache can reach
    (the prefix and suffix buffers hold fewer keys) is dropped, so it costs nothing."""
    window = capabilities.layer_window(module)
    # The most keys a query can see is what the model's positions allow (``PagedCache.max_length``).
    if window is not None and window >= layer.get_max_length():
        window = None
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    return attention_features(window, softcap or None, sinks, query.shape[1], query.dtype, query.device)


def _module_eager_attention(module):
    """The eager attention function of the modeling file that defines ``module`` (what transformers falls back to
    for ``attn_implementation="eager"``)."""
    function = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(f"{type(module).__name__}'s modeling file defines no eager_attention_forward")
    return function


def _router(wrapped):
    """An attention function that serves fastbon's decode steps and hands every other call to ``wrapped``
    (``None``: the calling module's own eager attention)."""

    def route(module, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get(CACHE_KWARG) is not None:
            return shared_prefix_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        target = wrapped if wrapped is not None else _module_eager_attention(module)
        return target(module, query, key, value, attention_mask, *args, **kwargs)

    if wrapped is not None:
        functools.update_wrapper(route, wrapped)
    route.fastbon_routes = wrapped
    return route


_LINEAR = torch.nn.functional.linear


class SkinnyLinears(TorchFunctionMode):
    """Inside one of fastbon's decode forwards on CPU: the model's ``nn.Linear`` products run
    ``fastbon.ops.skinny_linear``'s cpu kernel, which streams each weight matrix once for up to 32 rows (torch's BLAS
    GEMM ran 1.8-5.0x slower at those shapes in float32: benchmarks/RESULTS.md) and sums every output in one fixed
    order whatever the batch, so a sample's products do not depend on which samples share its batch: waves under
    ``max_memory`` and preemption give the bits of one wave. Wider batches take it too, for that reason (at 128 rows
    it measured as fast as torch's GEMM in float32).

    A torch function mode holds for the thread that entered it only: another thread's forward on the same model
    (Hugging Face's own generate) is not touched, and nothing about the model changes. A product the kernel does
    not take (more rows, another dtype or device, a tensor subclass, one that needs a gradient) runs unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the forward passes through here: the common case returns first.
        if func is not _LINEAR:
            return func(*args) if not kwargs else func(*args, **kwargs)
        kwargs = kwargs or {}
        x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not _kernel_takes(x, weight, bias):
            return func(*args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        out = _skinny_kernel()(flat if flat.is_contiguous() else flat.contiguous(), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])


def _skinny_kernel():
    from . import _cpp_ops  # imported on first use: fastbon.routing imports without the extension

    return _cpp_ops.skinny_linear


def _kernel_takes(x, weight, bias) -> bool:
    """Whether the cpu skinny kernel computes ``linear(x, weight, bias)`` exactly as asked (cheap checks only: this
    runs for every linear layer of every decode step)."""
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if x.device.type != "cpu" or x.dtype not in DEFAULT_DTYPES or weight.dtype != x.dtype:
        return False
    if x.dim() < 2 or weight.dim() != 2 or not weight.is_contiguous() or x.shape[-1] != weight.shape[1] \
            or x.shape[-1] == 0 or x.numel() == 0:
        return False
    if bias is not None and (type(bias) not in (torch.Tensor, torch.nn.Parameter) or bias.dtype != x.dtype
                             or bias.dim() != 1 or not bias.is_contiguous()):
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    return not (needs_grad and torch.is_grad_enabled())


def skinny_linears(model, backend: str | None) -> SkinnyLinears | None:
    """The mode for a decode step of ``model`` when its products go to the cpu kernel: the call's backend (``backend``,
    then FASTBON_BACKEND) is None or "cpu", and the weights are CPU tensors of a dtype it is picked for. Else None:
    the model's own products (a backend forced for the three ops does not refuse a model over its linear layers)."""
    requested = backend if backend is not None else os.environ.get("FASTBON_BACKEND") or None
    weight = model.get_output_embeddings().weight
    if requested not in (None, "cpu") or weight.dtype not in DEFAULT_DTYPES:
        return None
    return SkinnyLinears() if cpu_reason(weight.device, weight.dtype) is None else None


_ROUTING_LOCK = threading.Lock()


def route_attention(implementation: str) -> None:
    """Make attention implementation ``implementation`` route fastbon's decode steps (idempotent: every fastbon
    call runs it for its model's implementation before the first forward, so nothing is wrapped at import)."""
    if hasattr(ALL_ATTENTION_FUNCTIONS.get(implementation), "fastbon_routes"):
        return
    with _ROUTING_LOCK:
        current = ALL_ATTENTION_FUNCTIONS.get(implementation)  # None for eager: the module's own function
        if hasattr(current, "fastbon_routes"):
            return
        if current is None and implementation != EAGER:
            raise ValueError(f"attention implementation {implementation!r} is not registered with transformers")
        AttentionInterface.register(implementation, _router(current))
