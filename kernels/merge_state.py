"""FlashInfer's ``merge_state`` for Triton: a partial softmax state over other keys merged into a running one.

Every Triton kernel that merges partial attentions by their log-sum-exp calls ``merge_state``.
"""

import triton
import triton.language as tl


@triton.jit
def merge_state(max_row, row_sum, acc, lse, partial):
    """Merge the partial (``partial`` [M, D] normalised over its keys, ``lse`` [M] their log2-sum-exp2) into the
    running state (``max_row`` [M] the largest log2 score so far, ``row_sum`` [M] sum 2^(s - max), ``acc`` [M, D]
    the unnormalised sum 2^(s - max) v), as one key of score lse and value ``partial``:

        m' = max(m, lse),  l' = 2^(m - m') l + 2^(lse - m'),  acc' = 2^(m - m') acc + 2^(lse - m') o

    ``partial`` 0.0 adds a sink (a key with no value). Returns (m', l', acc'). A running state rather than a merge of
    two normalised states: the kernels hold their own keys' online softmax in this form, so a merge costs two exp2
    and no division; out = acc / l once at the end."""
    new_max = tl.maximum(max_row, lse)
    rescale = tl.exp2(max_row - new_max)
    weight = tl.exp2(lse - new_max)
    return new_max, row_sum * rescale + weight, acc * rescale[:, None] + weight[:, None] * partial
