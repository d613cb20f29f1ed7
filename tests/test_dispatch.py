"""dispatch: the dtype rule (a backend never receives a dtype it refuses), the default order per device, and the
public registration of backends that the tests use for the emulated CUDA kernels."""

import pytest
import torch

import fastbon
from fastbon import dispatch
from fastbon.ops import reference, sample, select_topk, shared_prefix_attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def every_backend_runs(monkeypatch):
    """Availability as on a CUDA machine where every built-in backend runs, so the default order shows on CPU."""
    monkeypatch.delenv("FASTBON_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)


@pytest.mark.parametrize("op", dispatch.OPS)
def test_cuda_tensors_default_to_triton_until_the_cuda_kernels_are_timed(every_backend_runs, op):
    for dtype in (torch.float32, torch.bfloat16):
        if dtype in dispatch.dtypes(op, "triton"):
            assert dispatch.resolve(op, CUDA, None, dtype) == "triton"


@pytest.mark.parametrize("op", dispatch.OPS)
def test_float64_never_reaches_a_backend_that_refuses_it(every_backend_runs, op):
    for device in (CPU, CUDA):
        chosen = dispatch.resolve(op, device, None, torch.float64)
        assert torch.float64 in dispatch.dtypes(op, chosen), (op, device, chosen)
        unknown = dispatch.resolve(op, device, None, None)  # dtype not known yet: a backend that takes them all
        assert set(dispatch.dtypes(op, "torch")) <= set(dispatch.dtypes(op, unknown)), (op, device, unknown)
    assert dispatch.resolve("shared_prefix_attention", CUDA, None, torch.float64) == "torch"
    assert dispatch.resolve("sample", CUDA, None, torch.float64) == "triton"  # it reads float64, computes float32


def test_a_requested_backend_that_refuses_the_dtype_is_one_clear_error(every_backend_runs):
    with pytest.raises(TypeError, match=r"logits must be one of \(float16, bfloat16, float32\) for backend='cuda', "
                                        r"got float64; backends that take float64: torch, triton, cpu"):
        dispatch.resolve("sample", CUDA, "cuda", torch.float64)
    with pytest.raises(TypeError, match="q must be one of"):
        dispatch.resolve("shared_prefix_attention", CUDA, "triton", torch.float64)
    assert dispatch.resolve("select_topk", CUDA, "cuda", torch.float64) == "cuda"


def test_public_ops_refuse_float64_for_a_backend_that_cannot_take_it(monkeypatch):
    """On this machine: triton's attention refuses float64 before any kernel runs, through the public op."""
    if dispatch.unavailable_reason("triton", CPU) is not None:
        pytest.skip(dispatch.unavailable_reason("triton", CPU))
    q = torch.randn(2, 2, 8, dtype=torch.float64)
    keys = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    lens = torch.tensor([3], dtype=torch.int32)
    suffix = torch.randn(2, 1, 1, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="q must be one of"):
        shared_prefix_attention(q, keys, keys, lens, suffix, suffix, torch.ones(2, dtype=torch.int32),
                                torch.zeros(2, dtype=torch.int32), backend="triton")
    monkeypatch.setenv("FASTBON_BACKEND", "triton")
    with pytest.raises(TypeError, match="q must be one of"):
        shared_prefix_attention(q, keys, keys, lens, suffix, suffix, torch.ones(2, dtype=torch.int32),
                                torch.zeros(2, dtype=torch.int32))


def test_a_registered_backend_runs_only_when_asked_for():
    calls = []

    def counted(op):
        def run(*args):
            calls.append(op)
            return getattr(reference, op)(*args)
        return run

    dispatch.register_backend("counting", {op: counted(op) for op in dispatch.OPS}, device_types=("cpu",),
                              dtypes={op: (torch.float32,) for op in dispatch.OPS})
    try:
        assert "counting" in fastbon.backends() and fastbon.backends()["counting"] == "available (cpu)"
        scores = torch.tensor([[0.1, 0.7, 0.3]])
        assert select_topk(scores, 1)[1].tolist() == [[1]] and calls == []
        assert select_topk(scores, 2, backend="counting")[1].tolist() == [[1, 2]] and calls == ["select_topk"]
        tokens, _ = sample(torch.tensor([[0.0, 5.0, -1.0]]), temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                           step=0, backend="counting")
        assert tokens.tolist() == [1] and calls == ["select_topk", "sample"]
        with pytest.raises(TypeError, match="scores must be one of \\(float32\\) for backend='counting'"):
            select_topk(scores.double(), 1, backend="counting")
        with pytest.raises(ValueError, match="runs on \\('cpu',\\) tensors only"):
            dispatch.resolve("sample", CUDA, "counting", torch.float32)
        with pytest.raises(ValueError, match="already a backend"):
            dispatch.register_backend("counting", {op: counted(op) for op in dispatch.OPS}, device_types=("cpu",))
    finally:
        dispatch.unregister_backend("counting")
    assert "counting" not in fastbon.backends()
    with pytest.raises(ValueError, match="backend must be one of"):
        select_topk(torch.tensor([[0.1, 0.7]]), 1, backend="counting")


def test_register_backend_bad_inputs():
    functions = {op: getattr(reference, op) for op in dispatch.OPS}
    cases = [
        (dict(name="cuda"), ValueError, "name"), (dict(name=""), TypeError, "name"),
        (dict(implementations={"sample": reference.sample}), ValueError, "implementations"),
        (dict(implementations={op: 1 for op in dispatch.OPS}), TypeError, "implementations"),
        (dict(device_types="cpu"), ValueError, "device_types"), (dict(device_types=()), ValueError, "device_types"),
        (dict(dtypes={op: (torch.int32,) for op in dispatch.OPS}), ValueError, "dtypes"),
    ]
    good = dict(name="bad-input-case", implementations=functions, device_types=("cpu",), dtypes=None)
    for change, error, argument in cases:
        arguments = {**good, **change}
        with pytest.raises(error, match=argument):
            dispatch.register_backend(arguments.pop("name"), arguments.pop("implementations"), **arguments)
    with pytest.raises(ValueError, match="name"):
        dispatch.unregister_backend("never-registered")
