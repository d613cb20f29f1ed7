"""skinny_linear: the cpu kernel against a float64 product, on every instruction-set variant, and its routing of
a decode step's linear layers (routing.SkinnyLinears): per thread, only products it computes as asked."""

import threading

import pytest
import torch
from hf_models import VOCAB, tiny_model

import fastbon
from fastbon import _cpp_ops, routing
from fastbon.ops import skinny_linear
from fastbon.ops.skinny_linear import SKINNY_ROWS

pytest.importorskip("fastbon._C")

ISAS = ["native", "avx512", "avx2", "baseline"]


def _inputs(rows, in_features, out_features, dtype, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    return x, weight, torch.randn(out_features, generator=generator).to(dtype) if bias else None


def _float64(x, weight, bias):
    return torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 31, SKINNY_ROWS, SKINNY_ROWS + 1, 101])
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (7, 2), (97, 111), (512, 1025), (130, 4)])
def test_float32_against_float64(monkeypatch, isa, rows, in_features, out_features):
    if isa != "native":
        monkeypatch.setenv("FASTBON_CPU_ISA", isa)
    for bias in (True, False):
        x, weight, b = _inputs(rows, in_features, out_features, torch.float32, rows * in_features + out_features, bias)
        got = skinny_linear(x, weight, b, backend="cpu")  # outputs start poisoned (conftest): all written
        expected = _float64(x, weight, b)
        scale = (x.double().abs() @ weight.double().abs().T).max()  # the magnitude the sums pass through
        assert got.dtype == torch.float32 and got.shape == (rows, out_features)
        assert torch.isfinite(got).all()
        assert (got.double() - expected).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,in_features,out_features",
                         [(1, 64, 3), (4, 512, 1376), (9, 97, 111), (32, 33, 7), (45, 97, 700)])
def test_16_bit_within_twice_torchs_own_error(monkeypatch, isa, dtype, rows, in_features, out_features):
    if isa != "native":
        monkeypatch.setenv("FASTBON_CPU_ISA", isa)
    x, weight, bias = _inputs(rows, in_features, out_features, dtype, rows + in_features)
    expected = _float64(x, weight, bias)
    ours = (skinny_linear(x, weight, bias, backend="cpu").double() - expected).abs().max()
    torchs = (torch.nn.functional.linear(x, weight, bias).double() - expected).abs().max()
    assert ours <= 2 * torchs + 1e-6 * expected.abs().max()


def test_leading_dimensions_and_strided_x():
    x = torch.randn(2, 3, 10, 64)[:, :, 1, :]  # [2, 3, 64], not contiguous
    weight, bias = torch.randn(40, 64), torch.randn(40)
    got = skinny_linear(x, weight, bias, backend="cpu")
    assert got.shape == (2, 3, 40)
    assert torch.allclose(got, torch.nn.functional.linear(x, weight, bias), atol=1e-5)


def test_the_same_inputs_give_the_same_bits():
    x, weight, bias = _inputs(7, 300, 500, torch.float32, 3)
    first = skinny_linear(x, weight, bias, backend="cpu")
    assert all(torch.equal(first, skinny_linear(x, weight, bias, backend="cpu")) for _ in range(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_rows_bits_do_not_depend_on_its_batch(dtype):
    """Every output is one dot product summed in a fixed order: a row gives the same bits alone, at any place in a
    narrow batch, and in a wide one (chunks of rows over panels of weights), so waves equal one wave."""
    x, weight, bias = _inputs(300, 520, 2000, dtype, 11)  # 2000 x 520 x 4 bytes: several L2 panels
    wide = skinny_linear(x, weight, bias, backend="cpu")
    for start, stop in [(0, 1), (299, 300), (5, 8), (100, 131), (17, 50), (1, 300)]:
        assert torch.equal(skinny_linear(x[start:stop], weight, bias, backend="cpu"), wide[start:stop])


def test_default_backend_follows_the_kernel_reach(monkeypatch):
    calls = []
    real = _cpp_ops.skinny_linear
    monkeypatch.setattr(_cpp_ops, "skinny_linear", lambda *args: calls.append(1) or real(*args))
    weight = torch.randn(16, 8)
    skinny_linear(torch.randn(SKINNY_ROWS, 8), weight)
    assert len(calls) == 1, "float32 with few rows: the cpu kernel"
    for x, w in [(torch.randn(SKINNY_ROWS + 1, 8), weight), (torch.randn(2, 8).double(), weight.double()),
                 (torch.randn(2, 8).half(), weight.half())]:
        assert torch.equal(skinny_linear(x, w), torch.nn.functional.linear(x, w))
    assert len(calls) == 1, "more rows, float64 and float16 take torch's product"
    monkeypatch.setenv("FASTBON_BACKEND", "torch")
    skinny_linear(torch.randn(2, 8), weight)
    assert len(calls) == 1


def test_bad_inputs():
    x, weight = torch.randn(2, 8), torch.randn(16, 8)
    with pytest.raises(TypeError, match="weight"):
        skinny_linear(x, weight.double())
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(x, torch.randn(16, 9))
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, weight, torch.randn(15))
    with pytest.raises(TypeError, match="x"):
        skinny_linear([1.0], weight)
    with pytest.raises(ValueError, match="backend"):
        skinny_linear(x, weight, backend="triton")
    with pytest.raises(TypeError, match="x must be one of .* for backend='cpu', got float64"):
        skinny_linear(x.double(), weight.double(), backend="cpu")  # a dtype error, as for every op


def _counting(monkeypatch):
    calls = []
    real = _cpp_ops.skinny_linear
    monkeypatch.setattr(_cpp_ops, "skinny_linear", lambda *args: calls.append(threading.get_ident()) or real(*args))
    return calls


def test_the_routing_holds_for_its_own_thread_only(monkeypatch):
    calls = _counting(monkeypatch)
    layer = torch.nn.Linear(8, 16)
    x = torch.randn(3, 8)
    other = []
    with torch.no_grad(), routing.SkinnyLinears():
        routed = layer(x)
        thread = threading.Thread(target=lambda: other.append(layer(x)))
        thread.start()
        thread.join()
    assert calls == [threading.get_ident()], "the other thread's product is torch's"
    assert torch.allclose(routed, other[0], atol=1e-6)


def test_products_that_need_a_gradient_are_not_routed(monkeypatch):
    calls = _counting(monkeypatch)
    layer = torch.nn.Linear(8, 16)
    with routing.SkinnyLinears():
        out = layer(torch.randn(3, 8))
    assert not calls and out.grad_fn is not None
    with torch.no_grad(), routing.SkinnyLinears():
        layer.double()(torch.randn(2, 8).double())  # a dtype it does not take
    assert not calls


def test_decode_steps_and_prefills_run_the_kernel(monkeypatch):
    calls = _counting(monkeypatch)
    model = tiny_model("llama")
    prompts = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    result = fastbon.generate(model, prompts, n=3, max_new_tokens=4, seed=0)
    linears = sum(isinstance(module, torch.nn.Linear) for module in model.modules())
    # Every linear layer of every forward: the decode steps' and the two prompts' prefills (one chunk each), so no
    # product depends on the BLAS's thread count.
    assert len(calls) == (result.stats["forwards"] + 2) * linears and result.stats["forwards"] <= 4
    calls.clear()
    torch_result = fastbon.generate(model, prompts, n=3, max_new_tokens=4, seed=0, backend="torch")
    assert not calls
    assert torch.equal(result.sequences, torch_result.sequences)
