"""Public entry of the fused sample + score op."""

import math
from dataclasses import dataclass

import torch

from .. import dispatch
from . import _checks


@dataclass
class SamplingParams:
    """Per-row sampling parameters in the dtypes every backend takes (each a tensor [N] on the logits' device)."""

    temperature: torch.Tensor  # float32, >= 0; 0 = greedy
    top_k: torch.Tensor  # int32, >= 0; 0 = off
    top_p: torch.Tensor  # float32, in (0, 1]; 1 = off
    min_p: torch.Tensor  # float32, in [0, 1]; 0 = off
    seed: torch.Tensor  # int64

    def select(self, rows: torch.Tensor) -> "SamplingParams":
        """The parameters of the given rows (when samples leave the batch)."""
        return SamplingParams(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


def _per_row(name, value, num_rows, dtype, device, low, high, *, low_open=False):
    """A scalar or a [num_rows] tensor as a [num_rows] tensor of ``dtype``, checked to lie in its range."""
    integral = not dtype.is_floating_point
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(num_rows)
        if value.dim() != 1 or value.shape[0] != num_rows:
            raise ValueError(f"{name} must be a scalar or a tensor of shape ({num_rows},), got {tuple(value.shape)}")
        if integral and value.dtype.is_floating_point:
            raise TypeError(f"{name} must hold integers, got {value.dtype}")
        value = value.to(device=device, dtype=dtype)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
        kind = "an int" if integral else "a number"
        raise TypeError(f"{name} must be {kind} or a tensor, got {type(value).__name__}")
    else:
        if integral and value >= 2**63:
            raise ValueError(f"{name} must be below 2**63, got {value}")
        value = torch.full((num_rows,), value, dtype=dtype, device=device)
    if value.numel():
        smallest, largest = value.min().item(), value.max().item()
        if value.dtype.is_floating_point and not (math.isfinite(smallest) and math.isfinite(largest)):
            raise ValueError(f"{name} must be finite")
        if smallest < low or (low_open and smallest <= low) or largest > high:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{name} must lie in {interval}, got values in [{smallest}, {largest}]")
    return value.contiguous()


def sampling_params(num_rows, device, *, temperature, top_k, top_p, min_p, seed) -> SamplingParams:
    """Check and normalise scalar-or-tensor sampling parameters for ``num_rows`` rows."""
    return SamplingParams(
        temperature=_per_row("temperature", temperature, num_rows, torch.float32, device, 0.0, math.inf),
        top_k=_per_row("top_k", top_k, num_rows, torch.int32, device, 0, 2**31 - 1),
        top_p=_per_row("top_p", top_p, num_rows, torch.float32, device, 0.0, 1.0, low_open=True),
        min_p=_per_row("min_p", min_p, num_rows, torch.float32, device, 0.0, 1.0),
        seed=_per_row("seed", seed, num_rows, torch.int64, device, -(2**63), 2**63 - 1),
    )


def sample(logits, *, temperature, top_k, top_p, min_p, seed, step, row_index=None, backend=None):
    """Sample one token per row and score it with the model's raw log-probability, in one pass on the device.

    Args:
        logits: [R, V] float logits (NaN or +inf is an error; -inf masks a token; each row needs a finite one).
        temperature: >= 0, 0 = greedy. top_k: >= 0, 0 = off. top_p: in (0, 1], 1 = off. min_p: in [0, 1], 0 = off.
            Each a scalar or a per-row tensor [N].
        seed: int or int tensor [N]; step: int or int tensor (scalar or [N]). Row i's token is a pure function of
            (seed_i, step_i, its logits): Philox-4x32-10, see ``fastbon.ops.philox``.
        row_index: int tensor [N] mapping output row -> logits row (n samples of one prompt share its row without
            a copy); default: one output row per logits row.
        backend: None (pick), "torch", "triton", "cpu" or "cuda".

    Returns:
        tokens int64 [N] and logprobs float32 [N] = log_softmax(logits[row])[token], the unprocessed model
        log-probability (what best-of-n ranks by), whatever the sampling parameters.

    Example:
        >>> tokens, logprobs = sample(logits, temperature=0.8, top_k=0, top_p=0.95, min_p=0.0, seed=0, step=0)
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    num_logit_rows, vocab = logits.shape
    if vocab == 0 or num_logit_rows == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if row_index is None:
        row_index = torch.arange(num_logit_rows, device=logits.device)
    _checks.tensor("row_index", row_index, ndim=1, dtypes=_checks.INT_DTYPES, device=logits.device)
    _checks.in_range("row_index", row_index, 0, num_logit_rows - 1)
    # One reduction finds every bad row: a row's max is NaN with a NaN, +inf with a +inf, -inf when all are -inf.
    row_max = logits.amax(dim=-1)
    if not bool(torch.isfinite(row_max).all()):
        if bool((torch.isnan(row_max) | torch.isposinf(row_max)).any()):
            raise ValueError("logits must not contain NaN or +inf")
        raise ValueError("logits must have a finite value in every row")
    num_rows = row_index.shape[0]
    params = sampling_params(num_rows, logits.device, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, seed=seed)
    steps = _per_row("step", step, num_rows, torch.int64, logits.device, 0, 2**63 - 1)
    return sample_implementation(logits.device, backend, logits.dtype)(
        logits.contiguous(), row_index.to(torch.int64).contiguous(), params.temperature, params.top_k, params.top_p,
        params.min_p, params.seed, steps)


def sample_implementation(device: torch.device, backend: str | None = None, dtype: torch.dtype | None = None):
    """The backend function (contract of ``reference.sample``, inputs unchecked) that runs on ``device`` for logits
    of ``dtype`` (None: any float dtype): resolved once by the decode loop, which calls it every step."""
    return dispatch.implementation("sample", dispatch.resolve("sample", device, backend, dtype))
