"""Test-wide settings: Triton runs in its interpreter on CPU-only machines; kernel outputs start poisoned; the
backend tests run each backend on CPU and CUDA tensors, and the cuda backend's kernels also on the CUDA emulator."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTBON_POISON_OUTPUTS"] = "1"

from fastbon import dispatch  # noqa: E402  (after the environment above)

BACKEND_CASES = [pytest.param((backend, device), id=f"{backend}-{device}")
                 for device in ("cpu", "cuda") for backend in dispatch.BACKENDS]
BACKEND_CASES.append(pytest.param(("cuda", "emulated"), id="cuda-emulated"))


@pytest.fixture(scope="session")
def emulated_cuda_backend(tmp_path_factory):
    """csrc/cuda's kernels built against the CUDA emulator (tests/cuda_emulator.py), once per session."""
    import cuda_emulator

    reason = cuda_emulator.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return cuda_emulator.EmulatedCudaBackend(cuda_emulator.build(tmp_path_factory.mktemp("cuda_emulator")))


@pytest.fixture(params=BACKEND_CASES)
def backend_device(request, monkeypatch):
    """(backend, device) for every backend; skipped, with the reason, where it cannot run on this machine.
    ``cuda-emulated`` is ("cuda", "cpu") with the dispatcher routing backend="cuda" on CPU tensors to the emulated
    CUDA kernels, so every backend test runs csrc/cuda's kernel source without a GPU."""
    backend, device = request.param
    if device == "emulated":
        emulated = request.getfixturevalue("emulated_cuda_backend")
        real_reason, real_implementation = dispatch.unavailable_reason, dispatch.implementation
        monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, on: (
            None if (name, on.type) == ("cuda", "cpu") else real_reason(name, on)))
        monkeypatch.setattr(dispatch, "implementation", lambda op, name: (
            getattr(emulated, op) if name == "cuda" else real_implementation(op, name)))
        return "cuda", "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = dispatch.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    return backend, device
