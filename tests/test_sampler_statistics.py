"""sample, statistically: draws against the float64 sampling distribution with a G-test per setting, and every draw
inside the kept set (``sampling_oracle.row_rule``: the tokens kept under some float32 rounding).

The large runs (vocabularies 1,000, 32,000 and 128,256; peaked, flat, Zipf and masked distributions; over 10^6
draws in all, batched: one logits row, many output rows with their own seeds) use the cpu backend, the fast one
here. Every backend (the torch reference, triton in its interpreter, cuda under the emulator) gets a smaller run on a
111-token vocabulary, still thousands of draws per setting. Expected distributions are computed here by sorting, in
float64, independently of the backends' selection code.
"""

import math
import os

import pytest
import sampling_oracle
import torch
from conftest import EMULATED_CUDA

from fastbon import dispatch
from fastbon.ops import sample

# A per-test false-alarm probability: the inputs and seeds are fixed, so a pass is reproducible, and a sampler whose
# distribution is off by a token's mass fails by many orders of magnitude (the p-values of the correct backends
# here are printed on failure and lie far above this).
SIGNIFICANCE = 1e-6
MIN_EXPECTED_PER_BIN = 20

SETTINGS = {  # temperature, top_k, top_p, min_p
    "plain": (1.0, 0, 1.0, 0.0),
    "temperature+top_p": (0.7, 0, 0.9, 0.0),
    "top_k": (1.2, 50, 1.0, 0.0),
    "min_p": (1.0, 0, 1.0, 0.05),
    "all": (0.8, 100, 0.95, 0.01),
}


def expected_distribution(logits_row, temperature, top_k, top_p, min_p):
    """The sampling probabilities of one row in float64, by a full sort: top-k keeps p >= the k-th largest, top-p the
    fewest largest whose mass reaches top_p of that (ties at a cut all kept), min-p keeps p >= min_p * max p."""
    scaled = logits_row.double().cpu() / temperature
    probs = torch.exp(scaled - scaled.max())
    ordered = probs.sort(descending=True).values
    cut = ordered[top_k - 1] if 0 < top_k < probs.numel() else 0.0
    if top_p < 1:
        kept = torch.where(ordered >= cut, ordered, 0)
        crossing = int((kept.cumsum(0) < top_p * kept.sum()).sum())
        cut = max(cut, ordered[min(crossing, probs.numel() - 1)].item())
    kept = torch.where((probs >= max(cut, min_p)) & (probs > 0), probs, 0)
    return kept / kept.sum()


def g_test(counts, expected):
    """(p-value, bins) of the G-test of token counts against probabilities: tokens in decreasing probability, one bin
    per token while its expected count reaches MIN_EXPECTED_PER_BIN, then consecutive tokens pooled until it does;
    the chi-square survival function is the regularised upper incomplete gamma function."""
    draws = counts.sum().item()
    order = expected.argsort(descending=True)
    observed_bins, expected_bins = [], []
    pooled_observed = pooled_expected = 0.0
    for observed, probability in zip(counts[order].tolist(), (expected[order] * draws).tolist(), strict=True):
        if probability == 0:
            break
        pooled_observed += observed
        pooled_expected += probability
        if pooled_expected >= MIN_EXPECTED_PER_BIN:
            observed_bins.append(pooled_observed)
            expected_bins.append(pooled_expected)
            pooled_observed = pooled_expected = 0.0
    if observed_bins:  # the tail joins the last bin
        observed_bins[-1] += pooled_observed
        expected_bins[-1] += pooled_expected
    if len(observed_bins) < 2:
        return 1.0, len(observed_bins)
    observed, expected_counts = torch.tensor(observed_bins), torch.tensor(expected_bins, dtype=torch.float64)
    statistic = 2 * torch.where(observed > 0, observed * torch.log(observed / expected_counts), 0).sum()
    degrees = len(observed_bins) - 1
    return torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2).item(), degrees + 1


def check_draws(logits_row, setting, draws, backend, device, first_seed=0):
    """Draw ``draws`` tokens from one row (one output row per draw, seeds first_seed...), then: every token in the
    kept set, and the G-test against the float64 distribution. Returns the p-value."""
    temperature, top_k, top_p, min_p = setting
    tokens, _ = sample(logits_row[None].to(device), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       seed=torch.arange(first_seed, first_seed + draws, device=device), step=11,
                       row_index=torch.zeros(draws, dtype=torch.int64, device=device), backend=backend)
    counts = torch.bincount(tokens.cpu(), minlength=logits_row.numel())
    rule = sampling_oracle.row_rule(logits_row, temperature, top_k, top_p, min_p)
    outside = torch.nonzero(counts * ~rule.possible).flatten()
    assert outside.numel() == 0, f"drawn outside the kept set: tokens {outside[:10].tolist()}"
    p_value, bins = g_test(counts, expected_distribution(logits_row, *setting))
    assert p_value >= SIGNIFICANCE, f"G-test p = {p_value:.3g} over {bins} bins, {draws} draws"
    return p_value


def distribution(name, vocab, seed):
    """Logits of one row: a peaked, flat, Zipf or partly masked distribution."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(vocab, generator=generator, dtype=torch.float64)
    if name == "peaked":  # three tokens hold about three quarters of the mass
        logits = noise.clone()
        logits[torch.randperm(vocab, generator=generator)[:3]] = torch.tensor([12.0, 11.0, 10.0], dtype=torch.float64)
    elif name == "flat":
        logits = noise * 0.05
    elif name == "zipf":  # p proportional to rank^-1.1, ranks in random vocabulary order
        logits = -1.1 * torch.log1p(torch.randperm(vocab, generator=generator).double())
    else:  # masked: 70 % of the vocabulary at -inf
        logits = noise * 2
        logits[torch.rand(vocab, generator=generator, dtype=torch.float64) < 0.7] = float("-inf")
    return logits.float()


# (vocab, settings, draws per setting) on the cpu backend, for each of the four distributions. A draw costs O(vocab)
# (each output row finds its own thresholds), so most of the 10^6 draws go where they are cheap: 4 x 5 x 47,000 =
# 940,000 on a 1,000-token vocabulary, and 64,000 on the large ones. HYPOTHESIS_PROFILE=release (README, "Release
# fuzzing") multiplies the large runs' draws by 10.
RELEASE = os.environ.get("HYPOTHESIS_PROFILE") == "release"
CPU_RUNS = [
    (1000, tuple(SETTINGS), 47000),
    (32000, ("plain", "top_k", "all"), 4000 * (10 if RELEASE else 1)),
    (128256, ("temperature+top_p", "min_p"), 2000 * (10 if RELEASE else 1)),
]

@pytest.mark.parametrize("name", ["peaked", "flat", "zipf", "masked"])
@pytest.mark.parametrize("vocab,settings,draws", CPU_RUNS, ids=lambda v: str(v) if isinstance(v, int) else "")
def test_cpu_draws_follow_the_distribution(name, vocab, settings, draws):
    if dispatch.unavailable_reason("cpu", torch.device("cpu")) is not None:
        pytest.skip(dispatch.unavailable_reason("cpu", torch.device("cpu")))
    logits = distribution(name, vocab, seed=vocab + len(name))
    for index, setting in enumerate(settings):
        check_draws(logits, SETTINGS[setting], draws, "cpu", "cpu", first_seed=index * draws)


# Draws per setting on the small vocabulary: the interpreter and the emulator run a row at a time.
SMALL_RUN_DRAWS = {"torch": 20000, "cpu": 20000, "triton": 6000, "cuda": 20000, EMULATED_CUDA: 1200}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=str)
def test_every_backend_draws_follow_the_distribution(backend_device, setting):
    backend, device = backend_device
    logits = distribution("masked", 111, seed=3) if setting == "min_p" else distribution("zipf", 111, seed=3)
    logits[5] = float("-inf")
    check_draws(logits, SETTINGS[setting], SMALL_RUN_DRAWS[backend], backend, device)


def test_the_g_test_rejects_a_sampler_off_by_one_token():
    """The test's power: draws from a distribution where one top-p boundary token of the Zipf row is missing (what
    an off-by-one top-p cut would give) fail; the right distribution passes."""
    logits = distribution("zipf", 111, seed=3)
    expected = expected_distribution(logits, *SETTINGS["temperature+top_p"])
    wrong = expected.clone()
    wrong[wrong.nonzero().flatten()[wrong[wrong > 0].argmin()]] = 0
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    right_counts = torch.bincount(torch.multinomial(expected, draws, True, generator=generator), minlength=111)
    wrong_counts = torch.bincount(torch.multinomial(wrong / wrong.sum(), draws, True, generator=generator),
                                  minlength=111)
    assert g_test(right_counts, expected)[0] >= SIGNIFICANCE
    assert g_test(wrong_counts, expected)[0] < SIGNIFICANCE
    assert math.isclose(g_test(torch.tensor([50, 50]), torch.tensor([0.5, 0.5], dtype=torch.float64))[0], 1.0)
