"""Test-wide settings: Triton runs in its interpreter on CPU-only machines; kernel outputs start poisoned."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTBON_POISON_OUTPUTS"] = "1"

from fastbon import dispatch  # noqa: E402  (after the environment above)

BACKEND_CASES = [pytest.param((backend, device), id=f"{backend}-{device}")
                 for device in ("cpu", "cuda") for backend in dispatch.BACKENDS]


@pytest.fixture(params=BACKEND_CASES)
def backend_device(request):
    """(backend, device) for every backend; skipped, with the reason, where it cannot run on this machine."""
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = dispatch.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    return backend, device
