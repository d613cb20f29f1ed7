"""The ``triton`` backend: the backend contract of ``fastbon.ops.reference`` on the leaf kernels of
``fastbon.kernels``.

This is the glue the kernels do not hold: allocating outputs (``new_output``, poisoned under the tests), planning a
tree batch into the kernels' int32 tables, and serving the two-level op as a one-level tree.
"""

import torch

from ..kernels import sample as sample_kernel
from ..kernels import select_topk as select_topk_kernel
from ..kernels import tree_attention as tree_kernel
from ..kernels._launch import interpreted
from ._alloc import new_output

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for backend='triton' (float32 accumulation), "
                        f"got {str(dtype).removeprefix('torch.')}; use backend='torch' for float64")


class _TritonTreeState:
    """The triton backend's plan of a batch: per level its launch sizes, the kernels' index and level tables, the
    partial and output buffers every layer's run reuses."""

    def __init__(self, plan):
        device, num_rows = plan.device, plan.num_rows
        group = plan.num_q_heads // plan.num_kv_heads
        self.interpreter = interpreted(plan.level_segments)
        float32 = plan.dtype == torch.float32
        segments = plan.level_segments.long()
        path = torch.zeros(num_rows, dtype=torch.int64, device=device)
        arrays, rows, self.launches, chunk_base = [path], [], [], 0  # index_table's arrays; path_lens first
        for level in range(plan.num_levels):
            offsets = path.clone()
            path += plan.level_lens[level].long()[segments[level]]
            lens = plan.level_lens[level]
            counts = torch.bincount(segments[level], minlength=lens.shape[0])
            row_order = torch.argsort(segments[level], stable=True)
            run_segment = counts.nonzero().flatten()
            run_counts = counts[run_segment]
            run_first = (torch.cumsum(counts, 0) - counts)[run_segment]
            block_m, block_n = tree_kernel.block_sizes(num_rows, run_segment.shape[0], group, float32,
                                                       self.interpreter)
            tiles_per_run = (run_counts * group + block_m - 1) // block_m
            tile_end = torch.cumsum(tiles_per_run, 0)
            tiles = int(tile_end[-1]) if tile_end.numel() else 0  # the plan's one host read per level
            tile_run = torch.searchsorted(tile_end, torch.arange(tiles, device=device), right=True)
            tile_first = tile_end - tiles_per_run
            longest = int(lens.max()) if lens.numel() else 0
            chunk_len, num_chunks = tree_kernel.chunking(longest, max(tiles, 1), plan.num_kv_heads, block_n,
                                                         self.interpreter)
            columns = [lens, offsets, segments[level], row_order, run_first, run_counts, run_segment, tile_run,
                       tile_first]
            starts = []
            for column in columns:
                starts.append(sum(a.numel() for a in arrays))
                arrays.append(column)
            rows.append(starts + [chunk_len, chunk_base])
            self.launches.append((tiles, num_chunks, block_m, block_n))
            chunk_base += num_chunks
        arrays[0] = path  # path_lens: complete now
        self.index_table = torch.cat([a.to(torch.int32).flatten() for a in arrays]).contiguous()
        self.level_table = torch.tensor(rows or [[0] * tree_kernel.LEVEL_COLUMNS.value], dtype=torch.int32,
                                        device=device)
        self.partial_o = torch.empty((chunk_base, num_rows, plan.num_q_heads, plan.head_dim), dtype=torch.float32,
                                     device=device)
        self.partial_lse = torch.empty((chunk_base, num_rows, plan.num_q_heads), dtype=torch.float32, device=device)
        self.out = new_output((num_rows, plan.num_q_heads, plan.head_dim), plan.dtype, device)


def plan_tree(plan):
    """Plan of ``fastbon.ops.tree_attention.TreePlan`` for the triton backend."""
    _check_dtype(plan.dtype)
    return _TritonTreeState(plan)


def tree_attention(plan, q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, scale, window=None,
                   softcap=None, sinks=None):
    """Backend contract of ``reference.tree_attention`` on a plan (validated, contiguous; sinks None or float32
    [Hq]). Writes the plan's output buffer and returns it: each layer's output is consumed before the next
    layer's attention runs."""
    state = plan.state
    tree_kernel.launch(q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, state.index_table,
                       state.level_table, state.launches, state.partial_o, state.partial_lse, state.out, scale, window,
                       softcap, sinks, state.interpreter)
    return state.out


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            scale, window=None, softcap=None, sinks=None):
    """Backend contract of ``reference.shared_prefix_attention``: the one-level case of the tree kernels, planned
    for the call alone (the decode loop plans once per batch change instead)."""
    from .tree_attention import TreePlan

    _check_dtype(q.dtype)
    plan = TreePlan([prefix_lens], sample_to_prompt[None], suffix_k.shape[2], q.shape[1], prefix_k.shape[1],
                    q.shape[2], q.dtype, q.device, "triton")
    return plan.run(q, [prefix_k], [prefix_v], suffix_k, suffix_v, suffix_lens, scale, window, softcap, sinks)


def sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step):
    """Backend contract of ``reference.sample``: tokens int64 [N], logprobs float32 [N]."""
    num_rows = row_index.shape[0]
    tokens = new_output((num_rows,), torch.int64, logits.device)
    logprobs = new_output((num_rows,), torch.float32, logits.device)
    sample_kernel.sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs)
    return tokens, logprobs


def select_topk(scores, k):
    """Backend contract of ``reference.select_topk``: values [B, k] (scores' dtype), indices int64 [B, k]."""
    values = new_output((scores.shape[0], k), scores.dtype, scores.device)
    indices = new_output((scores.shape[0], k), torch.int64, scores.device)
    select_topk_kernel.select_topk(scores, k, values, indices)
    return values, indices
