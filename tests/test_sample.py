"""sample: raw log-probs vs float64 log-softmax, filtered sets and frequencies vs an independent computation,
reproducibility per (seed, step), and agreement with the reference draw for the same Philox uniform."""

import math

import pytest
import torch

from fastbon.ops import reference, sample
from fastbon.ops.philox import philox_uniform


def _expected_distribution(logits_row, temperature, top_k, top_p, min_p):
    """Sampling probabilities of one row, computed in float64 by plain Python ranking (independent of the ops)."""
    logits = logits_row.double().tolist()
    vocab = len(logits)
    largest = max(logits)
    weights = [math.exp((x - largest) / temperature) if x != -math.inf else 0.0 for x in logits]
    order = sorted(range(vocab), key=lambda j: -weights[j])
    threshold = 0.0
    if 0 < top_k < vocab:
        threshold = weights[order[top_k - 1]]
    if top_p < 1:
        mass = sum(w for w in weights if w >= threshold)
        running = 0.0
        for j in order:
            running += weights[j] if weights[j] >= threshold else 0.0
            if running >= top_p * mass:
                threshold = max(threshold, weights[j])
                break
    threshold = max(threshold, min_p)
    kept = [w if (w >= threshold and w > 0) else 0.0 for w in weights]
    total = sum(kept)
    return torch.tensor([w / total for w in kept], dtype=torch.float64)


def _logits(rows, vocab, seed, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    logits[:, 1] = float("-inf")  # a masked token in every row
    return logits.to(device=device, dtype=dtype)


PARAMS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 0.9, 0.0),
    (1.3, 5, 1.0, 0.0),
    (1.0, 20, 0.8, 0.05),
    (0.5, 0, 1.0, 0.1),
]


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_frequencies_match_probabilities(backend_device, params):
    backend, device = backend_device
    temperature, top_k, top_p, min_p = params
    logits = _logits(1, 111, seed=3, device=device)
    draws = 4000
    tokens, logprobs = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              seed=torch.arange(draws, device=device), step=7,
                              row_index=torch.zeros(draws, dtype=torch.int64, device=device), backend=backend)
    expected = _expected_distribution(logits[0].cpu(), temperature, top_k, top_p, min_p)
    counts = torch.bincount(tokens.cpu(), minlength=111).double()
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    frequency = counts / draws
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 2e-3
    assert torch.all((frequency - expected).abs() <= bound)
    raw = torch.log_softmax(logits[0].double().cpu(), -1)
    torch.testing.assert_close(logprobs.cpu().double(), raw[tokens.cpu()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [111, 32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_agrees_with_reference(backend_device, vocab, dtype):
    """Same (seed, step) -> the same Philox uniform -> the same token as the float64 reference, except where the
    uniform lands within rounding of a CDF boundary (allowed for at most one row in the batch)."""
    backend, device = backend_device
    rows = 6
    logits = _logits(3, vocab, seed=vocab, dtype=dtype, device=device)
    row_index = torch.tensor([0, 0, 1, 2, 2, 1], device=device)
    temperature = torch.tensor([1.0, 0.0, 0.8, 1.2, 0.6, 1.0], device=device)
    top_k = torch.tensor([0, 0, 50, 0, 1, 3], dtype=torch.int32, device=device)
    top_p = torch.tensor([0.95, 1.0, 0.9, 1.0, 1.0, 0.5], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.02, 0.0, 0.0], device=device)
    seed = torch.arange(rows, device=device) * 7919 + 11
    args = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=3,
                row_index=row_index)
    tokens, logprobs = sample(logits, **args, backend=backend)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32 and tokens.shape == (rows,)
    expected_tokens, _ = reference.sample(logits.double().cpu(), row_index.cpu(), temperature.cpu(), top_k.cpu(),
                                          top_p.cpu(), min_p.cpu(), seed.cpu(), torch.full((rows,), 3))
    assert (tokens.cpu() != expected_tokens).sum() <= 1
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
