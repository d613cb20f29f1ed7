"""Property tests (hypothesis) of the three ops on every backend against the torch reference in float64.

Shapes and parameters come from hypothesis, tensor values from a torch generator seeded by a drawn integer (so a
failing case shrinks on its shape, and prints in a few numbers): head dims 1 to 256, GQA ratios 1 to 8, prefix and
suffix lengths including 0 and 1, prompts of different lengths and with no samples, NaN in every unused KV slot;
logits with -inf entries (rows down to one finite token), ties, temperatures 0 and near 0, top-p near 0 and 1,
top-k 0, 1, the vocabulary and beyond, min-p up to 1; scores with ties and -inf.

Example budget (tests/conftest.py registers the profiles): HYPOTHESIS_PROFILE=ci (the default) runs a fixed
(derandomised) set of examples sized for CI; HYPOTHESIS_PROFILE=release runs 25 times as many fresh random ones,
before a release (README, "Release fuzzing"). The Triton interpreter and the CUDA emulator run a kernel far slower
than the C++ backend, so they get fewer examples and smaller sizes.
"""

import math

import sampling_oracle
import torch
from conftest import EMULATED_CUDA, fuzz_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbon import dispatch
from fastbon.ops import sample, select_topk, shared_prefix_attention

SLOW_BACKENDS = ("triton", EMULATED_CUDA)


def _run(backend, strategy, check):
    """check(case) for hypothesis examples of ``strategy``, as many as the profile gives ``backend``."""

    @settings(max_examples=fuzz_examples(backend))
    @given(strategy)
    def run(case):
        check(case)

    run()


def _lengths(draw, count, largest):
    """``count`` lengths in [0, largest], with 0, 1 and ``largest`` likely."""
    choices = st.sampled_from(sorted({0, min(1, largest), largest})) | st.integers(0, largest)
    return draw(st.lists(choices, min_size=count, max_size=count))


@st.composite
def attention_cases(draw, slow):
    num_kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    head_dims = st.integers(1, 48) | st.sampled_from([64, 80, 128] if slow else [64, 80, 128, 256])
    num_prompts = draw(st.integers(1, 4))
    prefix_max = draw(st.sampled_from([0, 1, 2]) | st.integers(0, 80 if slow else 600))
    suffix_max = draw(st.sampled_from([0, 1]) | st.integers(0, 24))
    num_samples = draw(st.integers(1, 6 if slow else 12))
    return dict(
        num_kv_heads=num_kv_heads, num_q_heads=num_kv_heads * group, head_dim=draw(head_dims),
        prefix_max=prefix_max, suffix_max=suffix_max,
        prefix_lens=_lengths(draw, num_prompts, prefix_max), suffix_lens=_lengths(draw, num_samples, suffix_max),
        sample_to_prompt=draw(st.lists(st.integers(0, num_prompts - 1), min_size=num_samples, max_size=num_samples)),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        magnitude=draw(st.sampled_from([0.1, 1.0, 4.0])), scale=draw(st.none() | st.floats(0.01, 2.0)),
        seed=draw(st.integers(0, 2**31 - 1)))


def _attention_inputs(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    num_prompts, num_samples = len(case["prefix_lens"]), len(case["suffix_lens"])
    heads, dim = case["num_kv_heads"], case["head_dim"]

    def rand(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64) * case["magnitude"]

    q = rand(num_samples, case["num_q_heads"], dim)
    prefix_k, prefix_v = rand(num_prompts, heads, case["prefix_max"], dim), rand(num_prompts, heads,
                                                                                  case["prefix_max"], dim)
    suffix_k, suffix_v = rand(num_samples, heads, case["suffix_max"], dim), rand(num_samples, heads,
                                                                                  case["suffix_max"], dim)
    lengths = [torch.tensor(case[name], dtype=torch.int32) for name in ("prefix_lens", "suffix_lens",
                                                                         "sample_to_prompt")]
    for keys, values, valid in ((prefix_k, prefix_v, lengths[0]), (suffix_k, suffix_v, lengths[1])):
        unused = (torch.arange(keys.shape[2]) >= valid[:, None])[:, None, :, None].expand_as(keys)
        keys[unused] = float("nan")  # buffer space past a length: must never reach an output
        values[unused] = float("nan")
    floats = [t.to(device=device, dtype=case["dtype"]) for t in (q, prefix_k, prefix_v, suffix_k, suffix_v)]
    ints = [t.to(device) for t in lengths]
    return floats[0], floats[1], floats[2], ints[0], floats[3], floats[4], ints[1], ints[2]


def test_attention_matches_the_float64_reference(backend_device):
    backend, device = backend_device

    def check(case):
        args = _attention_inputs(case, device)
        out = shared_prefix_attention(*args, scale=case["scale"], backend=backend)
        as_float64 = [a.double().cpu() if a.is_floating_point() else a.cpu() for a in args]
        expected = shared_prefix_attention(*as_float64, scale=case["scale"], backend="torch")
        own = shared_prefix_attention(*[a.cpu() for a in args], scale=case["scale"], backend="torch")
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        assert not torch.isnan(out).any(), "an unwritten (poisoned) output, or NaN from an unused KV slot"
        error = (out.double().cpu() - expected).abs().max().item() if out.numel() else 0.0
        own_error = (own.double() - expected).abs().max().item() if out.numel() else 0.0
        scale = max(1.0, expected.abs().max().item() if out.numel() else 0.0)
        allowed = 2 * own_error + (1e-5 * scale if case["dtype"] == torch.float32 else 1e-3)
        assert error <= allowed, f"error {error:.3g} > {allowed:.3g} (torch's own error {own_error:.3g})"

    _run(backend, attention_cases(backend in SLOW_BACKENDS), check)


@st.composite
def sample_cases(draw, slow, float64):
    vocab = draw(st.integers(1, 300) | st.integers(301, 4000 if slow else 40000))
    num_logit_rows, num_rows = draw(st.integers(1, 3)), draw(st.integers(1, 6 if slow else 16))

    def per_row(strategy):
        return draw(st.lists(strategy, min_size=num_rows, max_size=num_rows))

    return dict(
        vocab=vocab, num_logit_rows=num_logit_rows,
        row_index=per_row(st.integers(0, num_logit_rows - 1)),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16] + [torch.float64] * float64)),
        spread=draw(st.sampled_from([0.0, 0.01, 1.0, 5.0, 30.0])), ties=draw(st.booleans()),
        masked=draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])),
        temperature=per_row(st.just(0.0) | st.sampled_from([1e-4, 1e-2]) | st.floats(0.05, 3.0)),
        top_k=per_row(st.sampled_from([0, 1, vocab, vocab + 7]) | st.integers(0, vocab)),
        top_p=per_row(st.sampled_from([1.0, 1e-6, 1e-3, 0.999, 1 - 1e-7]) | st.floats(0.01, 1.0)),
        min_p=per_row(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        seed=per_row(st.integers(-(2**63), 2**63 - 1)), step=per_row(st.integers(0, 2**40)),
        values_seed=draw(st.integers(0, 2**31 - 1)))


def _logits(case):
    """[R, V] logits: normal * spread (0: all tied), optionally rounded to halves (ties), a fraction at -inf (1.0:
    all but one token of each row)."""
    generator = torch.Generator().manual_seed(case["values_seed"])
    logits = torch.randn(case["num_logit_rows"], case["vocab"], generator=generator, dtype=torch.float64)
    logits = logits * case["spread"]
    if case["ties"]:
        logits = torch.round(logits * 2) / 2
    masked = torch.rand(logits.shape, generator=generator, dtype=torch.float64) < case["masked"]
    survivor = torch.randint(0, case["vocab"], (case["num_logit_rows"],), generator=generator)
    masked[torch.arange(case["num_logit_rows"]), survivor] = False
    return logits.masked_fill(masked, float("-inf")).to(case["dtype"])


def test_sample_draws_the_reference_token_up_to_rounding(backend_device):
    backend, device = backend_device

    def check(case):
        logits = _logits(case)
        num_rows = len(case["row_index"])
        params = dict(row_index=torch.tensor(case["row_index"]), temperature=torch.tensor(case["temperature"]),
                      top_k=torch.tensor(case["top_k"], dtype=torch.int32), top_p=torch.tensor(case["top_p"]),
                      min_p=torch.tensor(case["min_p"]), seed=torch.tensor(case["seed"]),
                      step=torch.tensor(case["step"]))
        tokens, logprobs = sample(logits.to(device), **{name: value.to(device) for name, value in params.items()},
                                  backend=backend)
        assert tokens.shape == (num_rows,) and tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        assert bool(((tokens >= 0) & (tokens < case["vocab"])).all()), f"tokens out of range: {tokens.tolist()}"
        problems = sampling_oracle.check_tokens(logits, **params, tokens=tokens)
        assert not problems, "\n".join(problems)
        raw = torch.log_softmax(logits.double(), -1)[params["row_index"], tokens]
        torch.testing.assert_close(logprobs.double(), raw, rtol=1e-5, atol=1e-5)

    float64 = torch.float64 in dispatch.dtypes("sample", backend)
    _run(backend, sample_cases(backend in SLOW_BACKENDS, float64), check)


@st.composite
def topk_cases(draw, slow):
    n = draw(st.integers(1, 8) | st.integers(9, 300 if slow else 3000))
    return dict(num_prompts=draw(st.integers(1, 5)), n=n, k=draw(st.sampled_from([1, n]) | st.integers(1, n)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                distinct=draw(st.sampled_from([1, 3, 1000000])), minus_inf=draw(st.floats(0.0, 1.0)),
                seed=draw(st.integers(0, 2**31 - 1)))


def test_select_topk_is_the_exact_ranking(backend_device):
    backend, device = backend_device

    def check(case):
        generator = torch.Generator().manual_seed(case["seed"])
        shape = (case["num_prompts"], case["n"])
        scores = torch.randint(0, case["distinct"], shape, generator=generator).double() / 7 - 3
        scores[torch.rand(shape, generator=generator, dtype=torch.float64) < case["minus_inf"]] = -math.inf
        scores = scores.to(case["dtype"])
        values, indices = select_topk(scores.to(device), case["k"], backend=backend)
        for row, (row_values, row_indices) in enumerate(zip(values.cpu().tolist(), indices.cpu().tolist(),
                                                            strict=True)):
            ranked = sorted(range(case["n"]), key=lambda j: (-scores[row, j].item(), j))[:case["k"]]
            assert row_indices == ranked, f"row {row}: {row_indices} != {ranked}"
            assert row_values == [scores[row, j].item() for j in ranked]

    _run(backend, topk_cases(backend in SLOW_BACKENDS), check)

