"""sample: raw log-probs vs float64 log-softmax, reproducibility per (seed, step), and agreement with the float64
reference draw for the same Philox uniform up to explained rounding (frequencies: test_sampler_statistics.py)."""


import pytest
import sampling_oracle
import torch

from fastbon.ops import sample
from fastbon.ops.philox import philox_uniform


def _logits(rows, vocab, seed, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    logits[:, 1] = float("-inf")  # a masked token in every row
    return logits.to(device=device, dtype=dtype)


# The Triton interpreter's cost grows with rows x vocabulary, and the torch backend sorts every row: fewer rows there.
RANDOM_ROWS = {"triton": 2, "torch": 10}


@pytest.mark.parametrize("vocab", [111, 32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_agrees_with_reference(backend_device, vocab, dtype):
    """Same (seed, step) -> the same Philox uniform -> the same token as the float64 reference, except where float32
    rounding explains the difference: the uniform within rounding of a CDF boundary, or a token within rounding of a
    threshold (sampling_oracle.check_tokens checks each differing row)."""
    backend, device = backend_device
    logits = _logits(3, vocab, seed=vocab, dtype=dtype, device=device)
    # Six chosen rows (greedy, top-k 1, each filter), then random parameters: mismatches, when any, get checked.
    generator = torch.Generator().manual_seed(vocab)
    random_rows = RANDOM_ROWS.get(backend, 42)
    row_index = torch.cat([torch.tensor([0, 0, 1, 2, 2, 1]), torch.randint(0, 3, (random_rows,), generator=generator)])
    temperature = torch.cat([torch.tensor([1.0, 0.0, 0.8, 1.2, 0.6, 1.0]),
                             torch.rand(random_rows, generator=generator) * 1.5 + 0.1])
    top_k = torch.cat([torch.tensor([0, 0, 50, 0, 1, 3]),
                       torch.randint(0, 2, (random_rows,), generator=generator) * torch.randint(
                           1, 200, (random_rows,), generator=generator)]).int()
    top_p = torch.cat([torch.tensor([0.95, 1.0, 0.9, 1.0, 1.0, 0.5]),
                       torch.rand(random_rows, generator=generator).clamp(min=0.05)])
    min_p = torch.cat([torch.tensor([0.0, 0.0, 0.0, 0.02, 0.0, 0.0]),
                       torch.rand(random_rows, generator=generator) * 0.1])
    rows = row_index.shape[0]
    row_index, temperature, top_k, top_p, min_p = (t.to(device) for t in (row_index, temperature, top_k, top_p, min_p))
    seed = torch.arange(rows, device=device) * 7919 + 11
    args = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=3,
                row_index=row_index)
    tokens, logprobs = sample(logits, **args, backend=backend)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32 and tokens.shape == (rows,)
    problems = sampling_oracle.check_tokens(logits, row_index, temperature, top_k, top_p, min_p, seed,
                                            torch.full((rows,), 3), tokens)
    assert not problems, "\n".join(problems)
    assert tokens[1].item() == logits[0].float().argmax().item(), "temperature 0 is greedy"
    assert tokens[4].item() == logits[2].float().argmax().item(), "top_k 1 is greedy"
    raw = torch.log_softmax(logits.double().cpu(), -1)[row_index.cpu(), tokens.cpu()]
    torch.testing.assert_close(logprobs.cpu().double(), raw, rtol=1e-5, atol=1e-5)
    again, _ = sample(logits, **args, backend=backend)
    assert torch.equal(again, tokens), "same seed and step -> same tokens"


def test_reproducible_and_step_dependent(backend_device):
    backend, device = backend_device
    logits = _logits(1, 1000, seed=1, device=device)
    index = torch.zeros(64, dtype=torch.int64, device=device)
    seeds = torch.arange(64, device=device)
    draw = [sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seeds, step=step,
                   row_index=index, backend=backend)[0] for step in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])
    step_tensor = torch.tensor(1, device=device)
    tensor_step, _ = sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seeds, step=step_tensor,
                            row_index=index, backend=backend)
    assert torch.equal(tensor_step, draw[2])


def test_single_survivor_and_masked_rows(backend_device):
    backend, device = backend_device
    logits = torch.full((2, 300), float("-inf"), device=device)
    logits[0, 123] = 0.5
    logits[1, 7] = 2.0
    logits[1, 250] = 2.0 - 30.0
    tokens, logprobs = sample(logits, temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=torch.tensor([4, 5]),
                              step=0, backend=backend)
    assert tokens.tolist() == [123, 7]
    assert torch.isfinite(logprobs).all() and logprobs[0].item() == 0.0


def test_philox_known_answers():
    """Random123's published Philox-4x32-10 vectors, and the uniform's range."""
    from fastbon.ops.philox import philox4x32

    def words(*values):
        return tuple(torch.tensor([v], dtype=torch.int64) for v in values)

    assert [int(w) for w in philox4x32(words(0, 0, 0, 0), words(0, 0))] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(w) for w in philox4x32(words(*[0xFFFFFFFF] * 4), words(0xFFFFFFFF, 0xFFFFFFFF))] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert [int(w) for w in philox4x32(words(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                                       words(0xA4093822, 0x299F31D0))] == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    uniforms = philox_uniform(torch.arange(10000), torch.tensor(3))
    assert 0 <= uniforms.min() and uniforms.max() < 1 and abs(uniforms.mean().item() - 0.5) < 0.02


def test_bad_inputs():
    logits = torch.randn(2, 10)
    good = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0)
    cases = [
        (dict(temperature=-0.1), ValueError, "temperature"), (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"), (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"), (dict(min_p=2.0), ValueError, "min_p"),
        (dict(seed="x"), TypeError, "seed"), (dict(step=-1), ValueError, "step"),
        (dict(temperature=torch.ones(3)), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(row_index=torch.tensor([0, 2])), ValueError, "row_index"),
        (dict(row_index=torch.tensor([0.0])), TypeError, "row_index"),
    ]
    for change, error, name in cases:
        with pytest.raises(error, match=name):
            sample(logits, **{**good, **change})
    for bad_logits in (torch.tensor([[0.0, float("nan")]]), torch.full((1, 3), float("-inf")), logits[0],
                       logits.int()):
        with pytest.raises((ValueError, TypeError), match="logits"):
            sample(bad_logits, **good)
