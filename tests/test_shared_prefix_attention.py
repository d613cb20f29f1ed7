"""shared_prefix_attention: every backend against SDPA over the explicitly expanded cache in float64."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EMULATED_CUDA

from fastbon import dispatch
from fastbon.ops import reference, shared_prefix_attention

# (prompts, samples per prompt, Hq, Hkv, D, P_max, T_max)
SHAPES = [
    (1, 1, 4, 4, 64, 1, 1),
    (1, 2, 8, 2, 64, 97, 5),
    (2, 7, 4, 1, 128, 97, 9),
    (1, 16, 8, 4, 64, 1025, 17),
    (3, 2, 6, 3, 40, 33, 4),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, device, seed, shuffled=False):
    num_prompts, per_prompt, num_q_heads, num_kv_heads, head_dim, prefix_max, suffix_max = shape
    generator = torch.Generator().manual_seed(seed)
    num_samples = num_prompts * per_prompt

    def rand(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rand(num_samples, num_q_heads, head_dim)
    prefix_k, prefix_v = rand(num_prompts, num_kv_heads, prefix_max, head_dim), rand(
        num_prompts, num_kv_heads, prefix_max, head_dim)
    suffix_k, suffix_v = rand(num_samples, num_kv_heads, suffix_max, head_dim), rand(
        num_samples, num_kv_heads, suffix_max, head_dim)
    prefix_lens = torch.randint(0, prefix_max + 1, (num_prompts,), generator=generator)
    prefix_lens[0] = prefix_max  # a full prefix always appears
    suffix_lens = torch.randint(1, suffix_max + 1, (num_samples,), generator=generator)
    sample_to_prompt = torch.arange(num_prompts).repeat_interleave(per_prompt)
    if shuffled:
        sample_to_prompt = sample_to_prompt[torch.randperm(num_samples, generator=generator)]
    # Positions past a length are unused buffer space: NaN there must never reach an output.
    for keys, values, lengths in ((prefix_k, prefix_v, prefix_lens), (suffix_k, suffix_v, suffix_lens)):
        unused = torch.arange(keys.shape[2]) >= lengths[:, None]
        keys[unused.to(device)[:, None, :, None].expand_as(keys)] = float("nan")
        values[unused.to(device)[:, None, :, None].expand_as(values)] = float("nan")
    ints = [t.to(device=device, dtype=torch.int32) for t in (prefix_lens, suffix_lens, sample_to_prompt)]
    return q, prefix_k, prefix_v, ints[0], suffix_k, suffix_v, ints[1], ints[2]


def expanded_sdpa(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt, dtype):
    """The independent oracle: per sample, concatenate its prompt's prefix and its suffix, then SDPA (GQA by
    repeating KV heads), computed in ``dtype``."""
    outputs = []
    group = q.shape[1] // prefix_k.shape[1]
    for i in range(q.shape[0]):
        prompt, prefix_len, suffix_len = int(sample_to_prompt[i]), int(prefix_lens[sample_to_prompt[i]]), int(
            suffix_lens[i])
        keys = torch.cat([prefix_k[prompt, :, :prefix_len], suffix_k[i, :, :suffix_len]], dim=1)
        values = torch.cat([prefix_v[prompt, :, :prefix_len], suffix_v[i, :, :suffix_len]], dim=1)
        if keys.shape[1] == 0:
            outputs.append(torch.zeros_like(q[i], dtype=dtype))
            continue
        keys = keys.repeat_interleave(group, dim=0).to(dtype)
        values = values.repeat_interleave(group, dim=0).to(dtype)
        out = F.scaled_dot_product_attention(q[i, :, None].to(dtype), keys, values)
        outputs.append(out[:, 0])
    return torch.stack(outputs)


def _check_close(out, q, args, dtype):
    expected = expanded_sdpa(q, *args, dtype=torch.float64)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN output"
    error = (out.double() - expected).abs().max().item()
    if dtype == torch.float32:
        assert error <= 1e-5 * max(1.0, expected.abs().max().item())
    else:
        own = (expanded_sdpa(q, *args, dtype=dtype).double() - expected).abs().max().item()
        assert error <= 2 * own + 1e-3, f"error {error} vs torch's own {dtype} error {own}"


def test_reference_matches_expanded_sdpa_float64():
    for seed, shape in enumerate(SHAPES):
        q, *args = _inputs(shape, torch.float64, "cpu", seed, shuffled=True)
        out = reference.shared_prefix_attention(q, *args, scale=q.shape[-1] ** -0.5)
        expected = expanded_sdpa(q, *args, dtype=torch.float64)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_matches_oracle(backend_device, shape, dtype):
    backend, device = backend_device
    q, *args = _inputs(shape, dtype, device, seed=hash(shape) % 1000, shuffled=shape[0] > 1)
    out = shared_prefix_attention(q, *args, backend=backend)
    _check_close(out.cpu(), q.cpu(), [a.cpu() for a in args], dtype)


def test_empty_prefix_and_suffix(backend_device):
    backend, device = backend_device
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, s2p = _inputs(
        (2, 3, 4, 2, 64, 9, 4), torch.float32, device, seed=5)
    # The lengths change below, so the NaN that marked unused positions must go.
    prefix_k, prefix_v, suffix_k, suffix_v = (t.nan_to_num(nan=0.5) for t in (prefix_k, prefix_v, suffix_k, suffix_v))
    prefix_lens = torch.tensor([0, 9], dtype=torch.int32, device=device)
    suffix_lens = torch.tensor([0, 2, 4, 0, 1, 0], dtype=torch.int32, device=device)
    args = [prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, s2p]
    out = shared_prefix_attention(q, *args, backend=backend)
    assert torch.all(out[0] == 0), "a query with no keys gets zeros"
    _check_close(out.cpu(), q.cpu(), [a.cpu() for a in args], torch.float32)


def test_custom_scale(backend_device):
    backend, device = backend_device
    q, *args = _inputs((1, 3, 4, 2, 64, 20, 3), torch.float32, device, seed=9)
    out = shared_prefix_attention(q, *args, scale=0.3, backend=backend)
    expected = reference.shared_prefix_attention(q.double().cpu(), *[
        a.double().cpu() if a.is_floating_point() else a.cpu() for a in args], scale=0.3)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    q, pk, pv, pl, sk, sv, sl, s2p = _inputs((1, 2, 4, 2, 16, 5, 3), torch.float32, "cpu", seed=1)
    good = dict(q=q, prefix_k=pk, prefix_v=pv, prefix_lens=pl, suffix_k=sk, suffix_v=sv, suffix_lens=sl,
                sample_to_prompt=s2p)
    cases = [
        ("q", q[0], ValueError), ("q", q.int(), TypeError), ("prefix_k", pk.double(), TypeError),
        ("prefix_v", pv[:, :, :4], ValueError), ("suffix_k", sk[:1], ValueError),
        ("prefix_lens", pl.long(), TypeError), ("prefix_lens", pl + 10, ValueError),
        ("suffix_lens", sl[:1], ValueError), ("sample_to_prompt", s2p + 1, ValueError),
        ("q", q[:, :3], ValueError), ("suffix_lens", sl - 10, ValueError),
    ]
    for name, value, error in cases:
        with pytest.raises(error, match=name if name != "q" or error is TypeError else "q|head"):
            shared_prefix_attention(**{**good, name: value})
    with pytest.raises(ValueError, match="scale"):
        shared_prefix_attention(**good, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        shared_prefix_attention(**good, backend="tpu")


@pytest.mark.parametrize("shared_kib", [227, 99, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_cuda_kernels_fit_the_device_shared_memory(emulated_cuda_backend, shared_kib, dtype):
    """The CUDA kernels size their prefix chunks to the device's opt-in shared memory: at D=128, bfloat16 takes
    the tensor-core kernel with 128-key chunks on an H100 (227 KiB) and 32-key chunks on 99 KiB parts, and the
    CUDA-core kernel at 64 KiB; float32 takes the CUDA-core kernel with 64- or 32-key chunks. Run under the CUDA
    emulator, which refuses a launch over the limit."""
    emulated_cuda_backend.set_shared_memory_limit(shared_kib * 1024)
    try:
        q, *args = _inputs((2, 5, 8, 2, 128, 300, 6), dtype, "cpu", seed=3, shuffled=True)
        out = emulated_cuda_backend.shared_prefix_attention(q, *args, scale=q.shape[-1] ** -0.5)
    finally:
        emulated_cuda_backend.set_shared_memory_limit(227 * 1024)
    _check_close(out, q, args, dtype)


def expanded_features(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt, scale,
                      window=None, softcap=None, sinks=None):
    """An independent float64 oracle for window / soft-cap / sinks: per sample and head, the keys it reads laid out
    by position, the mask of transformers' sliding_window_causal, the soft-cap and sink as in transformers' Gemma 2
    and gpt-oss eager attention."""
    group = q.shape[1] // prefix_k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        prompt = int(sample_to_prompt[i])
        prefix_len, suffix_len = int(prefix_lens[prompt]), int(suffix_lens[i])
        keys = torch.cat([prefix_k[prompt, :, :prefix_len], suffix_k[i, :, :suffix_len]], dim=1).double()
        values = torch.cat([prefix_v[prompt, :, :prefix_len], suffix_v[i, :, :suffix_len]], dim=1).double()
        positions = torch.arange(prefix_len + suffix_len)
        query_position = prefix_len + suffix_len - 1
        visible = positions > query_position - window if window is not None else torch.ones_like(positions).bool()
        for head in range(q.shape[1]):
            scores = keys[head // group] @ q[i, head].double() * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~visible, float("-inf"))
            if sinks is not None:
                scores = torch.cat([scores, sinks[head].double().reshape(1)])
            if scores.numel() == 0 or not torch.isfinite(scores).any():
                continue
            probs = torch.softmax(scores, dim=0)[:keys.shape[1]]
            out[i, head] = probs @ values[head // group].nan_to_num(0.0)
    return out


# (prompts, samples per prompt, Hq, Hkv, D, P_max, T_max): odd sizes, prefixes over several CPU (256) and Triton
# interpreter (128) chunks.
FEATURE_SHAPES = [(2, 3, 4, 2, 24, 300, 7), (3, 2, 6, 3, 40, 33, 5)]
# window relative to the shapes: starts deep in the prefix, just inside the prefix, inside the suffix, of one key,
# covering everything.
WINDOWS = {"prefix_deep": 130, "prefix_edge": 9, "suffix": 3, "one": 1, "everything": 10_000}


def _feature_inputs(shape, dtype, device, seed, varied_suffix):
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt = _inputs(
        shape, dtype, device, seed, shuffled=True)
    if not varied_suffix:  # lockstep decoding: every sample has the same suffix length
        suffix_lens = torch.full_like(suffix_lens, shape[-1])
        suffix_k, suffix_v = suffix_k.nan_to_num(0.25), suffix_v.nan_to_num(0.25)
    return [q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt]


def _check_features(backend, device, shape, dtype, seed, varied_suffix=True, **features):
    q, *args = _feature_inputs(shape, dtype, device, seed, varied_suffix)
    scale = 0.7 / q.shape[-1] ** 0.5
    if features.get("sinks") is not None:
        features["sinks"] = features["sinks"].to(device)
    out = shared_prefix_attention(q, *args, scale=scale, backend=backend, **features).cpu()
    cpu_features = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in features.items()}
    expected = expanded_features(q.cpu(), *[a.cpu() for a in args], scale, **cpu_features)
    assert out.dtype == q.dtype and not torch.isnan(out).any(), "unwritten (poisoned) or NaN output"
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    error = (out.double() - expected).abs().max().item()
    assert error <= tolerance * max(1.0, expected.abs().max().item()), f"error {error}"


WINDOW_CASES = [(FEATURE_SHAPES[0], name) for name in WINDOWS] + [(FEATURE_SHAPES[1], "prefix_edge"),
                                                                  (FEATURE_SHAPES[1], "suffix")]


@pytest.fixture
def feature_backend(backend_device):
    """The backends that implement the features (the emulated CUDA kernels decline them: see
    test_cuda_kernels_decline_features)."""
    if backend_device[0] == EMULATED_CUDA:
        pytest.skip("the CUDA kernels decline window / soft-cap / sinks (test_cuda_kernels_decline_features)")
    return backend_device


@pytest.mark.parametrize(("shape", "window"), WINDOW_CASES, ids=[f"{shape[5]}-{name}" for shape, name in WINDOW_CASES])
def test_window(feature_backend, shape, window):
    backend, device = feature_backend
    _check_features(backend, device, shape, torch.float32, seed=len(window), window=WINDOWS[window])


@pytest.mark.parametrize("varied_suffix", [True, False], ids=["varied_suffix", "lockstep"])
def test_softcap_window_and_sinks_together(feature_backend, varied_suffix):
    backend, device = feature_backend
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2)) * 2
    _check_features(backend, device, FEATURE_SHAPES[0], torch.float32, seed=11, varied_suffix=varied_suffix,
                    window=20, softcap=3.0, sinks=sinks)


@pytest.mark.parametrize("softcap", [0.5, 50.0])
def test_softcap(feature_backend, softcap):
    backend, device = feature_backend
    _check_features(backend, device, FEATURE_SHAPES[1], torch.float32, seed=3, softcap=softcap)


def test_sinks_large_and_small(feature_backend):
    """Sinks that dominate the denominator and sinks that barely count; a query with no keys gets zeros."""
    backend, device = feature_backend
    sinks = torch.tensor([9.0, -9.0, 0.0, 2.5, -1.0, 30.0])
    _check_features(backend, device, FEATURE_SHAPES[1], torch.float32, seed=4, sinks=sinks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_features_in_other_dtypes(feature_backend, dtype):
    backend, device = feature_backend
    if dtype not in dispatch.dtypes("shared_prefix_attention", backend):
        pytest.skip(f"{backend} does not take {dtype}")
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(5))
    _check_features(backend, device, FEATURE_SHAPES[0], dtype, seed=6, window=40, softcap=5.0, sinks=sinks)


def test_cuda_kernels_decline_features(emulated_cuda_backend, monkeypatch):
    """The CUDA kernels implement no window / soft-cap / sinks: forced, a call with one raises ValueError naming the
    features and never reaches the kernel (no silent run on another backend); a call without them runs it."""
    calls = []
    kernel = emulated_cuda_backend.library.fastbon_emulated_shared_prefix_attention
    monkeypatch.setattr(emulated_cuda_backend.library, "fastbon_emulated_shared_prefix_attention",
                        lambda *args: calls.append(1) or kernel(*args))
    with pytest.raises(ValueError, match=f"backend='{EMULATED_CUDA}' cannot run shared_prefix_attention on cpu: "
                                         "no softcap / window"):
        _check_features(EMULATED_CUDA, "cpu", FEATURE_SHAPES[1], torch.float32, seed=8, window=5, softcap=2.0)
    assert not calls
    q, *args = _feature_inputs(FEATURE_SHAPES[1], torch.float32, "cpu", 8, True)
    shared_prefix_attention(q, *args, backend=EMULATED_CUDA)
    assert calls


def test_bad_feature_inputs():
    q, *args = _inputs((1, 2, 4, 2, 16, 5, 3), torch.float32, "cpu", seed=1)
    for name, value, error in [("window", 0, ValueError), ("window", 2.5, ValueError), ("window", True, ValueError),
                               ("softcap", 0.0, ValueError), ("softcap", float("inf"), ValueError),
                               ("sinks", torch.zeros(3), ValueError), ("sinks", torch.zeros(4, dtype=torch.int32),
                                                                       TypeError),
                               ("sinks", torch.zeros(1, 4), ValueError), ("sinks", [0.0] * 4, TypeError),
                               ("sinks", torch.tensor([0.0, float("nan"), 0.0, 0.0]), ValueError)]:
        with pytest.raises(error, match=name):
            shared_prefix_attention(q, *args, **{name: value})


def test_window_skips_prefix_chunks(feature_backend):
    """The kernels never read prefix keys before every row's window (whole CPU chunks of 256 keys, whole Triton key
    blocks): NaN there cannot reach the output. (The torch reference masks them instead.)"""
    backend, device = feature_backend
    if backend == "torch":
        pytest.skip("the torch reference masks the keys before the window, it does not skip them")
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt = _feature_inputs(
        (2, 3, 4, 2, 16, 1025, 5), torch.float32, device, seed=21, varied_suffix=False)
    prefix_lens = torch.full_like(prefix_lens, 1025)
    window = 300  # every query sees prefix keys from 1025 + 5 - 300 = 730 on: keys [0, 512) lie in no window
    clean = [t.nan_to_num(0.5) for t in (prefix_k, prefix_v)]
    args = [clean[0], clean[1], prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt]
    expected = expanded_features(q.cpu(), *[a.cpu() for a in args], 0.25, window=window)
    for tensor in clean:
        tensor[:, :, :512] = float("nan")
    out = shared_prefix_attention(q, *args, scale=0.25, window=window, backend=backend).cpu()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
