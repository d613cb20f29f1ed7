"""Test-wide settings: Triton runs in its interpreter on CPU-only machines; kernel outputs start poisoned; the
backend tests run each backend on CPU and CUDA tensors, and the cuda backend's kernels also on the CUDA emulator."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTBON_POISON_OUTPUTS"] = "1"

from fastbon import dispatch  # noqa: E402  (after the environment above)

# The backend name under which the CUDA kernels' source runs on CPU tensors, compiled against the CUDA emulator.
EMULATED_CUDA = "cuda-emulated"

BACKEND_CASES = [pytest.param((backend, device), id=f"{backend}-{device}")
                 for device in ("cpu", "cuda") for backend in dispatch.BACKENDS]
BACKEND_CASES.append(pytest.param((EMULATED_CUDA, "cpu"), id=EMULATED_CUDA))


@pytest.fixture(scope="session")
def emulated_cuda_backend(tmp_path_factory):
    """csrc/cuda's kernels built against the CUDA emulator (tests/cuda_emulator.py), once per session, and registered
    with the dispatcher as the backend "cuda-emulated" on CPU tensors (the dtypes of the real cuda backend)."""
    import cuda_emulator

    reason = cuda_emulator.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    emulated = cuda_emulator.EmulatedCudaBackend(cuda_emulator.build(tmp_path_factory.mktemp("cuda_emulator")))
    dispatch.register_backend(EMULATED_CUDA, {op: getattr(emulated, op) for op in dispatch.OPS},
                              device_types=("cpu",), dtypes={op: dispatch.dtypes(op, "cuda") for op in dispatch.OPS})
    yield emulated
    dispatch.unregister_backend(EMULATED_CUDA)


@pytest.fixture(params=BACKEND_CASES)
def backend_device(request):
    """(backend, device) for every backend; skipped, with the reason, where it cannot run on this machine.
    ``cuda-emulated`` runs every backend test through csrc/cuda's kernel source without a GPU."""
    backend, device = request.param
    if backend == EMULATED_CUDA:
        request.getfixturevalue("emulated_cuda_backend")
        return backend, device
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = dispatch.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    return backend, device
