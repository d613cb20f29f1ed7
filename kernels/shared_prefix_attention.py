"""Triton shared-prefix decode attention: the one-level case of the tree kernels (``kernels/tree_attention.py``),
planned for the call alone (the decode loop plans once per batch change instead)."""

import torch

from fastbon.ops.tree_attention import TreePlan


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            scale, window=None, softcap=None, sinks=None):
    """Backend contract (validated, contiguous): q [N, Hq, D]; prefix_k/v [B, Hkv, P_max, D]; prefix_lens int32
    [B]; suffix_k/v [N, Hkv, T_max, D]; suffix_lens int32 [N]; sample_to_prompt int32 [N] (any mapping); scale a
    float; window None or int >= 1; softcap None or float > 0; sinks None or float32 [Hq]. Returns [N, Hq, D] in
    q's dtype. float16/bfloat16/float32 only: the kernels accumulate in float32."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32 for backend='triton' (float32 accumulation), "
                        f"got {str(q.dtype).removeprefix('torch.')}; use backend='torch' for float64")
    plan = TreePlan([prefix_lens], sample_to_prompt[None], suffix_k.shape[2], q.shape[1], prefix_k.shape[1],
                    q.shape[2], q.dtype, q.device, "triton")
    return plan.run(q, [prefix_k], [prefix_v], suffix_k, suffix_v, suffix_lens, scale, window, softcap, sinks)
