"""Public entry of the segmented top-k (the best k of n samples per prompt)."""

import torch

from .. import dispatch
from . import _checks


def select_topk(scores, k, *, backend=None):
    """The k best of each row of ``scores``.

    Args:
        scores: [B, n] float32 or float64; NaN is an error, -inf ranks last.
        k: 1 <= k <= n.
        backend: None (pick), "torch", "triton", "cpu" or "cuda".

    Returns:
        (values, indices): [B, k] in scores' dtype and int64, best first; equal scores rank the lower index first.

    Example:
        >>> select_topk(torch.tensor([[0.1, 0.7, 0.7]]), 2)
        (tensor([[0.7000, 0.7000]]), tensor([[1, 2]]))
    """
    _checks.tensor("scores", scores, ndim=2, dtypes=(torch.float32, torch.float64))
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must lie in [1, n={scores.shape[1]}], got {k}")
    if torch.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    chosen = dispatch.resolve("select_topk", scores.device, backend, scores.dtype)
    return dispatch.implementation("select_topk", chosen)(scores.contiguous(), k)
