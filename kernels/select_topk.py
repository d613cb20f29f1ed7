"""Triton segmented top-k: the best k of each row of scores [B, n], best first, ties to the lower index."""

import torch
import triton
import triton.language as tl

from ._launch import interpreted


@triton.jit
def _select_topk_kernel(scores_ptr, values_ptr, indices_ptr, n, k,
                        BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr):
    """Rank by counting, then scatter the first k ranks.

    For row b and element j of that row:

        rank_j = #{i : x_i > x_j  or  (x_i == x_j and i < j)}

    is j's position in the order "larger first, then lower index" (-inf == -inf, so -inf ties by index too),
    a permutation of 0..n-1; element j goes to output slot rank_j when rank_j < k. Every slot < k is written
    exactly once, by exactly one program. Program (b, jb) ranks elements [jb*BLOCK_J, (jb+1)*BLOCK_J) against
    the whole row, BLOCK_I at a time: O(n^2) comparisons per row, exact for any float dtype (no key packing),
    and fully parallel, which is what n <= a few thousand samples needs.
    """
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_scores = scores_ptr + row.to(tl.int64) * n
    in_row_j = j < n
    x_j = tl.load(row_scores + j, mask=in_row_j)
    rank = tl.zeros([BLOCK_J], dtype=tl.int32)
    for start in range(0, n, BLOCK_I):
        i = start + tl.arange(0, BLOCK_I)
        x_i = tl.load(row_scores + i, mask=i < n)
        ahead = (x_i[None, :] > x_j[:, None]) | ((x_i[None, :] == x_j[:, None]) & (i[None, :] < j[:, None]))
        rank += tl.sum((ahead & (i[None, :] < n)).to(tl.int32), axis=1)
    selected = in_row_j & (rank < k)
    slot = row.to(tl.int64) * k + rank
    tl.store(values_ptr + slot, x_j, mask=selected)
    tl.store(indices_ptr + slot, j.to(tl.int64), mask=selected)


def select_topk(scores: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Launch on the backend contract's inputs: scores [B, n] float32/float64 contiguous without NaN, 1 <= k <= n
    (checked by the public op). Writes values [B, k] in scores' dtype and int64 indices [B, k]."""
    num_rows, n = scores.shape
    if num_rows == 0:
        return
    # On a GPU a 64 x 256 comparison tile keeps registers modest and gives B * n/64 programs; the interpreter
    # pays per op and per program, so it takes the widest tiles NumPy handles comfortably.
    widest_j, widest_i = (256, 1024) if interpreted(scores) else (64, 256)
    block_j = min(widest_j, triton.next_power_of_2(n))
    block_i = min(widest_i, triton.next_power_of_2(n))
    grid = (num_rows, triton.cdiv(n, block_j))
    _select_topk_kernel[grid](scores, values, indices, n, k, BLOCK_J=block_j, BLOCK_I=block_i)
