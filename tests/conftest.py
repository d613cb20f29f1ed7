"""Test-wide settings: Triton runs in its interpreter on CPU-only machines; kernel outputs start poisoned; the
backend tests run each backend on CPU and CUDA tensors, and the cuda backend's kernels also on the CUDA emulator."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTBON_POISON_OUTPUTS"] = "1"

from hypothesis import HealthCheck, settings  # noqa: E402

from fastbon import dispatch  # noqa: E402  (after the environment above)

# Property tests (tests/test_fuzz.py): "ci" (the default) is a fixed, derandomised set of examples that keeps CI
# short; "release" draws 25 times as many fresh examples (README, "Release fuzzing").
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, deadline=None,
                          suppress_health_check=_FUZZ_HEALTH, print_blob=True)
settings.register_profile("release", max_examples=1000, deadline=None, suppress_health_check=_FUZZ_HEALTH,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The backend name under which the CUDA kernels' source runs on CPU tensors, compiled against the CUDA emulator.
EMULATED_CUDA = "cuda-emulated"

BACKEND_CASES = [pytest.param((backend, device), id=f"{backend}-{device}")
                 for device in ("cpu", "cuda") for backend in dispatch.BACKENDS]
BACKEND_CASES.append(pytest.param((EMULATED_CUDA, "cpu"), id=EMULATED_CUDA))


# The share of the profile's examples each backend runs: the Triton interpreter and the CUDA emulator are slow, and
# the torch backend is the reference itself (in its own dtype).
_FUZZ_SHARE = {"torch": 0.25, "triton": 0.2, EMULATED_CUDA: 0.3}


def fuzz_examples(backend: str) -> int:
    """How many hypothesis examples a property test runs on ``backend`` under the loaded profile."""
    return max(1, round(settings().max_examples * _FUZZ_SHARE.get(backend, 1.0)))


@pytest.fixture(scope="session")
def emulated_cuda_backend(tmp_path_factory):
    """csrc/cuda's kernels built against the CUDA emulator (tests/cuda_emulator.py), once per session, and registered
    with the dispatcher as the backend "cuda-emulated" on CPU tensors (the dtypes of the real cuda backend)."""
    import cuda_emulator

    reason = cuda_emulator.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    emulated = cuda_emulator.EmulatedCudaBackend(cuda_emulator.build(tmp_path_factory.mktemp("cuda_emulator")))
    ops = ("shared_prefix_attention", "sample", "select_topk")  # the ops with CUDA kernels of fastbon's own
    dispatch.register_backend(EMULATED_CUDA, {op: getattr(emulated, op) for op in ops}, device_types=("cpu",),
                              dtypes={op: dispatch.dtypes(op, "cuda") for op in ops})
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
