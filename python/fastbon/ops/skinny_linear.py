"""Public entry of the skinny matrix product: y = x · weightᵀ + bias for the few rows of a decode step.

A decode step multiplies a handful of rows (the live samples) by every weight matrix of the model. On CPU these
products set the pace of the step, and the BLAS torch calls (MKL) runs them far below the machine's bandwidth
(benchmarks/RESULTS.md); the ``cpu`` backend's kernel (csrc/cpu/linear.cpp) streams each weight matrix once for all
rows. ``fastbon.routing.SkinnyLinears`` routes the model's ``nn.Linear`` products to it inside fastbon's decode steps.

Backends (entries of the registry, ``fastbon.dispatch``): ``torch`` (``torch.nn.functional.linear``, any device: the
reference), ``cpu`` (float32, bfloat16 and float16 CPU tensors, any number of rows; picked by default for float32 and
bfloat16 up to ``SKINNY_ROWS`` rows) and ``cuda`` (cuBLAS's product, CUDA tensors).
The cpu kernel sums every output in one fixed order whatever the number of rows, so a row's result does not depend
on the rest of its batch: fastbon's decode steps run all their products on it (``routing.SkinnyLinears``), and a call
split into waves (``max_memory``) gives the bits of one wave. torch's BLAS gives no such promise (MKL's float32
GEMM rounds batches of 1-3, 5-7 and 9-11 rows differently from wider ones). There is no triton
kernel (forced, triton raises) and no CUDA kernel of fastbon's: on a GPU a skinny product is bound by streaming the
weights, which cuBLAS already does.
"""

import torch

from .. import dispatch
from . import _checks

# The most rows, and the dtypes, the default choice picks the cpu kernel for (its registry entry in
# fastbon.dispatch): past 32 rows a BLAS GEMM reuses each weight tile over enough rows to be as fast (measured
# crossover between 32 and 64 rows on a 2-core AVX2 EPYC, benchmarks/RESULTS.md); float16 weights are widened by a
# conversion that does not vectorise well yet and ran at half torch's speed.
SKINNY_ROWS = dispatch.entry("skinny_linear", "cpu").default_max_rows
SKINNY_DTYPES = dispatch.entry("skinny_linear", "cpu").dtypes
DEFAULT_DTYPES = dispatch.entry("skinny_linear", "cpu").default_dtypes


def cpu_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the cpu kernel takes a product of ``dtype`` on ``device``, else why not."""
    reason = dispatch.unavailable_reason("cpu", device)
    return reason if reason is not None else dispatch.entry("skinny_linear", "cpu").supports(dtype, device)


def resolve(device: torch.device, dtype: torch.dtype, rows: int, backend: str | None) -> str:
    """The backend of a product (through the registry): the one asked for (argument, then FASTBON_BACKEND), which
    raises where it has no skinny_linear or does not take it; else cpu where it takes the product and it has at
    most ``SKINNY_ROWS`` rows of a dtype it is picked for, else torch (on CUDA tensors: cuBLAS)."""
    return dispatch.resolve("skinny_linear", device, backend, dtype, rows=rows)


def skinny_linear(x, weight, bias=None, *, backend=None):
    """``x · weightᵀ + bias``, as ``torch.nn.functional.linear``, for the few rows of a decode step.

    Args:
        x: [..., in_features], a floating dtype.
        weight: [out_features, in_features], x's dtype and device.
        bias: None or [out_features], x's dtype and device.
        backend: None (pick), "torch", "cpu" or "cuda" (cuBLAS's product, CUDA tensors).

    Returns:
        [..., out_features] in x's dtype, accumulated in float32 (float64 for float64 on torch).

    Example:
        >>> skinny_linear(torch.randn(4, 512), torch.randn(1376, 512)).shape
        torch.Size([4, 1376])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    _checks.tensor("x", x, ndim=x.dim(), dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have in_features={x.shape[-1]} columns (x's last dimension), got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        _checks.shape("bias", bias, (weight.shape[0],))
    in_features = x.shape[-1]
    chosen = resolve(x.device, x.dtype, x.numel() // max(1, in_features), backend)
    if chosen != "cpu" or in_features == 0 or x.numel() == 0:  # empty products: torch's (zeros, or the bias)
        return dispatch.implementation("skinny_linear", chosen if chosen != "cpu" else "torch")(x, weight, bias)
    flat = x.reshape(-1, in_features).contiguous()
    out = dispatch.implementation("skinny_linear", "cpu")(flat, weight.contiguous(),
                                                          None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])
