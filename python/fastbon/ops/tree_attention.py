"""Tree (cascade) attention: rows reading a path of shared KV segments, and the plan every layer of a batch shares.

Each of N rows (one sample's query) attends to one segment of every level on its path from the root — a prefix
common to all prompts, its prompt, the samples it was forked from — then to its own suffix; the partial attentions
merge by log-sum-exp (FlashInfer's ``MultiLevelCascadeAttentionWrapper``). A segment is read once per step for all
the rows below it. Keys lie on row i's path in level order: level l's key t is at position (the lengths of i's
segments on the levels before l) + t, the suffix follows, and the query is the last suffix position.

``TreePlan`` splits the work as FlashInfer's ``plan()`` / ``run()`` does: everything that depends only on the batch
(rows grouped by segment, work items and tiles, workspace buffers, the backend) is computed once, when the batch
changes (the decode loop's start, rows leaving, forks, the suffix growing); each layer's call only runs it: no
allocation, no sorting and no host sync inside a layer (``run``).
"""

import math

import torch

from .. import dispatch
from . import _checks
from .attention import attention_features


def _features(window, softcap, sinks) -> tuple[str, ...]:
    return tuple(name for name, value in (("window", window), ("softcap", softcap), ("sinks", sinks))
                 if value is not None)


class TreePlan:
    """The batch's level structure, planned once for every layer's call.

    Args:
        level_lens: per level, int32 [S_l] the length of each of its segments (on the rows' device).
        level_segments: int32 [L, N]: row i's segment at level l.
        suffix_capacity: the positions of the suffix buffers the runs will read (a plan is remade when they grow).
        num_q_heads, num_kv_heads, head_dim, dtype, device: the calls' query shape and dtype.
        backend: None (pick per device, dtype and levels; FASTBON_BACKEND forces one) or a backend name. A forced
            backend that cannot take the tree (its levels, or a feature a run asks for) raises ValueError; the
            default choice moves to one that can, and logs why once (``fastbon.dispatch``).
    """

    def __init__(self, level_lens: list, level_segments: torch.Tensor, suffix_capacity: int, num_q_heads: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, backend=None):
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.requested = dispatch.requested_backend(backend)
        self.backend = None
        self._fallbacks = {}  # features -> the plan of the backend that serves runs this one declines
        self.update(level_lens, level_segments, suffix_capacity)

    def update(self, level_lens: list, level_segments: torch.Tensor, suffix_capacity: int) -> None:
        """Plan a changed batch in place (the same object: a compiled decode step keeps its graph)."""
        self.level_lens = [lens.to(torch.int32).contiguous() for lens in level_lens]
        self.level_segments = level_segments.to(torch.int32).contiguous()
        self.num_levels, self.num_rows = self.level_segments.shape
        self.suffix_capacity = suffix_capacity
        # The levels may have changed (forks add one): the backend is resolved again, and raises where forced.
        self.backend = dispatch.resolve("tree_attention", self.device, self.requested, self.dtype,
                                        levels=self.num_levels)
        self._module = dispatch.implementation("tree_attention", self.backend)
        self.state = self._module.plan_tree(self)
        for fallback in self._fallbacks.values():  # kept, and planned in place too, like this plan
            fallback.update(level_lens, level_segments, suffix_capacity)

    def grow_suffix(self, capacity: int) -> None:
        """The suffix buffers grew to ``capacity`` positions: only a backend whose plan sizes its workspace by them
        (``SUFFIX_SIZED_PLAN``: the cpu one) plans again; the others keep their plan, with no host read."""
        self.suffix_capacity = capacity
        if getattr(self._module, "SUFFIX_SIZED_PLAN", False):
            self.state = self._module.plan_tree(self)
        for fallback in self._fallbacks.values():
            fallback.grow_suffix(capacity)

    def _plan_for(self, features: tuple[str, ...]) -> "TreePlan":
        """This plan where its backend takes ``features``, else (default choice only) a plan of the backend the
        registry picks for them; a forced backend raises."""
        if features in self._fallbacks:
            return self._fallbacks[features]
        chosen = dispatch.resolve("tree_attention", self.device, self.requested, self.dtype, features=features,
                                  levels=self.num_levels)
        if chosen == self.backend:
            return self
        self._fallbacks[features] = TreePlan(self.level_lens, self.level_segments, self.suffix_capacity,
                                             self.num_q_heads, self.num_kv_heads, self.head_dim, self.dtype,
                                             self.device, chosen)
        return self._fallbacks[features]

    def run(self, q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, scale, window=None, softcap=None,
            sinks=None):
        """One layer's attention (inputs in the backend contract's form: contiguous, checked by the caller):
        q [N, Hq, D]; level_keys/values per level [S_l, Hkv, C_l, D]; suffix_k/v [N, Hkv, C, D] with C the plan's
        suffix_capacity; suffix_lens int32 [N]. Returns [N, Hq, D] in q's dtype (a buffer of the plan on the cpu
        and triton backends: valid until the next run)."""
        features = _features(window, softcap, sinks)
        plan = self
        if features and dispatch.entry("tree_attention", self.backend).supports(None, self.device, features,
                                                                                self.num_levels) is not None:
            plan = self._plan_for(features)
        return plan._module.tree_attention(plan, q, level_keys, level_values, suffix_k, suffix_v, suffix_lens, scale,
                                           window, softcap, sinks)


def tree_attention(q, levels, suffix_k, suffix_v, suffix_lens, *, scale=None, window=None, softcap=None, sinks=None,
                   backend=None):
    """Decode attention for N single-token queries over a tree of shared KV segments plus a suffix per row.

    Args:
        q: [N, Hq, D] queries (float16, bfloat16, float32, float64).
        levels: a list of (keys, values, lens, segments), the root level first: keys/values [S, Hkv, C, D] the
            level's S segments, lens int32 [S] their lengths (<= C), segments int32 [N] each row's segment.
        suffix_k, suffix_v: [N, Hkv, T, D] each row's own keys/values; suffix_lens: int32 [N] (<= T).
        scale, window, softcap, sinks, backend: as in ``fastbon.ops.shared_prefix_attention``; positions follow
            the row's path (see the module docstring).

    Returns:
        [N, Hq, D] in q's dtype: softmax attention of row i over its path's keys; zeros where it has no keys.

    Example:
        >>> out = tree_attention(q, [(common_k, common_v, common_lens, zeros), (prompt_k, prompt_v, lens, prompt)],
        ...                      suffix_k, suffix_v, suffix_lens)
    """
    _checks.tensor("q", q, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    device = q.device
    num_rows, num_q_heads, head_dim = q.shape
    for name, value in (("suffix_k", suffix_k), ("suffix_v", suffix_v)):
        _checks.tensor(name, value, ndim=4, dtypes=(q.dtype,), device=device)
    num_kv_heads = suffix_k.shape[1]
    _checks.shape("suffix_k", suffix_k, (num_rows, num_kv_heads, suffix_k.shape[2], head_dim))
    _checks.shape("suffix_v", suffix_v, suffix_k.shape)
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q's head count ({num_q_heads}) must be a multiple of the KV head count ({num_kv_heads})")
    _checks.tensor("suffix_lens", suffix_lens, ndim=1, dtypes=(torch.int32,), device=device)
    _checks.shape("suffix_lens", suffix_lens, (num_rows,))
    _checks.in_range("suffix_lens", suffix_lens, 0, suffix_k.shape[2])
    if not isinstance(levels, (list, tuple)):
        raise TypeError(f"levels must be a list of (keys, values, lens, segments) tuples, got {type(levels).__name__}")
    level_keys, level_values, level_lens, level_segments = [], [], [], []
    for index, level in enumerate(levels):
        if not isinstance(level, (list, tuple)) or len(level) != 4:
            raise TypeError(f"levels[{index}] must be a (keys, values, lens, segments) tuple")
        keys, values, lens, segments = level
        _checks.tensor(f"levels[{index}] keys", keys, ndim=4, dtypes=(q.dtype,), device=device)
        num_segments, capacity = keys.shape[0], keys.shape[2]
        _checks.shape(f"levels[{index}] keys", keys, (num_segments, num_kv_heads, capacity, head_dim))
        _checks.tensor(f"levels[{index}] values", values, ndim=4, dtypes=(q.dtype,), device=device)
        _checks.shape(f"levels[{index}] values", values, keys.shape)
        _checks.tensor(f"levels[{index}] lens", lens, ndim=1, dtypes=(torch.int32,), device=device)
        _checks.shape(f"levels[{index}] lens", lens, (num_segments,))
        _checks.in_range(f"levels[{index}] lens", lens, 0, capacity)
        _checks.tensor(f"levels[{index}] segments", segments, ndim=1, dtypes=(torch.int32,), device=device)
        _checks.shape(f"levels[{index}] segments", segments, (num_rows,))
        _checks.in_range(f"levels[{index}] segments", segments, 0, num_segments - 1)
        level_keys.append(keys.contiguous())
        level_values.append(values.contiguous())
        level_lens.append(lens)
        level_segments.append(segments)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    features = attention_features(window, softcap, sinks, num_q_heads, q.dtype, device)
    segments = torch.stack(level_segments) if level_segments else torch.zeros((0, num_rows), dtype=torch.int32,
                                                                              device=device)
    plan = TreePlan(level_lens, segments, suffix_k.shape[2], num_q_heads, num_kv_heads, head_dim, q.dtype, device,
                    backend)
    out = plan.run(q.contiguous(), level_keys, level_values, suffix_k.contiguous(), suffix_v.contiguous(),
                   suffix_lens, float(scale), *features)
    return out
