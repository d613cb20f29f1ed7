"""dispatch: every op resolves through the one registry; a forced backend that lacks something raises one clear
error, the default choice falls back and logs why once; backends registered at run time; kernels are leaves."""

import ast
import logging
from pathlib import Path

import pytest
import torch

import fastbon
from fastbon import dispatch
from fastbon.ops import reference, sample, select_topk, shared_prefix_attention, skinny_linear, tree_attention

CPU = torch.device("cpu")
KERNELS = Path(__file__).resolve().parents[1] / "kernels"  # the top-level folder fastbon.kernels is made of


def _attention_call(features):
    q = torch.randn(2, 2, 8)
    keys = torch.randn(1, 1, 3, 8)
    suffix = torch.randn(2, 1, 2, 8)
    options = {name: {"window": 2, "softcap": 3.0, "sinks": torch.zeros(2)}[name] for name in features}
    return q, keys, suffix, options


def _call(op, backend, features=(), levels=1):
    """One public call of ``op`` with ``features`` (attention) or ``levels`` (tree) on ``backend``."""
    if op == "shared_prefix_attention":
        q, keys, suffix, options = _attention_call(features)
        return shared_prefix_attention(q, keys, keys, torch.tensor([3], dtype=torch.int32), suffix, suffix,
                                       torch.full((2,), 2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                                       backend=backend, **options)
    if op == "tree_attention":
        q, keys, suffix, options = _attention_call(features)
        level = (keys, keys, torch.tensor([3], dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
        return tree_attention(q, [level] * levels, suffix, suffix, torch.full((2,), 2, dtype=torch.int32),
                              backend=backend, **options)
    if op == "sample":
        return sample(torch.randn(2, 5), temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0,
                      backend=backend)
    if op == "select_topk":
        return select_topk(torch.randn(2, 5), 2, backend=backend)
    return skinny_linear(torch.randn(2, 8), torch.randn(3, 8), backend=backend)


# (op, backend, what the call asks that the backend lacks, the error's words). Backends that cannot run here at all
# are registered as a stand-in with the same registry entries, so every case runs on a CPU-only machine.
DECLINED = [
    ("shared_prefix_attention", "cuda", {"features": ("window",)}, "no window"),
    ("shared_prefix_attention", "cuda", {"features": ("softcap",)}, "no softcap"),
    ("shared_prefix_attention", "cuda", {"features": ("sinks",)}, "no sinks"),
    ("tree_attention", "cuda", {"levels": 3}, "no trees of 3 levels"),
    ("tree_attention", "cuda", {"features": ("window", "sinks")}, "no sinks / window"),
    ("skinny_linear", "triton", {}, "has no skinny_linear"),
]


@pytest.fixture
def stand_in(monkeypatch):
    """The built-in backend ``name``'s registry entries, runnable on CPU tensors (the reference's functions)."""

    def make(name):
        monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
        return name

    return make


@pytest.mark.parametrize(("op", "backend", "asks", "lacks"), DECLINED,
                         ids=[f"{op}-{backend}-{'-'.join(map(str, asks.values())) or 'op'}"
                              for op, backend, asks, _ in DECLINED])
def test_a_forced_backend_that_lacks_something_raises(stand_in, monkeypatch, op, backend, asks, lacks):
    stand_in(backend)
    monkeypatch.delenv("FASTBON_BACKEND", raising=False)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run {op} on cpu: .*{lacks}"):
        _call(op, backend, **asks)
    monkeypatch.setenv("FASTBON_BACKEND", backend)  # forced through the environment: the same error
    with pytest.raises(ValueError, match=lacks):
        _call(op, None, **asks)


@pytest.mark.parametrize(("op", "backend", "asks", "lacks"), DECLINED[:5],
                         ids=[f"{op}-{'-'.join(map(str, asks.values()))}" for op, _, asks, _ in DECLINED[:5]])
def test_the_default_choice_falls_back_and_logs_once(monkeypatch, caplog, op, backend, asks, lacks):
    """With the declining backend first in the default order, the default runs the next one and logs why, once."""
    monkeypatch.delenv("FASTBON_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, device: None)
    monkeypatch.setitem(dispatch._DEFAULT_ORDER["cpu"], op, (backend, "torch"))
    monkeypatch.setattr(dispatch, "_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger="fastbon.dispatch"):
        first = _call(op, None, **asks)
        _call(op, None, **asks)
    warnings = [record.getMessage() for record in caplog.records if record.name == "fastbon.dispatch"]
    assert len(warnings) == 1 and lacks in warnings[0] and "runs on backend 'torch'" in warnings[0], warnings
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("op", dispatch.OPS)
def test_every_op_and_backend_resolves_through_the_registry(op):
    """Each backend the registry lists for an op is what resolve returns when forced (where it can run here), and
    the default choice is one whose entry takes every dtype the op accepts."""
    for backend in dispatch.BACKENDS:
        entry = dispatch.entry(op, backend)
        if entry is None or dispatch.unavailable_reason(backend, CPU) is not None:
            continue
        assert dispatch.resolve(op, CPU, backend, entry.dtypes[0]) == backend
    chosen = dispatch.resolve(op, CPU, None, torch.float32, rows=4)
    assert torch.float32 in dispatch.dtypes(op, chosen) and dispatch.unavailable_reason(chosen, CPU) is None
    chosen = dispatch.resolve(op, CPU, None, torch.float64, rows=4)
    assert torch.float64 in dispatch.dtypes(op, chosen)


def test_a_requested_backend_that_refuses_the_dtype_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend, device: None)
    with pytest.raises(TypeError, match=r"logits must be one of \(float16, bfloat16, float32\) for backend='cuda', "
                                        r"got float64; backends that take float64: torch, triton, cpu"):
        dispatch.resolve("sample", CPU, "cuda", torch.float64)
    with pytest.raises(TypeError, match="q must be one of"):
        dispatch.resolve("shared_prefix_attention", CPU, "triton", torch.float64)


def test_a_registered_backend_runs_only_when_asked_for():
    calls = []

    def counted(op):
        def run(*args):
            calls.append(op)
            return getattr(reference, op)(*args)
        return run

    dispatch.register_backend("counting", {op: counted(op) for op in ("sample", "select_topk")},
                              device_types=("cpu",), dtypes={"select_topk": (torch.float32,)})
    try:
        assert fastbon.backends()["counting"].startswith("available (cpu); ops: sample, select_topk")
        scores = torch.tensor([[0.1, 0.7, 0.3]])
        assert select_topk(scores, 1)[1].tolist() == [[1]] and calls == []
        assert select_topk(scores, 2, backend="counting")[1].tolist() == [[1, 2]] and calls == ["select_topk"]
        tokens, _ = sample(torch.tensor([[0.0, 5.0, -1.0]]), temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                           step=0, backend="counting")
        assert tokens.tolist() == [1] and calls == ["select_topk", "sample"]
        with pytest.raises(TypeError, match="scores must be one of \\(float32\\) for backend='counting'"):
            select_topk(scores.double(), 1, backend="counting")
        with pytest.raises(ValueError, match="has no skinny_linear"):
            skinny_linear(torch.randn(2, 4), torch.randn(3, 4), backend="counting")
        with pytest.raises(ValueError, match="already a backend"):
            dispatch.register_backend("counting", {"sample": counted("sample")}, device_types=("cpu",))
    finally:
        dispatch.unregister_backend("counting")
    assert "counting" not in fastbon.backends()
    with pytest.raises(ValueError, match="backend must be one of"):
        select_topk(torch.tensor([[0.1, 0.7]]), 1, backend="counting")


def test_register_backend_bad_inputs():
    functions = {op: getattr(reference, op) for op in ("sample", "select_topk")}
    cases = [
        (dict(name="cuda"), ValueError, "name"), (dict(name=""), TypeError, "name"),
        (dict(implementations={"nope": reference.sample}), ValueError, "implementations"),
        (dict(implementations={"sample": 1}), TypeError, "implementations"),
        (dict(device_types="cpu"), ValueError, "device_types"), (dict(device_types=()), ValueError, "device_types"),
        (dict(dtypes={"sample": (torch.int32,)}), ValueError, "dtypes"),
        (dict(features={"sample": ("tiles",)}), ValueError, "features"),
    ]
    good = dict(name="bad-input-case", implementations=functions, device_types=("cpu",), dtypes=None)
    for change, error, argument in cases:
        arguments = {**good, **change}
        with pytest.raises(error, match=argument):
            dispatch.register_backend(arguments.pop("name"), arguments.pop("implementations"), **arguments)
    with pytest.raises(ValueError, match="name"):
        dispatch.unregister_backend("never-registered")


def test_kernels_import_nothing_from_fastbon():
    """kernels/ (fastbon.kernels) are leaves: their files import torch, triton and each other, nothing of fastbon."""
    files = sorted(KERNELS.glob("*.py"))
    assert {path.name for path in files} >= {"sample.py", "select_topk.py", "tree_attention.py", "merge_state.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("fastbon"), \
                    f"{path.name}:{node.lineno} imports from {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("fastbon") for alias in node.names), \
                    f"{path.name}:{node.lineno} imports fastbon"
