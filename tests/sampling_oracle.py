"""What a sampler may return for one row, computed in float64 from the sampling rule itself (independent of
``fastbon.ops.reference``, which is one of the backends tested against it), and when a backend's token that differs
from that float64 draw is explained by float32 rounding.

Every backend draws with the same Philox uniform u (``fastbon.ops.philox``), so a backend's token can differ from the
float64 reference only where float32 arithmetic moves a decision: a probability within rounding of a threshold (a
token kept or not), or u within rounding of a CDF boundary (the neighbouring token drawn). ``mismatch_reason``
accepts a token exactly when such a rounding explains it, with the rounding bounded as follows (u_r = 2^-24, float32's
unit roundoff; |x| the largest finite logit magnitude; T the temperature):

* each probability p_j = exp(x_j / T - max x / T): the exponent's two roundings are worth |x| / T units of u_r
  each, and the exp itself a few (the CUDA ``__expf`` about 2 ulp): relative error ``RELATIVE_P`` = 16 u_r
  (4 + |x| / T);
* the masses (top-p's cumulative mass, the draw's CDF): the kernels add float32 in blocks (the CPU in 1024-element
  blocks and then double, the CUDA kernel in 512 thread segments and then a scan, Triton in tiles): error
  ``CDF`` = RELATIVE_P + 16 u_r (sqrt(V) + 64) of the total, a random-walk bound with a wide margin (the measured
  distances, in benchmarks/RESULTS.md, stay well inside it).
"""

import math
from dataclasses import dataclass

import torch

from fastbon.ops.philox import philox_uniform

UNIT_ROUNDOFF = 2.0**-24


@dataclass
class RowRule:
    """One row's sampling rule in float64: p (scaled so the maximum is 1), the certainly and possibly kept tokens,
    and the rounding allowances."""

    probs: torch.Tensor  # float64 [V]
    certain: torch.Tensor  # bool [V]: kept under every rounding
    possible: torch.Tensor  # bool [V]: kept under some rounding
    relative_p: float
    cdf: float


def kept_threshold(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> float:
    """The smallest kept p of one row (float64 p with maximum 1), written from the rule itself, not from the
    reference's code: tokens with p >= it (and p > 0) are kept. Top-k keeps p >= the k-th largest p; top-p then the
    fewest largest p (ties at the cut all kept) whose mass reaches top_p of the top-k mass; min-p keeps p >= min_p."""
    ordered = sorted(probs.tolist(), reverse=True)
    threshold_k = ordered[top_k - 1] if 0 < top_k < len(ordered) else 0.0
    threshold_p = 0.0
    if top_p < 1:
        kept = [p for p in ordered if p >= threshold_k]
        target, mass = top_p * math.fsum(kept), 0.0
        for p in kept:
            mass += p
            if mass >= target:
                threshold_p = p
                break
        else:
            threshold_p = kept[-1]
    return max(threshold_k, threshold_p, min_p)


def oracle_draw(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
                u: float) -> int:
    """The float64 draw of one row: greedy for temperature 0 (the first maximal logit), else the first token in
    vocabulary order whose cumulative kept mass exceeds u times the kept total."""
    x = logits_row.double().cpu()
    if temperature == 0:
        return int(torch.nonzero(x == x.max())[0])
    scaled = x / temperature
    probs = torch.exp(scaled - scaled.max())
    threshold = kept_threshold(probs, top_k, top_p, min_p)
    kept = torch.where((probs >= threshold) & (probs > 0), probs, torch.zeros_like(probs))
    cumulative = torch.cumsum(kept, 0)
    crossed = torch.nonzero((cumulative > u * cumulative[-1]) & (kept > 0))
    return int(crossed[0]) if crossed.numel() else int(torch.nonzero(kept)[-1])


def row_rule(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> RowRule:
    """The kept sets of one row (temperature > 0) under float32 rounding of the probabilities and masses."""
    x = logits_row.double().cpu()
    vocab = x.shape[0]
    scaled = x / temperature
    probs = torch.exp(scaled - scaled.max())
    magnitude = x[torch.isfinite(x)].abs().max().item() / temperature
    relative_p = 16 * UNIT_ROUNDOFF * (4 + magnitude)
    cdf = relative_p + 16 * UNIT_ROUNDOFF * (math.sqrt(vocab) + 64)

    def threshold(p_value):
        return kept_threshold(probs, top_k, p_value, min_p)

    # A smaller top_p keeps fewer tokens: the mass comparison's rounding moves the top-p cut either way.
    margin = relative_p + cdf
    highest = threshold(max(top_p * (1 - margin), 1e-300) if top_p < 1 else 1.0)
    lowest = threshold(min(1.0, top_p * (1 + margin)) if top_p < 1 else 1.0)
    certain = (probs >= highest * (1 + relative_p)) & (probs > 0)
    possible = (probs >= lowest * (1 - relative_p)) & (probs > 0)
    certain[probs.argmax()] = True  # p = 1 passes every threshold exactly
    return RowRule(probs, certain, possible, relative_p, cdf)


def mismatch_reason(rule: RowRule, u: float, token: int) -> str | None:
    """None when ``token`` can be the draw for uniform ``u`` under some rounding of ``rule``, else why not.

    Over the kept sets between ``certain`` and ``possible``, token's CDF interval [C_{token-1}, C_token) / total
    is widest with the uncertain tokens before it left out and those after it kept for its lower end (and the other
    way round for its upper end); u must lie in that widest interval, widened by the CDF's rounding."""
    if not bool(rule.possible[token]):
        return f"token {token} is outside every kept set (p = {rule.probs[token].item():.3e})"
    probs = rule.probs
    before = torch.arange(probs.shape[0]) < token
    after = torch.arange(probs.shape[0]) > token
    p_token = probs[token].item()
    certain_before = probs[rule.certain & before].sum().item()
    possible_before = probs[rule.possible & before].sum().item()
    certain_after = probs[rule.certain & after].sum().item()
    possible_after = probs[rule.possible & after].sum().item()
    lower = certain_before / (certain_before + p_token + possible_after)
    upper = (possible_before + p_token) / (possible_before + p_token + certain_after)
    if lower - rule.cdf <= u <= upper + rule.cdf:
        return None
    return (f"u = {u:.9f} lies outside token {token}'s CDF interval [{lower:.9f}, {upper:.9f}) by more than the "
            f"rounding allowance {rule.cdf:.2e}")


def check_tokens(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens) -> list[str]:
    """Every token (one per output row) against its row's rule: [] when each equals the float64 reference's draw or
    the difference is explained by rounding, else one message per unexplained row. Parameters are per-row tensors
    as the backend contract takes them; a temperature 0 row must be the first maximal logit, exactly."""
    logits = logits.double().cpu()
    row_index, tokens = row_index.cpu(), tokens.cpu()
    temperature, top_k, top_p, min_p = (t.cpu() for t in (temperature, top_k, top_p, min_p))
    uniforms = philox_uniform(seed.cpu(), step.cpu())
    expected = torch.tensor([oracle_draw(logits[row_index[i]], temperature[i].item(), int(top_k[i]), top_p[i].item(),
                                         min_p[i].item(), uniforms[i].item()) for i in range(tokens.shape[0])])
    problems = []
    for i in torch.nonzero(tokens != expected).flatten().tolist():
        row = logits[row_index[i]]
        if temperature[i] == 0:
            problems.append(f"row {i}: greedy token {int(tokens[i])}, the first maximal logit is {int(expected[i])}")
            continue
        rule = row_rule(row, temperature[i].item(), int(top_k[i]), top_p[i].item(), min_p[i].item())
        reason = mismatch_reason(rule, uniforms[i].item(), int(tokens[i]))
        if reason is not None:
            problems.append(f"row {i} (reference token {int(expected[i])}): {reason}")
    return problems
