"""Triton tree (cascade) decode attention (Hydragen / FlashInfer cascade): each shared segment read once per step.

Two kernels:
  1. ``_level_partial_kernel`` — for one level and one (query tile, KV head, chunk): every query row of one
     segment that reads that KV head (its rows x Hq/Hkv heads) as one [BLOCK_M, D] matrix, multiplied by the
     chunk's keys with ``tl.dot``; writes a partial (o, lse) per row and chunk. Each segment byte is read once per
     query tile (one tile holds all rows of a segment up to BLOCK_M). Launched once per level.
  2. ``_suffix_merge_kernel`` — per (row, KV head): attention over the row's own suffix, then the merge of that
     state with the partials of every level's segment on its path by log-sum-exp.

The plan of a batch (``fastbon.ops._triton``: rows grouped by segment, tiles, chunking, path offsets, buffers) is
made once per batch change and reaches the kernels as two int32 tables, not as per-level arguments: ``index_table``
holds every level's index arrays end to end and ``level_table`` [L, LEVEL_COLUMNS] where each starts plus the level's
chunking (the columns below). ``launch`` only launches the kernels.

Optional features are constexpr switches, so a call without them compiles to the plain kernels: a soft-cap
(scores c·tanh(scale·q.k / c)), a sliding window (each row hides the keys before its first visible one; key blocks
before the first visible key of every row of a tile are never loaded, and the merge reads only the chunks its window
reaches), sinks (exp(sink[h]) joins the denominator in the merge).
"""

import math

import torch
import triton
import triton.language as tl

from .merge_state import merge_state

# level_table's columns: where a level's arrays start in index_table, then its chunking. index_table starts with
# path_lens [N] (every row's keys before its suffix), at 0.
LENS = tl.constexpr(0)  # [S_l] each segment's length
OFFSETS = tl.constexpr(1)  # [N] where the level starts on each row's path
SEGMENTS = tl.constexpr(2)  # [N] each row's segment
ROW_ORDER = tl.constexpr(3)  # [N] the rows sorted by segment
RUN_FIRST = tl.constexpr(4)  # [R_l] a run (a segment with rows): its first row in row_order
RUN_COUNTS = tl.constexpr(5)  # [R_l] its rows
RUN_SEGMENT = tl.constexpr(6)  # [R_l] its segment
TILE_RUN = tl.constexpr(7)  # [T_l] a query tile's run
TILE_FIRST = tl.constexpr(8)  # [R_l] a run's first tile
CHUNK_LEN = tl.constexpr(9)  # keys per chunk of the level
CHUNK_BASE = tl.constexpr(10)  # the level's first partial slot
LEVEL_COLUMNS = tl.constexpr(11)


@triton.jit
def _level_array(level_table_ptr, index_table_ptr, level, column):
    """A pointer to level ``level``'s array ``column`` in index_table."""
    return index_table_ptr + tl.load(level_table_ptr + level * LEVEL_COLUMNS + column)


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
def _level_partial_kernel(q_ptr, keys_ptr, values_ptr, suffix_lens_ptr, index_table_ptr, level_table_ptr,
                          partial_o_ptr, partial_lse_ptr, level, qk_scale, scale_over_cap, cap_log2, window, num_rows,
                          num_q_heads, num_kv_heads, key_capacity, head_dim, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          INTERPRETED_BF16: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Partial attention of one level's segment's query rows over one chunk of the segment.

    A run is a segment with rows; row r of run u's matrix (0 <= r < count_u * group) is query head
    kv_head * group + r % group of the row at position first_u + r // group of the rows sorted by segment. With
    s = (q . k) * scale * log2(e):

        lse_c = log2 sum_{k in chunk} 2^s_k,    o_c = sum_{k in chunk} 2^(s_k - lse_c) v_k

    stored at partial chunk chunk_base + c for chunks that hold keys (chunk start < the segment's length); the merge
    kernel reads only those. With a window, row i sees the segment's keys from path_len_i + suffix_len_i - window -
    offset_i on (offset_i: where the level starts on its path); the loop starts at the block of the tile's earliest.
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.program_id(2)
    group = num_q_heads // num_kv_heads
    chunk_len = tl.load(level_table_ptr + level * LEVEL_COLUMNS + CHUNK_LEN)
    chunk_base = tl.load(level_table_ptr + level * LEVEL_COLUMNS + CHUNK_BASE)
    run = tl.load(_level_array(level_table_ptr, index_table_ptr, level, TILE_RUN) + tile)
    segment = tl.load(_level_array(level_table_ptr, index_table_ptr, level, RUN_SEGMENT) + run)
    length = tl.load(_level_array(level_table_ptr, index_table_ptr, level, LENS) + segment)
    key_start = chunk * chunk_len
    # A chunk past the segment's keys has no rows to store: the merge kernel never reads it.
    row_count = tl.where(key_start < length,
                         tl.load(_level_array(level_table_ptr, index_table_ptr, level, RUN_COUNTS) + run), 0) * group
    key_end = tl.minimum(key_start + chunk_len, length)

    tile_first = tl.load(_level_array(level_table_ptr, index_table_ptr, level, TILE_FIRST) + run)
    rows = (tile - tile_first) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < row_count
    run_first = tl.load(_level_array(level_table_ptr, index_table_ptr, level, RUN_FIRST) + run)
    row = tl.load(_level_array(level_table_ptr, index_table_ptr, level, ROW_ORDER) + run_first + rows // group,
                  mask=row_valid, other=0)
    q_row = row.to(tl.int64) * num_q_heads + kv_head * group + rows % group
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + q_row[:, None] * head_dim + dims[None, :],
                mask=row_valid[:, None] & (dims < head_dim)[None, :], other=0.0)

    slab = (segment.to(tl.int64) * num_kv_heads + kv_head) * key_capacity * head_dim
    max_row = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_visible = tl.zeros([BLOCK_M], tl.int32)
    loop_start = key_start
    if WINDOWED:
        suffix_len = tl.load(suffix_lens_ptr + row, mask=row_valid, other=0)
        path_len = tl.load(index_table_ptr + row, mask=row_valid, other=0)
        level_offset = tl.load(_level_array(level_table_ptr, index_table_ptr, level, OFFSETS) + row, mask=row_valid,
                               other=0)
        first_visible = path_len + suffix_len - window - level_offset
        earliest = tl.min(tl.where(row_valid, first_visible, key_capacity), axis=0)
        loop_start = tl.maximum(key_start, tl.maximum(earliest, 0) // BLOCK_N * BLOCK_N)
    for start in range(loop_start, key_end, BLOCK_N):
        max_row, row_sum, acc = _attend_block(q, keys_ptr + slab, values_ptr + slab, start, key_end, first_visible,
                                              head_dim, max_row, row_sum, acc, qk_scale, scale_over_cap, cap_log2,
                                              BLOCK_N, BLOCK_D, DOT_PRECISION, INTERPRETED_BF16, WINDOWED,
                                              HAS_SOFTCAP)

    partial_row = (chunk_base + chunk).to(tl.int64) * num_rows * num_q_heads + q_row
    safe_sum = tl.where(row_valid & (row_sum > 0), row_sum, 1.0)  # a row that saw no key stores lse = -inf
    tl.store(partial_lse_ptr + partial_row, max_row + tl.log2(safe_sum), mask=row_valid)
    tl.store(partial_o_ptr + partial_row[:, None] * head_dim + dims[None, :], acc / safe_sum[:, None],
             mask=row_valid[:, None] & (dims < head_dim)[None, :])


@triton.jit
def _suffix_merge_kernel(q_ptr, suffix_k_ptr, suffix_v_ptr, suffix_lens_ptr, index_table_ptr, level_table_ptr,
                         partial_o_ptr, partial_lse_ptr, sinks_ptr, out_ptr, qk_scale, scale_over_cap, cap_log2, window,
                         num_levels, num_rows, num_q_heads, num_kv_heads, suffix_max, head_dim, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         INTERPRETED_BF16: tl.constexpr, WINDOWED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_SINKS: tl.constexpr):
    """For row i and the `group` query heads of one KV head: online softmax over suffix[i][:S_i], then merge with
    each chunk c of each level's segment on its path that holds keys it sees:

        m' = max(m, lse_c),  acc' = 2^(m - m') acc + 2^(lse_c - m') o_c,  l' = 2^(m - m') l + 2^(lse_c - m')

    and with the sink as one more term (lse = sink_h log2(e), o = 0). out = acc / l, or 0 when the query saw no
    key and has no sink (l = 0). With a window w the suffix keys from S_i - w count, and in each level the chunks
    from the one holding its first visible key. Rows pad to BLOCK_G >= 16 for ``tl.dot``.
    """
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = num_q_heads // num_kv_heads
    heads = tl.arange(0, BLOCK_G)
    head_valid = heads < group
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    q_row = row.to(tl.int64) * num_q_heads + kv_head * group + heads
    q = tl.load(q_ptr + q_row[:, None] * head_dim + dims[None, :], mask=head_valid[:, None] & dim_valid[None, :],
                other=0.0)

    suffix_len = tl.load(suffix_lens_ptr + row)
    path_len = tl.load(index_table_ptr + row)
    slab = (row.to(tl.int64) * num_kv_heads + kv_head) * suffix_max * head_dim
    max_row = tl.full([BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    suffix_first = 0
    if WINDOWED:
        suffix_first = tl.maximum(suffix_len - window, 0)
    first_visible = tl.zeros([BLOCK_G], tl.int32) + suffix_first
    for start in range(suffix_first // BLOCK_N * BLOCK_N, suffix_len, BLOCK_N):
        max_row, row_sum, acc = _attend_block(q, suffix_k_ptr + slab, suffix_v_ptr + slab, start, suffix_len,
                                              first_visible, head_dim, max_row, row_sum, acc, qk_scale,
                                              scale_over_cap, cap_log2, BLOCK_N, BLOCK_D, DOT_PRECISION,
                                              INTERPRETED_BF16, WINDOWED, HAS_SOFTCAP)

    for level in range(0, num_levels):
        segment = tl.load(_level_array(level_table_ptr, index_table_ptr, level, SEGMENTS) + row)
        length = tl.load(_level_array(level_table_ptr, index_table_ptr, level, LENS) + segment)
        chunk_len = tl.load(level_table_ptr + level * LEVEL_COLUMNS + CHUNK_LEN)
        chunk_base = tl.load(level_table_ptr + level * LEVEL_COLUMNS + CHUNK_BASE)
        chunk_first = 0
        chunk_end = tl.cdiv(length, chunk_len)
        if WINDOWED:
            level_offset = tl.load(_level_array(level_table_ptr, index_table_ptr, level, OFFSETS) + row)
            level_first = path_len + suffix_len - window - level_offset
            chunk_first = tl.maximum(level_first, 0) // chunk_len
            chunk_end = tl.where(level_first < length, chunk_end, 0)
        for chunk in range(chunk_first, chunk_end):
            partial_row = q_row + (chunk_base + chunk).to(tl.int64) * (num_rows * num_q_heads)
            chunk_lse = tl.load(partial_lse_ptr + partial_row, mask=head_valid, other=0.0)
            chunk_o = tl.load(partial_o_ptr + partial_row[:, None] * head_dim + dims[None, :],
                              mask=head_valid[:, None] & dim_valid[None, :], other=0.0)
            max_row, row_sum, acc = merge_state(max_row, row_sum, acc, chunk_lse, chunk_o)
    if HAS_SINKS:  # a key of logit sink_h and no value
        sink = tl.load(sinks_ptr + kv_head * group + heads, mask=head_valid, other=0.0) * 1.4426950408889634
        max_row, row_sum, acc = merge_state(max_row, row_sum, acc, sink, 0.0)

    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out = _to_output(out, out_ptr.dtype.element_ty, INTERPRETED_BF16)
    tl.store(out_ptr + q_row[:, None] * head_dim + dims[None, :], out, mask=head_valid[:, None] & dim_valid[None, :])


def block_sizes(num_rows, num_runs, group, float32, interpreter):
    """(BLOCK_M, BLOCK_N) of a level: BLOCK_M fits the average segment's rows (16..64: tl.dot's minimum, and a
    register budget). float32 operands go through IEEE dots that stage both tiles in shared memory: 64 x 64 tiles at
    D = 128 take 180 KB (compiled for sm_80/sm_90), 32-key tiles with at most 32 rows fit every sm_8x/sm_90 part."""
    max_rows = 32 if float32 and not interpreter else 64
    block_m = min(max_rows, max(16, triton.next_power_of_2(triton.cdiv(num_rows, max(num_runs, 1)) * group)))
    return block_m, 128 if interpreter else 32 if float32 else 64


def chunking(longest, tiles, num_kv_heads, block_n, interpreter):
    """(chunk length, chunks) of a level: its segments are split until (tiles x KV heads x chunks) reaches a few
    programs per SM (fewer in the interpreter, which runs programs in turn, but still several chunks so the merge
    path is exercised)."""
    target_programs = 16 if interpreter else 528  # 4 per SM of an H100
    key_blocks = triton.cdiv(longest, block_n)
    if key_blocks == 0:  # no keys at this level: only the other levels and the suffix count
        return block_n, 0
    num_chunks = min(key_blocks, max(1, triton.cdiv(target_programs, tiles * num_kv_heads)))
    chunk_len = triton.cdiv(key_blocks, num_chunks) * block_n
    return chunk_len, triton.cdiv(longest, chunk_len)


def launch(q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, index_table, level_table, level_launches,
           partial_o, partial_lse, out, scale, window, softcap, sinks, interpreter):
    """Run one layer on a plan: q [N, Hq, D]; level_keys/values per level [S_l, Hkv, C_l, D]; suffix_k/v [N, Hkv, C,
    D]; suffix_lens int32 [N]; index_table, level_table int32 (the module docstring); level_launches per level
    (tiles, chunks, BLOCK_M, BLOCK_N); partial_o float32 [chunks, N, Hq, D] and partial_lse [chunks, N, Hq] for every
    level's chunks; out [N, Hq, D] (written); scale a float; window None or int >= 1; softcap None or float > 0;
    sinks None or float32 [Hq]; interpreter: whether Triton's interpreter runs it. 16- and 32-bit floats only: the
    kernels accumulate in float32."""
    num_rows, num_q_heads, head_dim = q.shape
    if num_rows == 0:
        return
    num_kv_heads = suffix_k.shape[1]
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # 16-bit products are exact in fp32 anyway
    upcast_bf16 = interpreter and q.dtype == torch.bfloat16
    qk_scale = scale * math.log2(math.e)
    features = dict(WINDOWED=window is not None, HAS_SOFTCAP=softcap is not None)
    scale_over_cap, cap_log2 = (scale / softcap, softcap * math.log2(math.e)) if softcap is not None else (1.0, 1.0)
    window = window if window is not None else 0
    for level, (keys, values, (tiles, num_chunks, block_m, block_n)) in enumerate(
            zip(level_keys, level_values, level_launches, strict=True)):
        if num_chunks == 0 or tiles == 0:
            continue
        _level_partial_kernel[(tiles, num_kv_heads, num_chunks)](
            q, keys, values, suffix_lens, index_table, level_table, partial_o, partial_lse, level, qk_scale,
            scale_over_cap, cap_log2, window, num_rows, num_q_heads, num_kv_heads, keys.shape[2], head_dim,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=dot_precision,
            INTERPRETED_BF16=upcast_bf16, **features, num_warps=4)

    _suffix_merge_kernel[(num_rows, num_kv_heads)](
        q, suffix_k, suffix_v, suffix_lens, index_table, level_table, partial_o, partial_lse,
        sinks if sinks is not None else partial_lse, out, qk_scale, scale_over_cap, cap_log2, window,
        len(level_launches), num_rows, num_q_heads, num_kv_heads, suffix_k.shape[2], head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=128 if interpreter else 32, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision, INTERPRETED_BF16=upcast_bf16, **features, HAS_SINKS=sinks is not None,
        num_warps=4)
