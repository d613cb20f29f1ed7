"""The C++/OpenMP backend beyond the shared op tests: thread counts, instruction-set variants, Philox bit-exactness,
large shapes (prefix 1025, vocab 128256, bf16), and the torch.library registration (opcheck)."""

import pytest
import torch

from fastbon.ops import reference
from fastbon.ops.philox import philox_uniform

cpp_ops = pytest.importorskip("fastbon._cpp_ops", reason="fastbon._C is not built")
from fastbon import _C  # noqa: E402


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture(params=["native", "avx512", "avx2", "baseline"])
def isa(request, monkeypatch):
    """Each instruction-set variant of the kernels this CPU can run (FASTBON_CPU_ISA lowers the choice). On a CPU
    with AMX, native runs bfloat16 attention on AMX tiles and avx512 the same kernels without them."""
    if request.param != "native":
        monkeypatch.setenv("FASTBON_CPU_ISA", request.param)
        if _C.cpu_isa() != request.param:
            pytest.skip(f"this CPU does not run the {request.param} variant")
    return _C.cpu_isa()


def test_thread_count_reaches_openmp(threads):
    assert _C.openmp_team_size() == threads


def test_philox_bit_exact():
    seeds = torch.cat([torch.arange(-300, 300), torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, -(2**63),
                                                                 -1, 123456789012345, -987654321098765])])
    steps = torch.tensor([0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1])
    seed_grid, step_grid = torch.meshgrid(seeds, steps, indexing="ij")
    cpp = cpp_ops.philox_uniform(seed_grid.reshape(-1).contiguous(), step_grid.reshape(-1).contiguous())
    expected = philox_uniform(seed_grid.reshape(-1), step_grid.reshape(-1))
    assert cpp.dtype == torch.float32
    assert torch.equal(cpp.double(), expected)


def _attention_inputs(num_prompts, per_prompt, q_heads, kv_heads, head_dim, prefix_max, suffix_max, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    samples = num_prompts * per_prompt

    def rand(*size):
        return torch.randn(*size, generator=generator).to(dtype)

    q = rand(samples, q_heads, head_dim)
    prefix_k, prefix_v = rand(num_prompts, kv_heads, prefix_max, head_dim), rand(num_prompts, kv_heads, prefix_max,
                                                                                 head_dim)
    suffix_k, suffix_v = rand(samples, kv_heads, suffix_max, head_dim), rand(samples, kv_heads, suffix_max, head_dim)
    prefix_lens = torch.randint(1, prefix_max + 1, (num_prompts,), generator=generator, dtype=torch.int32)
    prefix_lens[0] = prefix_max
    suffix_lens = torch.randint(0, suffix_max + 1, (samples,), generator=generator, dtype=torch.int32)
    sample_to_prompt = torch.arange(num_prompts, dtype=torch.int32).repeat_interleave(per_prompt)
    sample_to_prompt = sample_to_prompt[torch.randperm(samples, generator=generator)].contiguous()
    return q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt


# Suffix items of fewer than 4 rows take the per-row path: head_dim 64 (2 rows), 40 (1 row) and 128 (2 rows; 64 and
# 128 keep their weighted sums in registers, other head_dims loop in memory).
@pytest.mark.parametrize("shape", [(2, 16, 8, 4, 64, 1025, 300), (3, 5, 4, 4, 40, 700, 9), (1, 32, 8, 1, 128, 513, 2),
                                   (2, 3, 4, 2, 128, 300, 77)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_attention_large(threads, isa, shape, dtype):
    args = _attention_inputs(*shape, dtype=dtype, seed=sum(shape))
    scale = shape[4] ** -0.5
    out = cpp_ops.shared_prefix_attention(*args, scale)
    expected = reference.shared_prefix_attention(*[a.double() if a.is_floating_point() else a for a in args], scale)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("window", [600, 260, 5], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_features_large(threads, isa, window, dtype):
    """Windows that start chunks deep in the prefix, just past a chunk edge (256 keys) and in the suffix, with a
    soft-cap and sinks, over varied suffix lengths (the rows of one prompt start their windows apart) on every
    instruction-set variant (bfloat16 on an AMX CPU takes the vector kernels: AMX knows neither feature)."""
    args = _attention_inputs(2, 16, 8, 4, 64, 1025, 300, dtype=dtype, seed=window)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(window))
    scale = 64 ** -0.5
    out = cpp_ops.shared_prefix_attention(*args, scale, window, 4.0, sinks)
    expected = reference.shared_prefix_attention(*[a.double() if a.is_floating_point() else a for a in args], scale,
                                                 window, 4.0, sinks.double())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def _sample_inputs(rows, vocab, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    logits[:, 5] = float("-inf")
    count = 2 * rows
    row_index = torch.arange(count) % rows
    temperature = torch.tensor([1.0, 0.0, 0.7, 1.3] * (count // 4 + 1))[:count]
    top_k = torch.tensor([0, 0, 50, 0, 1, 3, 1000, 0], dtype=torch.int32).repeat(count // 8 + 1)[:count]
    top_p = torch.tensor([0.95, 1.0, 0.9, 0.5, 1.0, 0.99], dtype=torch.float32).repeat(count // 6 + 1)[:count]
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0], dtype=torch.float32).repeat(count // 5 + 1)[:count]
    seed_values = torch.arange(count) * 104729 - 7 * 2**40
    step = torch.full((count,), 2**33 + 5)
    return logits, row_index, temperature, top_k, top_p, min_p, seed_values, step


@pytest.mark.parametrize("vocab,dtype", [(128256, torch.float32), (128256, torch.bfloat16), (32000, torch.float16),
                                         (50, torch.float64)], ids=str)
def test_sample_large(threads, isa, vocab, dtype):
    args = _sample_inputs(8, vocab, dtype, seed=vocab)
    tokens, logprobs = cpp_ops.sample(*args)
    logits = args[0]
    expected, _ = reference.sample(logits.double(), *args[1:])
    assert (tokens != expected).sum() <= 1, "tokens differ only where u lands within rounding of a CDF boundary"
    raw = torch.log_softmax(logits.double(), -1)[args[1], tokens]
    torch.testing.assert_close(logprobs.double(), raw, rtol=1e-5, atol=1e-5)
    greedy = args[2] == 0
    assert torch.equal(tokens[greedy], logits.float()[args[1][greedy]].argmax(-1))


def test_sample_same_for_any_thread_count():
    args = _sample_inputs(16, 4096, torch.float32, seed=1)
    draws = []
    for count in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        draws.append(cpp_ops.sample(*args))
        torch.set_num_threads(previous)
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_select_topk_rows(threads, dtype):
    scores = torch.randint(0, 5, (33, 257)).to(dtype)
    scores[3, :10] = float("-inf")
    for k in (1, 7, 257):
        values, indices = cpp_ops.select_topk(scores, k)
        expected_values, expected_indices = reference.select_topk(scores, k)
        assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)


def test_torch_library_opcheck():
    args = _attention_inputs(2, 3, 4, 2, 16, 9, 4, dtype=torch.float32, seed=0)
    torch.library.opcheck(torch.ops.fastbon.shared_prefix_attention_out.default,
                          (*args, 0.25, 0, 0.0, None, torch.empty(6, 4, 16)))
    torch.library.opcheck(torch.ops.fastbon.shared_prefix_attention_out.default,
                          (*args, 0.25, 3, 2.0, torch.randn(4), torch.empty(6, 4, 16)))
    sample_args = _sample_inputs(2, 64, torch.float32, seed=0)
    torch.library.opcheck(torch.ops.fastbon.sample_out.default,
                          (*sample_args, torch.empty(4, dtype=torch.int64), torch.empty(4)))
    torch.library.opcheck(torch.ops.fastbon.select_topk_out.default,
                          (torch.randn(3, 8), 3, torch.empty(3, 3), torch.empty(3, 3, dtype=torch.int64)))
    torch.library.opcheck(torch.ops.fastbon.philox_uniform.default, (torch.arange(5), torch.arange(5)))


def test_traces_under_torch_compile():
    """A decode-style call (sample + select) compiles into one graph with the fake kernels."""
    logits, row_index, temperature, top_k, top_p, min_p, seed, step = _sample_inputs(2, 64, torch.float32, seed=3)

    def step_fn(logits):
        tokens, logprobs = cpp_ops.sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step)
        return tokens, cpp_ops.select_topk(logprobs[None], 2)

    compiled = torch.compile(step_fn, backend="aot_eager", fullgraph=True)
    tokens, (values, indices) = compiled(logits)
    expected_tokens, (expected_values, expected_indices) = step_fn(logits)
    assert torch.equal(tokens, expected_tokens) and torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)
