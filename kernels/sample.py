"""Triton fused sample + score: temperature, top-k, top-p, min-p without sorting the vocabulary.

Each program owns BLOCK_R output rows and streams their logits rows in [BLOCK_R, BLOCK_V] tiles. The top-k and
top-p thresholds are found by bisection on the bit pattern of the threshold probability (non-negative floats
order like their bits), one counting pass per step; see ``_sample_kernel``.

Why bisection here (the CPU selects from a histogram, CUDA by radix passes, the reference sorts): a Triton program
holds a tile of the row, not the row, and has no shared-memory histogram or atomics it controls; each bisection
step is one streaming pass that only counts and sums within registers, so it needs no workspace and no sort, and
snapping the interval to the data (``_narrow``) ends it in about log2(distinct p) passes, far fewer than 32.
"""

import triton
import triton.language as tl

from ._launch import interpreted
from .philox import philox_uniform

# Globals a @triton.jit body reads must be constexpr (the GPU compiler rejects plain ints; the interpreter does not).
ONE_BITS = tl.constexpr(0x3F800000)  # float32 1.0: every probability p = exp(s - max s) lies in [0, 1]


@triton.jit
def _load_tile(logits_ptr, row_offsets, rows_valid, start, vocab, BLOCK_V: tl.constexpr):
    """One [BLOCK_R, BLOCK_V] tile of raw logits in float32 (-inf outside the rows/vocabulary) and its columns.
    Probabilities are then p = exp(x / T - max(x) / T), written as the reference writes them: max(x / T) is
    max(x) / T exactly."""
    columns = start + tl.arange(0, BLOCK_V)
    mask = rows_valid[:, None] & (columns < vocab)[None, :]
    logits = tl.load(logits_ptr + row_offsets[:, None] + columns[None, :], mask=mask, other=float("-inf"))
    return logits.to(tl.float32), columns


@triton.jit
def _pass_at(logits_ptr, row_offsets, rows_valid, vocab, temperature, scaled_max, pivot, BLOCK_R: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """One pass over the rows: #{p >= pivot}, sum{p >= pivot}, min{p >= pivot} and max{p < pivot} (1 and -1
    when empty; columns past the vocabulary read p = 0, which never changes a max below a positive pivot)."""
    count = tl.zeros([BLOCK_R], tl.int32)
    mass = tl.zeros([BLOCK_R], tl.float32)
    above = tl.full([BLOCK_R], 1.0, tl.float32)
    below = tl.full([BLOCK_R], -1.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        logits, columns = _load_tile(logits_ptr, row_offsets, rows_valid, start, vocab, BLOCK_V)
        probs = tl.exp(logits / temperature[:, None] - scaled_max[:, None])
        at_or_above = probs >= pivot[:, None]
        count += tl.sum(at_or_above.to(tl.int32), axis=1)
        mass += tl.sum(tl.where(at_or_above, probs, 0.0), axis=1)
        above = tl.minimum(above, tl.min(tl.where(at_or_above, probs, 1.0), axis=1))
        below = tl.maximum(below, tl.max(tl.where(at_or_above, -1.0, probs), axis=1))
    return count, mass, above, below


@triton.jit
def _narrow(searching, enough, lo, hi, above, below):
    """A bisection step on the threshold's bits, snapped to the data: the predicate holds at the pivot (enough)
    -> it holds up to the smallest p at or above it, so lo = bits(that p); else it fails down to just above the
    largest p below it, so hi = bits(that p) + 1. The interval only ever holds p values, and ends as [t, t + 1)
    with t the exact threshold."""
    lo = tl.where(searching & enough, above.to(tl.int32, bitcast=True), lo)
    hi = tl.where(searching & ~enough, below.to(tl.int32, bitcast=True) + 1, hi)
    return lo, hi


@triton.jit
def _sample_kernel(logits_ptr, row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
                   tokens_ptr, logprobs_ptr, num_rows, vocab, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row, with x the raw logits, s = x / T and p_j = exp(s_j - max s) (so max p = 1):

    * lse = logsumexp(x) and the first argmax (online over tiles, one pass); greedy rows (T = 0) stop there;
    * top-k threshold t_k: the k-th largest p = the largest float t with #{p >= t} >= k. That predicate is
      monotone in t and non-negative floats order like their int32 bits, so bisection on the bits in
      [0, bits(1.0)] (snapped to p values each pass, ``_narrow``) ends on the exact p value within 30 passes,
      about log2(#distinct p) in practice; it stops early once #{p >= lo} == k (the set {p >= lo} is then
      exactly the top-k set, which is all a threshold is used for);
    * top-p threshold t_p: the largest t >= t_k with sum{p : p >= t} >= top_p * sum{p : p >= t_k}, by the same
      bisection on [bits(t_k), bits(1.0)];
    * t = max(t_k, t_p, min_p); kept = {p >= t, p > 0}; K = sum of kept p;
    * token = first j in vocabulary order with cumsum(kept p)_j > u * K, u = Philox uniform (seed, step);
    * logprob = x_token - lse.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_valid = rows < num_rows
    row_offsets = tl.load(row_index_ptr + rows, mask=rows_valid, other=0) * vocab
    temperature = tl.load(temperature_ptr + rows, mask=rows_valid, other=1.0)
    greedy = temperature == 0
    temperature = tl.where(greedy, 1.0, temperature)
    sampling = rows_valid & ~greedy

    logit_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    exp_sum = tl.zeros([BLOCK_R], tl.float32)
    argmax = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        logits, columns = _load_tile(logits_ptr, row_offsets, rows_valid, start, vocab, BLOCK_V)
        tile_max = tl.max(logits, axis=1)
        tile_argmax = tl.min(tl.where(logits == tile_max[:, None], columns[None, :], vocab), axis=1)
        argmax = tl.where(tile_max > logit_max, tile_argmax, argmax)  # strict: an earlier tile keeps ties
        new_max = tl.maximum(logit_max, tile_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid -inf - -inf
        exp_sum = exp_sum * tl.exp(logit_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]), axis=1)
        logit_max = new_max
    log_normalizer = logit_max + tl.log(tl.where(rows_valid, exp_sum, 1.0))  # padding rows sum to 0
    scaled_max = tl.where(rows_valid, logit_max / temperature, 0.0)  # padding rows: no -inf - -inf

    # Top-k: bisection on the bits of t, keeping #{p >= lo} >= k > #{p >= hi}.
    top_k = tl.load(top_k_ptr + rows, mask=rows_valid, other=0)
    lo = tl.zeros([BLOCK_R], tl.int32)
    hi = tl.full([BLOCK_R], ONE_BITS + 1, tl.int32)
    count_lo = tl.zeros([BLOCK_R], tl.int32) + vocab
    searching = sampling & (top_k > 0) & (top_k < vocab)
    top_k_active = searching
    while tl.max(searching.to(tl.int32)) > 0:
        pivot = (lo + (hi - lo) // 2).to(tl.float32, bitcast=True)
        count, mass, above, below = _pass_at(logits_ptr, row_offsets, searching, vocab, temperature, scaled_max, pivot,
                                          BLOCK_R, BLOCK_V)
        enough = count >= top_k
        lo, hi = _narrow(searching, enough, lo, hi, above, below)
        count_lo = tl.where(searching & enough, count, count_lo)
        searching = searching & (hi - lo > 1) & (count_lo != top_k)
    threshold_k = tl.where(top_k_active, lo.to(tl.float32, bitcast=True), 0.0)

    # Top-p: the mass above t_k, then the same bisection on [bits(t_k), bits(1.0)] for sum{p >= t} >= target.
    top_p = tl.load(top_p_ptr + rows, mask=rows_valid, other=1.0)
    top_p_active = sampling & (top_p < 1)
    threshold_p = tl.zeros([BLOCK_R], tl.float32)
    if tl.max(top_p_active.to(tl.int32)) > 0:
        count_k, mass_k, above_k, below_k = _pass_at(logits_ptr, row_offsets, top_p_active, vocab, temperature,
                                                     scaled_max, threshold_k, BLOCK_R, BLOCK_V)
        target = top_p * mass_k
        lo = threshold_k.to(tl.int32, bitcast=True)
        hi = tl.full([BLOCK_R], ONE_BITS + 1, tl.int32)
        searching = top_p_active
        while tl.max(searching.to(tl.int32)) > 0:
            pivot = (lo + (hi - lo) // 2).to(tl.float32, bitcast=True)
            count_p, mass_p, above_p, below_p = _pass_at(logits_ptr, row_offsets, searching, vocab, temperature,
                                                         scaled_max, pivot, BLOCK_R, BLOCK_V)
            lo, hi = _narrow(searching, mass_p >= target, lo, hi, above_p, below_p)
            searching = searching & (hi - lo > 1)
        threshold_p = tl.where(top_p_active, lo.to(tl.float32, bitcast=True), 0.0)

    min_p = tl.load(min_p_ptr + rows, mask=rows_valid, other=0.0)
    threshold = tl.maximum(tl.maximum(threshold_k, threshold_p), min_p)
    # p >= threshold with p > 0: zeros add no mass, so the mass at the threshold is the kept mass K.
    kept_count, kept_mass, kept_min, kept_below = _pass_at(logits_ptr, row_offsets, sampling, vocab, temperature,
                                                           scaled_max, threshold, BLOCK_R, BLOCK_V)

    seed = tl.load(seed_ptr + rows, mask=rows_valid, other=0)
    step = tl.load(step_ptr + rows, mask=rows_valid, other=0)
    draw_target = philox_uniform(seed, step) * kept_mass
    token = tl.zeros([BLOCK_R], tl.int32) + vocab  # vocab = not drawn yet
    last_kept = tl.zeros([BLOCK_R], tl.int32)
    cumulative = tl.zeros([BLOCK_R], tl.float32)
    drawing = sampling
    for start in range(0, vocab, BLOCK_V):  # rows that have drawn mask their loads off: no traffic after the draw
        logits, columns = _load_tile(logits_ptr, row_offsets, drawing, start, vocab, BLOCK_V)
        probs = tl.exp(logits / temperature[:, None] - scaled_max[:, None])
        kept = tl.where((probs >= threshold[:, None]) & (probs > 0), probs, 0.0)
        running = cumulative[:, None] + tl.cumsum(kept, axis=1)
        crossed = (running > draw_target[:, None]) & (kept > 0)
        token = tl.where(drawing, tl.min(tl.where(crossed, columns[None, :], vocab), axis=1), token)
        last_kept = tl.maximum(last_kept, tl.max(tl.where(kept > 0, columns[None, :], 0), axis=1))
        cumulative += tl.sum(kept, axis=1)
        drawing = drawing & (token == vocab)
    # Rounding can leave u * K at or above the scanned cumulative mass: the draw is then the last kept token.
    token = tl.where(token == vocab, last_kept, token)
    token = tl.where(greedy, argmax, token)

    token_logit = tl.load(logits_ptr + row_offsets + token, mask=rows_valid, other=0.0).to(tl.float32)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=rows_valid)
    tl.store(logprobs_ptr + rows, token_logit - log_normalizer, mask=rows_valid)


def sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs):
    """Launch on the backend contract's inputs (validated, contiguous): logits [R, V] float; row_index int64 [N];
    temperature, top_p, min_p float32 [N]; top_k int32 [N]; seed, step int64 [N]. Writes tokens int64 [N] and
    logprobs float32 [N]. Probabilities are computed in float32 whatever the logits' dtype (float64 logits
    included): the thresholds, the draw and the log-probability all see the same float32 values."""
    num_rows = row_index.shape[0]
    vocab = logits.shape[1]
    if num_rows == 0:
        return
    # A GPU program keeps a 4096-element tile in registers (one row of a large vocabulary, or many rows of a
    # small one); the interpreter pays per op, so it takes tiles of 128Ki elements.
    tile = 131072 if interpreted(logits) else 4096
    block_v = min(tile, triton.next_power_of_2(vocab))
    block_r = max(1, min(tile // block_v, triton.next_power_of_2(num_rows)))
    grid = (triton.cdiv(num_rows, block_r),)
    _sample_kernel[grid](logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs,
                         num_rows, vocab, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8)
