"""Triton shared-prefix decode attention (Hydragen / FlashInfer cascade): prefix read once per prompt and step.

Two kernels:
  1. ``_prefix_partial_kernel`` — for one (query tile, KV head, prefix chunk): every query row of one prompt that
     reads that KV head (n samples x Hq/Hkv heads) as one [BLOCK_M, D] matrix, multiplied by the chunk's keys
     with ``tl.dot``; writes a partial (o, lse) per row and chunk. Each prefix byte is read once per query tile
     (one tile holds all rows of a prompt up to BLOCK_M).
  2. ``_suffix_merge_kernel`` — per (sample, KV head): attention over the sample's own suffix, then the merge
     of that state with the prompt's prefix partials by log-sum-exp.

Optional features are constexpr switches, so a call without them compiles to the plain kernels: a soft-cap
(scores c·tanh(scale·q.k / c)), a sliding window (each row hides the keys before its first visible one; key blocks
before the first visible key of every row of a tile are never loaded, and the merge reads only the chunks its window
reaches), sinks (exp(sink[h]) joins the denominator in the merge).
"""

import math

import torch
import triton
import triton.language as tl

from fastbon.ops._alloc import new_output

from ._launch import interpreted


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """a @ b accumulated in float32. Triton 3.9's interpreter keeps bfloat16 as uint16 bit patterns and
    multiplies those (``create_dot``), so there bfloat16 operands go up to float32 first: the products are exact
    either way, as on a GPU's bfloat16 tensor cores."""
    if INTERPRETED_BF16:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=DOT_PRECISION)
    return product


@triton.jit
def _to_output(x, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """float32 -> the output dtype, rounding to nearest even. Triton 3.9's interpreter truncates float32 ->
    bfloat16 (and its "rtne" mode drops the carry into the exponent), so there the rounding is done on the bits:
    add 0x7FFF plus the lowest kept bit, keep the high half (inputs are finite)."""
    if INTERPRETED_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        converted = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        converted = x.to(dtype)
    return converted


@triton.jit
def _tanh(x):
    """tanh in float32 from exp2 (the interpreter has no libdevice): (1 - e) / (1 + e) with e = exp(-2|x|), and an
    odd Taylor polynomial below |x| = 0.25, where 1 - e would lose the low digits (error < 1e-8 relative there)."""
    magnitude = tl.abs(x)
    e = tl.exp2(magnitude * -2.8853900817779268)  # exp(-2|x|)
    square = x * x
    series = magnitude * (1.0 + square * (-1.0 / 3 + square * (2.0 / 15 + square * (-17.0 / 315 + square * (
        62.0 / 2835)))))
    result = tl.where(magnitude < 0.25, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -result, result)


@triton.jit
def _attend_block(q, keys_ptr, values_ptr, key_start, key_end, first_visible, head_dim, max_row, row_sum, acc,
                  qk_scale, scale_over_cap, cap_log2, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr, WINDOWED: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
    """One online-softmax step over keys [key_start, key_start + BLOCK_N) masked to < key_end (log2 domain).

    ``keys_ptr``/``values_ptr`` point at key 0 of a [keys, head_dim] slab. p = 2^(s - m) is used for P.V in the
    values' dtype when that is 16-bit, split into a high and a low 16-bit part so the product keeps ~16
    mantissa bits (two tensor-core dots instead of float32 FMAs); float32 values use IEEE dots. s is
    q.k * scale * log2(e), or with a soft-cap c: c * log2(e) * tanh(q.k * scale / c). With WINDOWED, row r also
    hides the keys before first_visible[r]; such a row may see none of the block (its maximum stays -inf).
    """
    keys_index = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_mask = keys_index < key_end
    dim_mask = dims < head_dim
    offsets = keys_index.to(tl.int64)[:, None] * head_dim + dims[None, :]
    keys = tl.load(keys_ptr + offsets, mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
    values = tl.load(values_ptr + offsets, mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
    scores = _dot(q, tl.trans(keys), DOT_PRECISION, INTERPRETED_BF16)
    if HAS_SOFTCAP:
        scores = _tanh(scores * scale_over_cap) * cap_log2
    else:
        scores = scores * qk_scale
    visible = key_mask[None, :]
    if WINDOWED:
        visible = visible & (keys_index[None, :] >= first_visible[:, None])
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(max_row, tl.max(scores, axis=1))  # finite without a window: a block holds >= 1 key
    safe_max = new_max
    if WINDOWED:  # 2^(-inf - 0) = 0 for a row that has seen no key yet, not 2^(-inf + inf)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp2(max_row - safe_max)
    probs = tl.exp2(scores - safe_max[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    if values.dtype == tl.float32:
        weighted = _dot(probs, values, DOT_PRECISION, INTERPRETED_BF16)
    else:
        probs_high = probs.to(values.dtype)
        probs_low = (probs - probs_high.to(tl.float32)).to(values.dtype)
        weighted = (_dot(probs_high, values, DOT_PRECISION, INTERPRETED_BF16)
                    + _dot(probs_low, values, DOT_PRECISION, INTERPRETED_BF16))
    return new_max, row_sum, acc * rescale[:, None] + weighted


@triton.jit
def _prefix_partial_kernel(q_ptr, prefix_k_ptr, prefix_v_ptr, prefix_lens_ptr, suffix_lens_ptr, sample_order_ptr,
                           prompt_first_ptr, prompt_counts_ptr, tile_prompt_ptr, tile_first_ptr, partial_o_ptr,
                           partial_lse_ptr, qk_scale, scale_over_cap, cap_log2, window, num_prompts, num_samples,
                           num_q_heads, num_kv_heads, prefix_max, head_dim, chunk_len, group, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           INTERPRETED_BF16: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Partial attention of a prompt's query rows over one prefix chunk.

    Row r of prompt b's matrix (0 <= r < count_b * group) is query head kv_head * group + r % group of the sample
    at position first_b + r // group of the samples sorted by prompt. With s = (q . k) * scale * log2(e):

        lse_c = log2 sum_{k in chunk} 2^s_k,    o_c = sum_{k in chunk} 2^(s_k - lse_c) v_k

    stored for chunks that hold keys (chunk start < prefix_len_b); the merge kernel reads only those. Tiles past
    the last prompt (the grid is an upper bound, no host sync) have no rows and store nothing. With a window, the
    row of sample i sees prefix keys from prefix_len_b + suffix_lens[i] - window on; the loop starts at the block of
    the tile's earliest such key.
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.program_id(2)
    prompt = tl.load(tile_prompt_ptr + tile)
    real_prompt = prompt < num_prompts
    prompt = tl.minimum(prompt, num_prompts - 1)
    prefix_len = tl.where(real_prompt, tl.load(prefix_lens_ptr + prompt), 0)
    key_start = chunk * chunk_len
    # A chunk past the prompt's prefix has no rows to store: the merge kernel never reads it.
    row_count = tl.where(real_prompt & (key_start < prefix_len), tl.load(prompt_counts_ptr + prompt), 0) * group
    key_end = tl.minimum(key_start + chunk_len, prefix_len)

    rows = (tile - tl.load(tile_first_ptr + prompt)) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < row_count
    sample = tl.load(sample_order_ptr + tl.load(prompt_first_ptr + prompt) + rows // group, mask=row_valid, other=0)
    q_row = sample.to(tl.int64) * num_q_heads + kv_head * group + rows % group
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + q_row[:, None] * head_dim + dims[None, :],
                mask=row_valid[:, None] & (dims < head_dim)[None, :], other=0.0)

    slab = (prompt.to(tl.int64) * num_kv_heads + kv_head) * prefix_max * head_dim
    max_row = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_visible = tl.zeros([BLOCK_M], tl.int32)
    loop_start = key_start
    if WINDOWED:
        suffix_len = tl.load(suffix_lens_ptr + sample, mask=row_valid, other=0)
        first_visible = prefix_len + suffix_len - window
        earliest = tl.min(tl.where(row_valid, first_visible, prefix_max), axis=0)
        loop_start = tl.maximum(key_start, tl.maximum(earliest, 0) // BLOCK_N * BLOCK_N)
    for start in range(loop_start, key_end, BLOCK_N):
        max_row, row_sum, acc = _attend_block(q, prefix_k_ptr + slab, prefix_v_ptr + slab, start, key_end,
                                              first_visible, head_dim, max_row, row_sum, acc, qk_scale,
                                              scale_over_cap, cap_log2, BLOCK_N, BLOCK_D, DOT_PRECISION,
                                              INTERPRETED_BF16, WINDOWED, HAS_SOFTCAP)

    partial_row = chunk.to(tl.int64) * num_samples * num_q_heads + q_row
    safe_sum = tl.where(row_valid & (row_sum > 0), row_sum, 1.0)  # a row that saw no key stores lse = -inf
    tl.store(partial_lse_ptr + partial_row, max_row + tl.log2(safe_sum), mask=row_valid)
    tl.store(partial_o_ptr + partial_row[:, None] * head_dim + dims[None, :], acc / safe_sum[:, None],
             mask=row_valid[:, None] & (dims < head_dim)[None, :])


@triton.jit
def _suffix_merge_kernel(q_ptr, suffix_k_ptr, suffix_v_ptr, suffix_lens_ptr, prefix_lens_ptr, sample_to_prompt_ptr,
                         partial_o_ptr, partial_lse_ptr, sinks_ptr, out_ptr, qk_scale, scale_over_cap, cap_log2,
                         window, num_samples, num_q_heads, num_kv_heads, suffix_max, head_dim, chunk_len, group,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, INTERPRETED_BF16: tl.constexpr, WINDOWED: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    """For sample i and the `group` query heads of one KV head: online softmax over suffix[i][:S_i], then merge
    with each prefix chunk c of its prompt holding keys it sees:

        m' = max(m, lse_c),  acc' = 2^(m - m') acc + 2^(lse_c - m') o_c,  l' = 2^(m - m') l + 2^(lse_c - m')

    and with the sink as one more term (lse = sink_h log2(e), o = 0). out = acc / l, or 0 when the query saw no
    key and has no sink (l = 0). With a window w the suffix keys from S_i - w and the prefix chunks from the one
    holding key P_b + S_i - w count. Rows pad to BLOCK_G >= 16 for ``tl.dot``.
    """
    sample = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads = tl.arange(0, BLOCK_G)
    head_valid = heads < group
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    q_row = sample.to(tl.int64) * num_q_heads + kv_head * group + heads
    q = tl.load(q_ptr + q_row[:, None] * head_dim + dims[None, :], mask=head_valid[:, None] & dim_valid[None, :],
                other=0.0)

    suffix_len = tl.load(suffix_lens_ptr + sample)
    prefix_len = tl.load(prefix_lens_ptr + tl.load(sample_to_prompt_ptr + sample))
    slab = (sample.to(tl.int64) * num_kv_heads + kv_head) * suffix_max * head_dim
    max_row = tl.full([BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    suffix_first = 0
    chunk_first = 0
    chunk_end = tl.cdiv(prefix_len, chunk_len)
    if WINDOWED:
        suffix_first = tl.maximum(suffix_len - window, 0)
        prefix_first = prefix_len + suffix_len - window
        chunk_first = tl.maximum(prefix_first, 0) // chunk_len
        chunk_end = tl.where(prefix_first < prefix_len, chunk_end, 0)
    first_visible = tl.zeros([BLOCK_G], tl.int32) + suffix_first
    for start in range(suffix_first // BLOCK_N * BLOCK_N, suffix_len, BLOCK_N):
        max_row, row_sum, acc = _attend_block(q, suffix_k_ptr + slab, suffix_v_ptr + slab, start, suffix_len,
                                              first_visible, head_dim, max_row, row_sum, acc, qk_scale,
                                              scale_over_cap, cap_log2, BLOCK_N, BLOCK_D, DOT_PRECISION,
                                              INTERPRETED_BF16, WINDOWED, HAS_SOFTCAP)

    for chunk in range(chunk_first, chunk_end):
        partial_row = q_row + chunk * (num_samples * num_q_heads)  # < 2^31: num_chunks <= 528 by _plan
        chunk_lse = tl.load(partial_lse_ptr + partial_row, mask=head_valid, other=0.0)
        chunk_o = tl.load(partial_o_ptr + partial_row[:, None] * head_dim + dims[None, :],
                          mask=head_valid[:, None] & dim_valid[None, :], other=0.0)
        new_max = tl.maximum(max_row, chunk_lse)
        rescale = tl.exp2(max_row - new_max)
        weight = tl.exp2(chunk_lse - new_max)
        acc = acc * rescale[:, None] + weight[:, None] * chunk_o
        row_sum = row_sum * rescale + weight
        max_row = new_max
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + kv_head * group + heads, mask=head_valid, other=0.0) * 1.4426950408889634
        new_max = tl.maximum(max_row, sink)
        rescale = tl.exp2(max_row - new_max)
        acc = acc * rescale[:, None]
        row_sum = row_sum * rescale + tl.exp2(sink - new_max)

    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out = _to_output(out, out_ptr.dtype.element_ty, INTERPRETED_BF16)
    tl.store(out_ptr + q_row[:, None] * head_dim + dims[None, :], out, mask=head_valid[:, None] & dim_valid[None, :])


def _plan(num_samples, num_prompts, num_kv_heads, group, prefix_max, float32, interpreter):
    """(BLOCK_M, BLOCK_N, query tiles upper bound, prefix chunk length, number of chunks) from host-known sizes.

    BLOCK_M fits the average prompt's rows (16..64: tl.dot's minimum, and a register budget). The prefix is split
    into chunks until (tiles x KV heads x chunks) reaches a few programs per SM (fewer in the interpreter, which
    runs programs in turn, but still several chunks so the merge path is exercised). The tile count
    sum_b cdiv(rows_b, BLOCK_M) <= (N * group + B * (BLOCK_M - 1)) // BLOCK_M bounds the grid without reading
    the per-prompt counts back to the host.
    """
    # float32 operands go through IEEE dots that stage both tiles in shared memory: 64 x 64 tiles at D = 128 take
    # 180 KB (compiled for sm_80/sm_90), 32-key tiles with at most 32 rows fit every sm_8x/sm_90 part.
    max_rows = 32 if float32 and not interpreter else 64
    block_m = min(max_rows, max(16, triton.next_power_of_2(triton.cdiv(num_samples, num_prompts) * group)))
    block_n = 128 if interpreter else 32 if float32 else 64
    tiles = (num_samples * group + num_prompts * (block_m - 1)) // block_m
    target_programs = 16 if interpreter else 528  # 4 per SM of an H100
    key_blocks = triton.cdiv(prefix_max, block_n)
    num_chunks = min(key_blocks, max(1, triton.cdiv(target_programs, tiles * num_kv_heads)))
    if num_chunks == 0:  # no prefix storage (P_max = 0): only the suffix kernel runs
        return block_m, block_n, tiles, block_n, 0
    chunk_len = triton.cdiv(key_blocks, num_chunks) * block_n
    return block_m, block_n, tiles, chunk_len, triton.cdiv(prefix_max, chunk_len)


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            scale, window=None, softcap=None, sinks=None):
    """Backend contract (validated, contiguous): q [N, Hq, D]; prefix_k/v [B, Hkv, P_max, D]; prefix_lens int32
    [B]; suffix_k/v [N, Hkv, T_max, D]; suffix_lens int32 [N]; sample_to_prompt int32 [N] (any mapping); scale a
    float; window None or int >= 1; softcap None or float > 0; sinks None or float32 [Hq]. Returns [N, Hq, D] in
    q's dtype. float16/bfloat16/float32 only: the kernels accumulate in float32."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for backend='triton' (float32 accumulation), "
                        f"got {str(q.dtype).removeprefix('torch.')}; use backend='torch' for float64")
    num_samples, num_q_heads, head_dim = q.shape
    num_prompts, num_kv_heads, prefix_max, _ = prefix_k.shape
    group = num_q_heads // num_kv_heads
    out = new_output(q.shape, q.dtype, q.device)
    if num_samples == 0:
        return out
    block_m, block_n, tiles, chunk_len, num_chunks = _plan(num_samples, num_prompts, num_kv_heads, group,
                                                           prefix_max, q.dtype == torch.float32, interpreted(q))
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # 16-bit products are exact in fp32 anyway
    upcast_bf16 = interpreted(q) and q.dtype == torch.bfloat16
    qk_scale = scale * math.log2(math.e)
    features = dict(WINDOWED=window is not None, HAS_SOFTCAP=softcap is not None)
    scale_over_cap, cap_log2 = (scale / softcap, softcap * math.log2(math.e)) if softcap is not None else (1.0, 1.0)
    window = window if window is not None else 0
    partial_o = torch.empty((num_chunks, num_samples, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((num_chunks, num_samples, num_q_heads), dtype=torch.float32, device=q.device)

    if num_chunks:
        # Samples grouped by prompt (stable, so a prompt's samples keep their order) and each prompt's query
        # tiles, all on the device: no host sync, so the step can be captured in a CUDA graph.
        prompts = sample_to_prompt.long()
        sample_order = torch.argsort(prompts, stable=True).to(torch.int32)
        counts = torch.zeros(num_prompts, dtype=torch.int64, device=q.device).index_add_(
            0, prompts, torch.ones_like(prompts))
        prompt_first = torch.cumsum(counts, 0) - counts
        tiles_per_prompt = (counts * group + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles_per_prompt, 0)
        tile_prompt = torch.searchsorted(tile_end, torch.arange(tiles, device=q.device), right=True)
        _prefix_partial_kernel[(tiles, num_kv_heads, num_chunks)](
            q, prefix_k, prefix_v, prefix_lens, suffix_lens, sample_order, prompt_first, counts, tile_prompt,
            tile_end - tiles_per_prompt, partial_o, partial_lse, qk_scale, scale_over_cap, cap_log2, window,
            num_prompts, num_samples, num_q_heads, num_kv_heads, prefix_max, head_dim, chunk_len, group,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision,
            INTERPRETED_BF16=upcast_bf16, **features, num_warps=4)

    _suffix_merge_kernel[(num_samples, num_kv_heads)](
        q, suffix_k, suffix_v, suffix_lens, prefix_lens, sample_to_prompt, partial_o, partial_lse,
        sinks if sinks is not None else partial_lse, out, qk_scale, scale_over_cap, cap_log2, window, num_samples,
        num_q_heads, num_kv_heads, suffix_k.shape[2], head_dim, chunk_len, group,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n if interpreted(q) else 32, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision, INTERPRETED_BF16=upcast_bf16, **features, HAS_SINKS=sinks is not None,
        num_warps=4)
    return out
