"""Triton-specific cases the per-op tests do not reach: Philox bit-exactness inside a kernel, threshold ties and
single survivors, the largest vocabulary, rows beyond one comparison tile, and the attention tiling edges
(several query tiles per prompt, prompts without samples, an empty prefix everywhere), and a compile of every
kernel for a GPU target on machines without one."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fastbon import dispatch
from fastbon.kernels import philox as triton_philox
from fastbon.ops import reference, sample, select_topk, shared_prefix_attention
from fastbon.ops.philox import philox_uniform

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device(DEVICE)) is not None,
                                reason=str(dispatch.unavailable_reason("triton", torch.device(DEVICE))))


@triton.jit
def _philox_probe(seed_ptr, step_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, triton_philox.philox_uniform(tl.load(seed_ptr + offsets), tl.load(step_ptr + offsets)))


def test_philox_bit_exact_with_torch():
    generator = torch.Generator().manual_seed(2024)
    edges = torch.tensor([0, 1, -1, 2**32 - 1, 2**32, 2**32 + 1, -(2**32), 2**63 - 1, -(2**63), 0x9E3779B9])
    seeds = torch.cat([edges, torch.randint(-(2**63), 2**63 - 1, (1014,), generator=generator)])
    steps = torch.cat([edges.abs().clamp(max=2**63 - 1),
                       torch.randint(0, 2**63 - 1, (507,), generator=generator),
                       torch.randint(0, 4096, (507,), generator=generator)])
    out = torch.full((1024,), float("nan"), device=DEVICE)
    _philox_probe[(1,)](seeds.to(DEVICE), steps.to(DEVICE), out, BLOCK=1024)
    assert torch.equal(out.cpu().double(), philox_uniform(seeds, steps))


def _draw(logits, row_index=None, **params):
    return sample(logits.to(DEVICE), row_index=None if row_index is None else row_index.to(DEVICE),
                  backend="triton", **params)


def test_largest_vocabulary_matches_reference():
    generator = torch.Generator().manual_seed(151936)
    logits = torch.randn(2, 151936, generator=generator) * 4
    row_index = torch.tensor([0, 1, 1])
    params = dict(temperature=torch.tensor([0.9, 1.1, 0.7]), top_k=torch.tensor([40, 0, 0], dtype=torch.int32),
                  top_p=torch.tensor([0.9, 0.8, 1.0]), min_p=torch.tensor([0.0, 0.0, 0.05]),
                  seed=torch.tensor([3, 2**40 + 7, -11]))
    tokens, logprobs = _draw(logits, row_index, step=17, **params)
    expected, _ = reference.sample(logits.double(), row_index, *params.values(), torch.full((3,), 17))
    assert (tokens.cpu() != expected).sum() <= 1
    raw = torch.log_softmax(logits.double(), -1)[row_index, tokens.cpu()]
    torch.testing.assert_close(logprobs.cpu().double(), raw, rtol=1e-5, atol=1e-5)


def test_filters_leaving_one_token():
    """top_k=1, min_p=1 and a tiny top_p each keep only the maximum, on the sampling path (temperature > 0)."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 997, generator=generator) * 2
    draws = 12
    row_index = torch.arange(3).repeat(draws)
    for change in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)):
        params = {**dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0), **change}
        tokens, _ = _draw(logits, row_index, seed=torch.arange(3 * draws), step=0, **params)
        assert torch.equal(tokens.cpu(), logits.argmax(-1)[row_index]), change


def test_ties_at_the_thresholds_are_kept():
    """Three tokens tie for the top: top_k=2 keeps all three (ties kept), and so does a top_p reached inside the
    tie; every draw lands in the tie and each tied token appears."""
    logits = torch.randn(1, 301, generator=torch.Generator().manual_seed(1)) - 10
    logits[0, [17, 150, 299]] = 5.0
    draws = 600
    for params in (dict(top_k=2, top_p=1.0), dict(top_k=0, top_p=0.5)):
        tokens, _ = _draw(logits, torch.zeros(draws, dtype=torch.int64), temperature=1.0, min_p=0.0,
                          seed=torch.arange(draws), step=1, **params)
        counts = torch.bincount(tokens.cpu(), minlength=301)
        assert counts.sum() == counts[[17, 150, 299]].sum() and (counts[[17, 150, 299]] > 150).all(), params


def test_many_ties_agree_with_reference():
    """Few distinct logits, so every threshold falls on a tie; random filters per row; float32 reference."""
    generator = torch.Generator().manual_seed(5)
    rows, vocab = 48, 53
    logits = torch.randint(0, 5, (rows, vocab), generator=generator).float() * 0.7
    params = dict(temperature=torch.rand(rows, generator=generator) + 0.3,
                  top_k=torch.randint(0, 12, (rows,), generator=generator, dtype=torch.int32),
                  top_p=torch.rand(rows, generator=generator) * 0.9 + 0.05,
                  min_p=torch.rand(rows, generator=generator) * 0.3, seed=torch.arange(rows) * 31 - 500)
    row_index = torch.arange(rows)
    tokens, _ = _draw(logits, row_index, step=2**35, **params)
    expected, _ = reference.sample(logits, row_index, *params.values(), torch.full((rows,), 2**35))
    assert (tokens.cpu() != expected).sum() <= 1


def test_topk_rows_longer_than_one_tile():
    generator = torch.Generator().manual_seed(3001)
    scores = torch.randint(0, 400, (2, 3001), generator=generator).double() / 8  # many ties
    scores[1, -5:] = float("-inf")
    for k in (1, 37, 3001):
        values, indices = select_topk(scores.to(DEVICE), k, backend="triton")
        expected_values, expected_indices = torch.sort(scores, dim=-1, descending=True, stable=True)
        assert torch.equal(indices.cpu(), expected_indices[:, :k])
        assert torch.equal(values.cpu(), expected_values[:, :k])


def _attention_inputs(per_prompt, num_q_heads, num_kv_heads, head_dim, prefix_max, suffix_max, seed):
    generator = torch.Generator().manual_seed(seed)
    num_samples = sum(per_prompt)

    def rand(*size):
        return torch.randn(*size, generator=generator)

    prompts = torch.arange(len(per_prompt)).repeat_interleave(torch.tensor(per_prompt))
    sample_to_prompt = prompts[torch.randperm(num_samples, generator=generator)].int()
    return [rand(num_samples, num_q_heads, head_dim), rand(len(per_prompt), num_kv_heads, prefix_max, head_dim),
            rand(len(per_prompt), num_kv_heads, prefix_max, head_dim),
            torch.randint(1, prefix_max + 1, (len(per_prompt),), generator=generator).int() if prefix_max else
            torch.zeros(len(per_prompt), dtype=torch.int32),
            rand(num_samples, num_kv_heads, suffix_max, head_dim),
            rand(num_samples, num_kv_heads, suffix_max, head_dim),
            torch.randint(0, suffix_max + 1, (num_samples,), generator=generator).int(), sample_to_prompt]


def _check_attention(args):
    out = shared_prefix_attention(*[a.to(DEVICE) for a in args], backend="triton").cpu()
    expected = reference.shared_prefix_attention(*[a.double() if a.is_floating_point() else a for a in args],
                                                 scale=args[0].shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_prompt,prefix_max", [
    ((40,), 200),  # 40 samples x 4 heads = 160 rows: three query tiles for one prompt
    ((3, 0, 9, 1), 70),  # a prompt without samples, uneven prompts
    ((2, 5), 0),  # no prefix storage at all
])
def test_attention_tiling_edges(per_prompt, prefix_max):
    _check_attention(_attention_inputs(per_prompt, 8, 2, 24, prefix_max, 6, seed=sum(per_prompt) + prefix_max))


def test_attention_empty_prefix_everywhere():
    args = _attention_inputs((3, 2), 4, 4, 16, 11, 5, seed=12)
    args[3] = torch.zeros(2, dtype=torch.int32)
    _check_attention(args)


def test_attention_rejects_float64_with_a_clear_error():
    args = _attention_inputs((1,), 2, 1, 16, 3, 2, seed=1)
    with pytest.raises(TypeError, match="q must be"):
        shared_prefix_attention(*[a.to(DEVICE).double() if a.is_floating_point() else a.to(DEVICE) for a in args],
                                backend="triton")


_COMPILE_FOR_CUDA = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastbon.kernels import sample, select_topk, tree_attention as attention

def compile_(fn, signature, constexprs, num_warps=4):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

compile_(select_topk._select_topk_kernel, dict(scores_ptr="*fp64", values_ptr="*fp64", indices_ptr="*i64", n="i32",
         k="i32"), dict(BLOCK_J=64, BLOCK_I=256))
compile_(sample._sample_kernel, dict(logits_ptr="*bf16", row_index_ptr="*i64", temperature_ptr="*fp32",
         top_k_ptr="*i32", top_p_ptr="*fp32", min_p_ptr="*fp32", seed_ptr="*i64", step_ptr="*i64", tokens_ptr="*i64",
         logprobs_ptr="*fp32", num_rows="i32", vocab="i32"), dict(BLOCK_R=1, BLOCK_V=4096), num_warps=8)
for (dtype, precision), on in ((("bf16", "tf32"), False), (("fp32", "ieee"), False), (("bf16", "tf32"), True)):
    features = dict(WINDOWED=on, HAS_SOFTCAP=on)
    compile_(attention._level_partial_kernel, dict(q_ptr=f"*{dtype}", keys_ptr=f"*{dtype}", values_ptr=f"*{dtype}",
             suffix_lens_ptr="*i32", index_table_ptr="*i32", level_table_ptr="*i32", partial_o_ptr="*fp32",
             partial_lse_ptr="*fp32", level="i32", qk_scale="fp32", scale_over_cap="fp32", cap_log2="fp32",
             window="i32", num_rows="i32", num_q_heads="i32", num_kv_heads="i32", key_capacity="i32",
             head_dim="i32"),
             dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=128, DOT_PRECISION=precision, INTERPRETED_BF16=False, **features))
    compile_(attention._suffix_merge_kernel, dict(q_ptr=f"*{dtype}", suffix_k_ptr=f"*{dtype}",
             suffix_v_ptr=f"*{dtype}", suffix_lens_ptr="*i32", index_table_ptr="*i32", level_table_ptr="*i32",
             partial_o_ptr="*fp32", partial_lse_ptr="*fp32", sinks_ptr="*fp32", out_ptr=f"*{dtype}",
             qk_scale="fp32", scale_over_cap="fp32", cap_log2="fp32", window="i32", num_levels="i32",
             num_rows="i32", num_q_heads="i32", num_kv_heads="i32", suffix_max="i32", head_dim="i32"),
             dict(BLOCK_G=16, BLOCK_N=32, BLOCK_D=128, DOT_PRECISION=precision, INTERPRETED_BF16=False, **features,
                  HAS_SINKS=on))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
def test_kernels_compile_for_cuda():
    """The interpreter skips the GPU compiler's rules (constexpr globals, loop-carried types, shared memory), so
    compile every kernel for sm_90 ahead of time; needs no GPU, only Triton's bundled ptxas."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_CUDA], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
