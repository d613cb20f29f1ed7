"""Triton fused sample + score: temperature, top-k, top-p, min-p without sorting the vocabulary.

Each program owns BLOCK_R output rows and streams their logits rows in [BLOCK_R, BLOCK_V] tiles. The top-k and
top-p thresholds are found by bisection on the bit pattern of the threshold probability (non-negative floats
order like their bits), one counting pass per step; see ``_sample_kernel``.
"""

import torch
import triton
import triton.language as tl
from fastbon.ops import philox
from fastbon.ops._alloc import new_output

from ._launch import interpreted

# Globals a @triton.jit body reads must be constexpr (the GPU compiler rejects plain ints; the interpreter does not).
ONE_BITS = tl.constexpr(0x3F800000)  # float32 1.0: every probability p = exp(s - max s) lies in [0, 1]
ROUND_A = tl.constexpr(philox.PHILOX_ROUND_A)
ROUND_B = tl.constexpr(philox.PHILOX_ROUND_B)
KEY_A = tl.constexpr(philox.PHILOX_KEY_A)
KEY_B = tl.constexpr(philox.PHILOX_KEY_B)
ROUNDS = tl.constexpr(philox.PHILOX_ROUNDS)


@triton.jit
def _philox_uniform(seed, step):
    """u = (c0 >> 8) * 2^-24 of Philox-4x32-10 with key (seed lo32, seed hi32), counter (step lo32, step hi32, 0, 0).

    Bit-identical to ``fastbon.ops.philox.philox_uniform``: the 64-bit products are split into umulhi (high word)
    and a wrapping uint32 multiply (low word).
    """
    key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (step & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    round_a = tl.zeros_like(c0) + ROUND_A
    round_b = tl.zeros_like(c0) + ROUND_B
    for _ in tl.static_range(ROUNDS):
        high_b = tl.umulhi(round_b, c2)
        low_b = round_b * c2
        high_a = tl.umulhi(round_a, c0)
        low_a = round_a * c0
        c0, c1, c2, c3 = high_b ^ c1 ^ key0, low_b, high_a ^ c3 ^ key1, low_a
        key0 = key0 + KEY_A
        key1 = key1 + KEY_B
    return (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: exact


@triton.jit
def _load_logits(logits_ptr, row_offsets, rows_valid, start, vocab, BLOCK_V: tl.constexpr):
    """One [BLOCK_R, BLOCK_V] tile of raw logits in float32 (-inf outside the rows/vocabulary) and its columns."""
    columns = start + tl.arange(0, BLOCK_V)
    mask = rows_valid[:, None] & (columns < vocab)[None, :]
    logits = tl.load(logits_ptr + row_offsets[:, None] + columns[None, :], mask=mask, other=float("-inf"))
    return logits.to(tl.float32), columns


@triton.jit
def _probs(logits_ptr, row_offsets, rows_valid, start, vocab, temperature, scaled_max, BLOCK_V: tl.constexpr):
    """p = exp(x / T - max(x) / T), written as the reference writes it (max(x / T) == max(x) / T exactly)."""
    logits, columns = _load_logits(logits_ptr, row_offsets, rows_valid, start, vocab, BLOCK_V)
    return tl.exp(logits / temperature[:, None] - scaled_max[:, None]), columns


@triton.jit
def _sample_kernel(logits_ptr, row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
                   tokens_ptr, logprobs_ptr, num_rows, vocab, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row, with x the raw logits, s = x / T and p_j = exp(s_j - max s) (so max p = 1):

    * lse = logsumexp(x) and the first argmax (online over tiles, one pass); greedy rows (T = 0) stop there;
    * top-k threshold t_k: the k-th largest p = the largest float t with #{p >= t} >= k. That predicate is
      monotone in t and non-negative floats order like their int32 bits, so bisection on the bits in
      [0, bits(1.0)] ends on an exact p value within 30 passes; it stops early once #{p >= lo} == k (the set
      {p >= lo} is then exactly the top-k set, which is all a threshold is used for);
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
        logits, columns = _load_logits(logits_ptr, row_offsets, rows_valid, start, vocab, BLOCK_V)
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
        mid = lo + (hi - lo) // 2
        pivot = mid.to(tl.float32, bitcast=True)
        count = tl.zeros([BLOCK_R], tl.int32)
        for start in range(0, vocab, BLOCK_V):
            probs, _ = _probs(logits_ptr, row_offsets, searching, start, vocab, temperature, scaled_max, BLOCK_V)
            count += tl.sum((probs >= pivot[:, None]).to(tl.int32), axis=1)
        enough = count >= top_k
        lo = tl.where(searching & enough, mid, lo)
        count_lo = tl.where(searching & enough, count, count_lo)
        hi = tl.where(searching & ~enough, mid, hi)
        searching = searching & (hi - lo > 1) & (count_lo != top_k)
    threshold_k = tl.where(top_k_active, lo.to(tl.float32, bitcast=True), 0.0)

    # Top-p: the mass above t_k, then bisection on [bits(t_k), bits(1.0)] for sum{p >= t} >= top_p * mass.
    top_p = tl.load(top_p_ptr + rows, mask=rows_valid, other=1.0)
    top_p_active = sampling & (top_p < 1)
    threshold_p = tl.zeros([BLOCK_R], tl.float32)
    if tl.max(top_p_active.to(tl.int32)) > 0:
        mass_k = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            probs, _ = _probs(logits_ptr, row_offsets, top_p_active, start, vocab, temperature, scaled_max, BLOCK_V)
            mass_k += tl.sum(tl.where(probs >= threshold_k[:, None], probs, 0.0), axis=1)
        target = top_p * mass_k
        lo = threshold_k.to(tl.int32, bitcast=True)
        hi = tl.full([BLOCK_R], ONE_BITS + 1, tl.int32)
        searching = top_p_active
        while tl.max(searching.to(tl.int32)) > 0:
            mid = lo + (hi - lo) // 2
            pivot = mid.to(tl.float32, bitcast=True)
            mass = tl.zeros([BLOCK_R], tl.float32)
            for start in range(0, vocab, BLOCK_V):
                probs, _ = _probs(logits_ptr, row_offsets, searching, start, vocab, temperature, scaled_max, BLOCK_V)
                mass += tl.sum(tl.where(probs >= pivot[:, None], probs, 0.0), axis=1)
            enough = mass >= target
            lo = tl.where(searching & enough, mid, lo)
            hi = tl.where(searching & ~enough, mid, hi)
            searching = searching & (hi - lo > 1)
        threshold_p = tl.where(top_p_active, lo.to(tl.float32, bitcast=True), 0.0)

    min_p = tl.load(min_p_ptr + rows, mask=rows_valid, other=0.0)
    threshold = tl.maximum(tl.maximum(threshold_k, threshold_p), min_p)
    kept_mass = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        probs, _ = _probs(logits_ptr, row_offsets, sampling, start, vocab, temperature, scaled_max, BLOCK_V)
        kept_mass += tl.sum(tl.where((probs >= threshold[:, None]) & (probs > 0), probs, 0.0), axis=1)

    seed = tl.load(seed_ptr + rows, mask=rows_valid, other=0)
    step = tl.load(step_ptr + rows, mask=rows_valid, other=0)
    draw_target = _philox_uniform(seed, step) * kept_mass
    token = tl.zeros([BLOCK_R], tl.int32) + vocab  # vocab = not drawn yet
    last_kept = tl.zeros([BLOCK_R], tl.int32)
    cumulative = tl.zeros([BLOCK_R], tl.float32)
    drawing = sampling
    for start in range(0, vocab, BLOCK_V):  # rows that have drawn mask their loads off: no traffic after the draw
        probs, columns = _probs(logits_ptr, row_offsets, drawing, start, vocab, temperature, scaled_max, BLOCK_V)
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


def sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step):
    """Backend contract (inputs validated and contiguous): logits [R, V] float; row_index int64 [N];
    temperature, top_p, min_p float32 [N]; top_k int32 [N]; seed, step int64 [N]. Returns tokens int64 [N] and
    logprobs float32 [N]. Probabilities are computed in float32 whatever the logits' dtype (float64 logits
    included): the thresholds, the draw and the log-probability all see the same float32 values."""
    num_rows = row_index.shape[0]
    vocab = logits.shape[1]
    tokens = new_output((num_rows,), torch.int64, logits.device)
    logprobs = new_output((num_rows,), torch.float32, logits.device)
    if num_rows == 0:
        return tokens, logprobs
    # A GPU program keeps a 4096-element tile in registers (one row of a large vocabulary, or many rows of a
    # small one); the interpreter pays per op, so it takes tiles of 64Ki elements.
    tile = 65536 if interpreted(logits) else 4096
    block_v = min(tile, triton.next_power_of_2(vocab))
    block_r = max(1, min(tile // block_v, triton.next_power_of_2(num_rows)))
    grid = (triton.cdiv(num_rows, block_r),)
    _sample_kernel[grid](logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs,
                         num_rows, vocab, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8)
    return tokens, logprobs
