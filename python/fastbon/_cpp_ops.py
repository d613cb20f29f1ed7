"""The ``cpu`` and ``cuda`` backends: fastbon._C's torch.library ops behind the backend contract.

Importing ``fastbon._C`` registers ``torch.ops.fastbon.*`` (out-variant schemas; CPU kernels, and CUDA kernels when
built with CUDA). This module registers their fake kernels, so a decode step traces under ``torch.compile``, and
exposes the contract functions (see ``fastbon.ops.reference``), which allocate outputs with
``fastbon.ops._alloc.new_output`` and run the op on the inputs' device.
"""

import torch

from . import _C  # noqa: F401  (registers torch.ops.fastbon)
from .ops._alloc import new_output

_ops = torch.ops.fastbon


@torch.library.register_fake("fastbon::shared_prefix_attention_out")
def _(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt, scale, window, softcap,
      sinks, out):
    return None


@torch.library.register_fake("fastbon::tree_attention_out")
def _(q, level_keys, level_values, level_lens, level_segments, positions, items, suffix_k, suffix_v, suffix_lens,
      scale, window, softcap, sinks, workspace, index_workspace, out):
    return None


@torch.library.register_fake("fastbon::sample_out")
def _(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs):
    return None


@torch.library.register_fake("fastbon::select_topk_out")
def _(scores, k, values, indices):
    return None


@torch.library.register_fake("fastbon::skinny_linear_out")
def _(x, weight, bias, out):
    return None


@torch.library.register_fake("fastbon::philox_uniform")
def _(seed, step):
    return seed.new_empty(seed.shape, dtype=torch.float32)


def shared_prefix_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, sample_to_prompt,
                            scale, window=None, softcap=None, sinks=None):
    """Backend contract of ``reference.shared_prefix_attention``: out [N, Hq, D] in q's dtype. The op takes window
    and softcap 0 for none (the CUDA kernels refuse either, and sinks)."""
    out = new_output(q.shape, q.dtype, q.device)
    _ops.shared_prefix_attention_out(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                                     sample_to_prompt, float(scale), window or 0, softcap or 0.0, sinks, out)
    return out


# The cpu plan's workspace holds a partial per suffix chunk: it is made again when the suffix buffers grow.
SUFFIX_SIZED_PLAN = True


class _CpuTreeState:
    """The cpu backend's plan: positions and work items from the C++ planner, the workspaces and the output
    buffer every layer's run reuses."""

    def __init__(self, plan):
        self.positions, self.items, self.workspace, self.index_workspace = _ops.tree_attention_plan(
            plan.level_lens, plan.level_segments, plan.suffix_capacity, plan.num_q_heads, plan.num_kv_heads,
            plan.head_dim, plan.dtype == torch.float64)
        self.out = new_output((plan.num_rows, plan.num_q_heads, plan.head_dim), plan.dtype, plan.device)


def plan_tree(plan):
    """Plan of ``fastbon.ops.tree_attention.TreePlan`` for the cpu backend (CPU tensors only)."""
    if plan.device.type != "cpu":
        raise ValueError(f"the cpu backend's tree attention takes CPU tensors, not {plan.device.type}")
    return _CpuTreeState(plan)


def tree_attention(plan, q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, scale, window=None,
                   softcap=None, sinks=None):
    """Backend contract of ``reference.tree_attention`` on a plan: writes the plan's output buffer (the same tensor
    for every layer: each layer's output is consumed before the next layer's attention runs) and returns it."""
    state = plan.state
    _ops.tree_attention_out(q, level_keys, level_values, plan.level_lens, plan.level_segments, state.positions,
                            state.items, suffix_k, suffix_v, suffix_lens, float(scale), window or 0, softcap or 0.0,
                            sinks, state.workspace, state.index_workspace, state.out)
    return state.out


def sample(logits, row_index, temperature, top_k, top_p, min_p, seed, step):
    """Backend contract of ``reference.sample``: tokens int64 [N], logprobs float32 [N]."""
    num_rows = row_index.shape[0]
    tokens = new_output((num_rows,), torch.int64, logits.device)
    logprobs = new_output((num_rows,), torch.float32, logits.device)
    _ops.sample_out(logits, row_index, temperature, top_k, top_p, min_p, seed, step, tokens, logprobs)
    return tokens, logprobs


def select_topk(scores, k):
    """Backend contract of ``reference.select_topk``: values [B, k] (scores' dtype), indices int64 [B, k]."""
    values = new_output((scores.shape[0], k), scores.dtype, scores.device)
    indices = new_output((scores.shape[0], k), torch.int64, scores.device)
    _ops.select_topk_out(scores, k, values, indices)
    return values, indices


def skinny_linear(x, weight, bias=None):
    """x [rows, in] · weight [out, in]ᵀ (+ bias [out]), all contiguous and of one dtype (float32, bfloat16 or
    float16): out [rows, out]."""
    out = new_output((x.shape[0], weight.shape[0]), x.dtype, x.device)
    _ops.skinny_linear_out(x, weight, bias, out)
    return out


def philox_uniform(seed, step):
    """The C++ Philox uniform (float32) for int64 tensors seed, step of one shape; tests compare it bit for bit
    with ``fastbon.ops.philox.philox_uniform``."""
    return _ops.philox_uniform(seed, step)
