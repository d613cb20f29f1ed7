"""tree_attention: random KV trees on every backend against an independent float64 oracle (each row's path
concatenated, then SDPA), the plan reused without allocation, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import EMULATED_CUDA

from fastbon.ops import tree_attention
from fastbon.ops.tree_attention import TreePlan


def random_tree(seed: int, depth: int, num_q_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.float32,
                device="cpu", nested=True):
    """(q, levels, suffix_k, suffix_v, suffix_lens) of a random tree of ``depth`` levels with uneven fan-out:
    level l has segments whose parents are random segments of level l - 1 (``nested``; else every row picks each
    level's segment at random), lengths 0 and 1 among them, rows spread unevenly over the leaves. Positions past a
    length hold NaN, which must never reach an output."""
    generator = torch.Generator().manual_seed(seed)

    def randint(high, size=()):
        return torch.randint(0, high, size, generator=generator)

    def rand(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    counts = [1 + int(randint(3))]
    parents = []
    for _ in range(1, depth):
        parents.append(randint(counts[-1], (counts[-1] + int(randint(4)),)))
        counts.append(parents[-1].shape[0])
    num_rows = counts[-1] + int(randint(6))
    leaf = torch.cat([torch.arange(counts[-1]), randint(counts[-1], (num_rows - counts[-1],))])
    leaf = leaf[torch.randperm(num_rows, generator=generator)]
    segments = [leaf]
    for level in range(depth - 2, -1, -1):
        segments.insert(0, parents[level][segments[0]] if nested else randint(counts[level], (num_rows,)))
    levels = []
    for level, count in enumerate(counts):
        capacity = int(torch.tensor([0, 1, 3, 40, 300])[randint(5)]) + 1
        lens = randint(capacity + 1, (count,))
        lens[randint(count)] = int(torch.tensor([0, 1])[randint(2)])  # an empty or single-key segment
        keys, values = rand(count, num_kv_heads, capacity, head_dim), rand(count, num_kv_heads, capacity, head_dim)
        unused = torch.arange(capacity) >= lens[:, None]
        keys[unused[:, None, :, None].expand_as(keys)] = float("nan")
        values[unused[:, None, :, None].expand_as(values)] = float("nan")
        levels.append((keys, values, lens.to(torch.int32), segments[level].to(torch.int32)))
    suffix_capacity = 1 + int(randint(9))
    suffix_lens = randint(suffix_capacity + 1, (num_rows,)).to(torch.int32)
    suffix_k, suffix_v = (rand(num_rows, num_kv_heads, suffix_capacity, head_dim) for _ in range(2))
    q = rand(num_rows, num_q_heads, head_dim)

    def on(t):
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    return on(q), [tuple(on(t) for t in level) for level in levels], on(suffix_k), on(suffix_v), on(suffix_lens)


def path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens, window=None, softcap=None, sinks=None):
    """The independent oracle in float64: per row, its path's keys concatenated (levels root first, then its suffix),
    the window as the last ``window`` positions, soft-cap on the scores, sinks as a value-less key; SDPA-style."""
    q = q.double().cpu()
    group = q.shape[1] // suffix_k.shape[1]
    outputs = []
    for i in range(q.shape[0]):
        keys, values = [], []
        for level_k, level_v, lens, segments in levels:
            segment = int(segments[i])
            keys.append(level_k[segment, :, :int(lens[segment])])
            values.append(level_v[segment, :, :int(lens[segment])])
        keys.append(suffix_k[i, :, :int(suffix_lens[i])])
        values.append(suffix_v[i, :, :int(suffix_lens[i])])
        keys = torch.cat(keys, dim=1).double().cpu().repeat_interleave(group, dim=0)
        values = torch.cat(values, dim=1).double().cpu().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,htd->ht", q[i], keys) / math.sqrt(q.shape[-1])
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if window is not None:
            scores[:, :max(0, keys.shape[1] - window)] = float("-inf")
        if sinks is not None:
            scores = torch.cat([scores, sinks.double().cpu()[:, None]], dim=1)
            values = torch.cat([values, values.new_zeros(values.shape[0], 1, values.shape[2])], dim=1)
        if scores.shape[1] == 0 or torch.isneginf(scores).all():
            outputs.append(torch.zeros_like(q[i]))
            continue
        outputs.append(torch.einsum("ht,htd->hd", torch.softmax(scores, dim=1), values))
    return torch.stack(outputs)


def test_oracle_matches_sdpa_without_features():
    """The oracle's own arithmetic against torch's SDPA on one random tree."""
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(0, 3, dtype=torch.float64)
    expected = path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens)
    for i in range(q.shape[0]):
        keys = torch.cat([k[int(s[i]), :, :int(lens[int(s[i])])] for k, _, lens, s in levels] +
                         [suffix_k[i, :, :int(suffix_lens[i])]], dim=1).repeat_interleave(2, dim=0)
        values = torch.cat([v[int(s[i]), :, :int(lens[int(s[i])])] for _, v, lens, s in levels] +
                           [suffix_v[i, :, :int(suffix_lens[i])]], dim=1).repeat_interleave(2, dim=0)
        if keys.shape[1]:
            out = F.scaled_dot_product_attention(q[i, :, None], keys, values)[:, 0]
            torch.testing.assert_close(expected[i], out, rtol=1e-12, atol=1e-12)


def _declines(backend, device, depth, features=()):
    """What the registry says ``backend`` lacks for such a tree (None: it takes it). A forced backend that lacks
    something raises one ValueError naming it, never runs another backend silently."""
    from fastbon import dispatch

    return dispatch.entry("tree_attention", backend).supports(None, torch.device(device), features, depth)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("nested", [True, False], ids=["tree", "any-map"])
def test_random_trees_match_oracle(backend_device, depth, nested):
    backend, device = backend_device
    if _declines(backend, device, depth) is not None:
        q, levels, suffix_k, suffix_v, suffix_lens = random_tree(depth, depth, device=device)
        with pytest.raises(ValueError, match=f"no trees of {depth} levels"):
            tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=backend)
        return
    dtypes = [torch.float32] if backend in ("triton", EMULATED_CUDA) else [torch.float32, torch.float64]
    for dtype in dtypes:
        for seed in range(3 if backend in ("triton", EMULATED_CUDA) else 6):
            q, levels, suffix_k, suffix_v, suffix_lens = random_tree(100 * depth + seed, depth, dtype=dtype,
                                                                     device=device, nested=nested)
            out = tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=backend)
            expected = path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens)
            assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN output"
            tolerance = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("isa", ["native", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features", [{}, {"window": 200}, {"softcap": 5.0}], ids=["plain", "window", "softcap"])
def test_cpu_row_bits_do_not_depend_on_rows_sharing_its_block(monkeypatch, isa, dtype, features):
    """The cpu kernel reads a block with few query rows (< 4: a sample's own keys) on one path and with many (a
    prompt's n samples) on a matrix path; both score with the same lane-folded dot products and sum in the same
    order, so a row's output has the same bits whether 1, 2, 3, 4, 5 or 8 rows share its block: the engine needs
    no padding rows to keep a request's bits independent of the load. Each call also matches the float64 oracle."""
    if isa != "native":
        monkeypatch.setenv("FASTBON_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(7)
    heads, head_dim, length = 2, 64, 300  # two key chunks, the second partial
    keys, values = (torch.randn(1, heads, length, head_dim, generator=generator).to(dtype) for _ in range(2))
    queries = torch.randn(8, heads, head_dim, generator=generator).to(dtype)
    alone = None
    for rows in (1, 2, 3, 4, 5, 8):
        level = (keys, values, torch.tensor([length], dtype=torch.int32), torch.zeros(rows, dtype=torch.int32))
        suffix = torch.zeros(rows, heads, 1, head_dim, dtype=dtype)
        lens = torch.zeros(rows, dtype=torch.int32)
        out = tree_attention(queries[:rows], [level], suffix, suffix, lens, backend="cpu", **features)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), path_sdpa(queries[:rows], [level], suffix, suffix, lens, **features),
                                   rtol=tolerance, atol=tolerance)
        if alone is None:
            alone = out[0]
        assert torch.equal(out[0], alone), f"row 0 changed its bits with {rows} rows on its block"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_trees(backend_device, dtype):
    backend, device = backend_device
    if _declines(backend, device, 3) is not None:
        pytest.skip(_declines(backend, device, 3))
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(7, 3, dtype=dtype, device=device)
    out = tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=backend)
    # The oracle on the same rounded inputs: what is left is the kernels' float32 accumulation and output rounding.
    expected = path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("features", [dict(window=5), dict(window=60), dict(softcap=3.0), dict(sinks=True),
                                      dict(window=7, softcap=2.0, sinks=True)],
                         ids=lambda f: "-".join(f))
def test_features_on_trees(backend_device, features):
    """Windows across levels, soft-cap and sinks; the cuda kernels implement none of them (nor deeper trees):
    forced, they raise ValueError naming what they lack."""
    backend, device = backend_device
    lacking = _declines(backend, device, 3, tuple(features))
    if lacking is not None:
        q, levels, suffix_k, suffix_v, suffix_lens = random_tree(50, 3, device=device)
        options = {**features, "sinks": torch.zeros(q.shape[1])} if features.get("sinks") else dict(features)
        with pytest.raises(ValueError, match="cannot run tree_attention"):
            tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=backend, **options)
        return
    for seed in range(2):
        q, levels, suffix_k, suffix_v, suffix_lens = random_tree(50 + seed, 3, device=device)
        options = dict(features)
        if options.get("sinks"):
            options["sinks"] = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(seed)).to(device)
        out = tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=backend, **options)
        expected = path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens, **options)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_one_level_tree_runs_a_two_level_backend(emulated_cuda_backend, monkeypatch):
    """A backend without a tree kernel (the cuda kernels, here under the emulator) serves a one-level tree with its
    own shared-prefix kernel; forced on a deeper tree it raises, and the kernel is never called."""
    calls = []
    kernel = emulated_cuda_backend.library.fastbon_emulated_shared_prefix_attention
    monkeypatch.setattr(emulated_cuda_backend.library, "fastbon_emulated_shared_prefix_attention",
                        lambda *args: calls.append(1) or kernel(*args))
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(9, 1)
    out = tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=EMULATED_CUDA)
    torch.testing.assert_close(out.double(), path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens), rtol=1e-5,
                               atol=1e-5)
    assert len(calls) == 1
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(9, 3)
    with pytest.raises(ValueError, match=f"backend='{EMULATED_CUDA}' cannot run tree_attention on cpu: no trees of 3"):
        tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, backend=EMULATED_CUDA)
    assert len(calls) == 1


def _memory_events(function):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    return [event for event in profile.events() if event.cpu_memory_usage > 0]


def test_cpu_run_allocates_nothing():
    """Plan once, run per layer: the cpu backend's run reuses the plan's workspace and output buffer."""
    pytest.importorskip("fastbon._C")
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(3, 3, num_q_heads=8, num_kv_heads=2, head_dim=64)
    plan = TreePlan([level[2] for level in levels], torch.stack([level[3] for level in levels]), suffix_k.shape[2],
                    8, 2, 64, q.dtype, q.device, "cpu")
    keys, values = [level[0] for level in levels], [level[1] for level in levels]

    def run():
        return plan.run(q, keys, values, suffix_k, suffix_v, suffix_lens, 0.125, 5)

    first = run()
    assert _memory_events(run) == [], "the per-layer call allocated"
    assert run() is first, "one output buffer per plan"
    torch.testing.assert_close(first.double(), path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens, window=5),
                               rtol=1e-5, atol=1e-5)


def test_triton_run_reuses_the_plan():
    """The triton backend's run launches on the plan's buffers: grouping, tiles and partials are made once."""
    from fastbon import dispatch

    if dispatch.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton cannot run here")
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(4, 2)
    plan = TreePlan([level[2] for level in levels], torch.stack([level[3] for level in levels]), suffix_k.shape[2],
                    4, 2, 32, q.dtype, q.device, "triton")
    partials = plan.state.partial_o.data_ptr()
    keys, values = [level[0] for level in levels], [level[1] for level in levels]
    out = plan.run(q, keys, values, suffix_k, suffix_v, suffix_lens, 32 ** -0.5)
    assert plan.run(q, keys, values, suffix_k, suffix_v, suffix_lens, 32 ** -0.5) is out
    assert plan.state.partial_o.data_ptr() == partials
    torch.testing.assert_close(out.double(), path_sdpa(q, levels, suffix_k, suffix_v, suffix_lens), rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs():
    q, levels, suffix_k, suffix_v, suffix_lens = random_tree(1, 2)
    keys, values, lens, segments = levels[1]
    cases = [
        ([levels[0], (keys, values, lens, segments + 100)], "segments"),
        ([levels[0], (keys, values, lens + 1000, segments)], "lens"),
        ([levels[0], (keys.double(), values, lens, segments)], "keys"),
        ([levels[0], (keys, values[:, :1], lens, segments)], "values"),
        ([levels[0], (keys, values, lens.long(), segments)], "lens"),
        ([levels[0], (keys, values, lens, segments[:1])], "segments"),
        ([levels[0], (keys, values, lens)], r"levels\[1\]"),
    ]
    for bad_levels, name in cases:
        with pytest.raises((TypeError, ValueError), match=name):
            tree_attention(q, bad_levels, suffix_k, suffix_v, suffix_lens)
    with pytest.raises(ValueError, match="suffix_lens"):
        tree_attention(q, levels, suffix_k, suffix_v, suffix_lens + 100)
    with pytest.raises(TypeError, match="levels"):
        tree_attention(q, levels[0], suffix_k, suffix_v, suffix_lens)
