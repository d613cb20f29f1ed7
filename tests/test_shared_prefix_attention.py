"""shared_prefix_attention: every backend against SDPA over the explicitly expanded cache in float64."""

import pytest
import torch
import torch.nn.functional as F

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
