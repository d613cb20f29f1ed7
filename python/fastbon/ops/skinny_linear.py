"""Public entry of the skinny matrix product: y = x · weightᵀ + bias for the few rows of a decode step.

A decode step multiplies a handful of rows (the live samples) by every weight matrix of the model. On CPU these
products set the pace of the step, and the BLAS torch calls (MKL) runs them far below the machine's bandwidth
(benchmarks/RESULTS.md); the ``cpu`` backend's kernel (csrc/cpu/linear.cpp) streams each weight matrix once for all
rows. ``fastbon.hf.SkinnyLinears`` routes the model's ``nn.Linear`` products to it inside fastbon's decode steps.

Backends: ``torch`` (``torch.nn.functional.linear``, any device: the reference) and ``cpu`` (float32, bfloat16 and
float16 CPU tensors, any number of rows; picked by default for float32 and bfloat16 up to ``SKINNY_ROWS`` rows).
The cpu kernel sums every output in one fixed order whatever the number of rows, so a row's result does not depend
on the rest of its batch: fastbon's decode steps run all their products on it (``hf.SkinnyLinears``), and a call
split into waves (``max_memory``) gives the bits of one wave. torch's BLAS gives no such promise (MKL's float32
GEMM rounds batches of 1-3, 5-7 and 9-11 rows differently from wider ones). There is no triton or
cuda kernel: on a GPU a skinny product is bound by streaming the weights, which cuBLAS already does, so CUDA tensors
take torch's.
"""

import os

import torch

from .. import dispatch
from . import _checks

# The most rows the public op picks the cpu kernel for by default: past it, a BLAS GEMM reuses each weight tile over
# enough rows to be as fast (measured crossover between 32 and 64 rows on a 2-core AVX2 EPYC, benchmarks/RESULTS.md).
SKINNY_ROWS = 32
# What the cpu kernel takes, and the dtypes it is picked for by default: those where it measured faster than torch's
# (float16 weights are widened by a conversion that does not vectorise well yet and ran at half torch's speed).
SKINNY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_DTYPES = (torch.float32, torch.bfloat16)
BACKENDS = ("torch", "cpu")


def cpu_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the cpu kernel takes a product of ``dtype`` on ``device``, else why not."""
    reason = dispatch.unavailable_reason("cpu", device)
    if reason is not None:
        return reason
    if dtype not in SKINNY_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SKINNY_DTYPES)
        return f"the cpu kernel takes {names}, not {str(dtype).removeprefix('torch.')}"
    return None


def resolve(device: torch.device, dtype: torch.dtype, rows: int, backend: str | None) -> str:
    """The backend of a product: the one asked for (argument, then FASTBON_BACKEND), else cpu where it takes the
    product and it has at most ``SKINNY_ROWS`` rows, else torch. FASTBON_BACKEND naming a backend without this op
    (triton, cuda, a registered one) means torch's product, the one the model runs anyway."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    requested = backend if backend is not None else os.environ.get("FASTBON_BACKEND") or None
    if requested == "cpu":
        reason = cpu_reason(device, dtype)
        if reason is not None:
            raise ValueError(f"backend='cpu' cannot run skinny_linear here: {reason}")
        return "cpu"
    if requested is not None or dtype not in DEFAULT_DTYPES:
        return "torch"
    return "cpu" if rows <= SKINNY_ROWS and cpu_reason(device, dtype) is None else "torch"


def skinny_linear(x, weight, bias=None, *, backend=None):
    """``x · weightᵀ + bias``, as ``torch.nn.functional.linear``, for the few rows of a decode step.

    Args:
        x: [..., in_features], a floating dtype.
        weight: [out_features, in_features], x's dtype and device.
        bias: None or [out_features], x's dtype and device.
        backend: None (pick), "torch" or "cpu".

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
    if chosen == "torch" or in_features == 0 or x.numel() == 0:  # empty products: torch's (zeros, or the bias)
        return torch.nn.functional.linear(x, weight, bias)
    from .. import _cpp_ops

    flat = x.reshape(-1, in_features).contiguous()
    out = _cpp_ops.skinny_linear(flat, weight.contiguous(), None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])
