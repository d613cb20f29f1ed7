"""SharedPrefixCache: a tree of KV segments read once per step for every sample below them, plus a suffix per sample.

Layout per attention layer:
  level_keys[l] / level_values[l]   [S_l, Hkv, C_l, D]   the S_l segments of level l (keys in [0, lens_l[s]))
  suffix_keys / suffix_values       [N, Hkv, C, D]       sample row i's newest keys in positions [0, suffix_length)
Row i reads segment ``level_segments[l, i]`` of every level, root first, then its own suffix. The prefill gives the
first levels: the prompt (and a prefix common to all prompts above it, when there is one worth sharing). A fork
(``fork``) adds one: the suffixes written so far become a level of shared segments, with no copy, and each new row
continues from the segment of its parent.

Every row advances in lockstep (one token per decode step), so the suffix length is one Python int shared by all
rows: appending a step is a slice copy, not a scatter, and needs no host sync. The suffix capacity C follows the
tokens generated, never ``max_new_tokens``: it starts at ``SUFFIX_BLOCK`` positions and doubles when a step would
pass it, so the bytes held stay within 2x of what the live rows wrote; rows leaving the batch are compacted by
copying only the positions written so far.

The attention plan (``fastbon.ops.tree_attention.TreePlan``) is made when this structure changes — the start,
rows leaving, a fork, the suffix growing — never per layer or per step.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.tree_attention import TreePlan

# Suffix positions allocated at the start (then doubling): one block covers most short completions.
SUFFIX_BLOCK = 64


@dataclass
class PrefixLevel:
    """One level of the prefill's KV: per layer keys/values [S, Hkv, C, D]; lens int32 [S]; prompt_segment int64
    [B], each prompt's segment here."""

    keys: list
    values: list
    lens: torch.Tensor
    prompt_segment: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class _Cursor:
    """Where the next step's keys go, shared by the cache and its layers. A separate object, so the layers hold no
    reference back to the cache: a finished cache and its buffers are freed at once, not by the cycle collector
    (waves under a memory budget rely on it)."""

    def __init__(self, max_new_tokens: int, device):
        self.suffix_length = 0
        self.position = torch.zeros(1, dtype=torch.int64, device=device)  # suffix_length, on device
        self.max_new_tokens = max_new_tokens


def _suffix_buffer(num_samples: int, like: torch.Tensor, capacity: int) -> torch.Tensor:
    return torch.empty((num_samples, like.shape[1], capacity, like.shape[3]), dtype=like.dtype, device=like.device)


class SharedPrefixLayer(CacheLayerMixin):
    """One attention layer's level and suffix buffers (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, level_keys: list, level_values: list, num_samples: int, capacity: int, cursor: _Cursor):
        super().__init__()
        self.level_keys, self.level_values = list(level_keys), list(level_values)
        self.suffix_keys = _suffix_buffer(num_samples, level_keys[0], capacity)
        self.suffix_values = _suffix_buffer(num_samples, level_values[0], capacity)
        self.cursor = cursor
        # (window, softcap, sinks) of this layer's attention in the op's form: set by fastbon.hf on the first call.
        self.attention_features = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        """Write this step's key/value [N, Hkv, 1, D] at the current suffix position; attention reads the buffers
        through the cache (``fastbon.hf``), so what is returned is only what HF's signature asks for."""
        # The position as a tensor, not a Python int: a compiled decode step then runs every step unchanged.
        self.suffix_keys.index_copy_(2, self.cursor.position, key_states)
        self.suffix_values.index_copy_(2, self.cursor.position, value_states)
        return self.suffix_keys, self.suffix_values

    def key_capacity(self) -> int:
        """The most keys a row's path can hold in the levels' storage."""
        return sum(keys.shape[2] for keys in self.level_keys)

    def get_seq_length(self) -> int:
        return self.key_capacity() + self.cursor.suffix_length

    def get_max_length(self) -> int:
        return self.key_capacity() + self.cursor.max_new_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def resize_suffix(self, rows: torch.Tensor | None, written: int, capacity: int) -> None:
        """New suffix buffers of ``capacity`` positions holding the first ``written`` positions of ``rows`` (all rows
        when None): growth and compaction, copying only what was written."""
        for name in ("suffix_keys", "suffix_values"):
            old = getattr(self, name)
            new = _suffix_buffer(old.shape[0] if rows is None else rows.shape[0], old, capacity)
            written_part = old[:, :, :written]
            new[:, :, :written] = written_part if rows is None else written_part.index_select(0, rows)
            setattr(self, name, new)

    def freeze_suffix(self, num_rows: int, capacity: int) -> None:
        """The suffix buffers become a level (no copy); new empty ones of ``capacity`` positions for ``num_rows``."""
        self.level_keys.append(self.suffix_keys)
        self.level_values.append(self.suffix_values)
        self.suffix_keys = _suffix_buffer(num_rows, self.suffix_keys, capacity)
        self.suffix_values = _suffix_buffer(num_rows, self.suffix_values, capacity)

    def nbytes(self, first_levels: int) -> tuple[int, int]:
        """(bytes of the first ``first_levels`` levels, bytes of the others and the suffix)."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)
        shared = size(self.level_keys[:first_levels]) + size(self.level_values[:first_levels])
        generated = size(self.level_keys[first_levels:]) + size(self.level_values[first_levels:])
        return shared, generated + size((self.suffix_keys, self.suffix_values))


class SharedPrefixCache(Cache):
    """A transformers ``Cache`` whose prompts' KV is stored once and shared by the n samples of each prompt, and
    whose samples can fork (``fork``) without copying what they share.

    Built from a prefill (``fastbon.prefill``); the decode loop calls ``reserve()`` before and ``advance()`` after
    each step. The attention function registered by ``fastbon.hf`` reads the buffers through
    ``layers[module.layer_idx]`` and runs ``plan(...)``: this batch's tree-attention plan.
    """

    def __init__(self, levels: list, sample_to_prompt: torch.Tensor, max_new_tokens: int, backend: str | None = None,
                 first_capacity: int = SUFFIX_BLOCK):
        """``levels``: the prefill's ``PrefixLevel``s, root first; ``sample_to_prompt``: each sample row's prompt;
        ``first_capacity``: the suffix positions allocated at the start (a search that forks every few tokens
        asks for that many)."""
        self.backend = backend
        self.level_lens = [level.lens.to(torch.int32) for level in levels]
        self.level_segments = torch.stack([level.prompt_segment[sample_to_prompt.long()] for level in levels]).to(
            torch.int32)
        self.prefill_levels = len(levels)
        self.cursor = _Cursor(max_new_tokens, sample_to_prompt.device)
        self.position = self.cursor.position  # the same tensor, advanced in place
        self.forked_tokens = 0  # tokens per row held by the fork levels (before the current suffix)
        self.max_new_tokens = max_new_tokens
        self.suffix_capacity = min(first_capacity, max_new_tokens)
        self.attention_calls = 0  # layers served by fastbon's attention: the decode loop checks the routing with it
        self._plans = {}
        num_samples = sample_to_prompt.shape[0]
        layers = [SharedPrefixLayer([level.keys[index] for level in levels], [level.values[index] for level in levels],
                                    num_samples, self.suffix_capacity, self.cursor)
                  for index in range(len(levels[0].keys))]
        super().__init__(layers=layers)
        self._refresh_lengths()

    @property
    def suffix_length(self) -> int:
        return self.cursor.suffix_length

    @suffix_length.setter
    def suffix_length(self, value: int) -> None:
        self.cursor.suffix_length = value

    @property
    def num_samples(self) -> int:
        return self.level_segments.shape[1]

    @property
    def num_levels(self) -> int:
        return self.level_segments.shape[0]

    def _refresh_lengths(self) -> None:
        # After this step's key is written, attention sees suffix_length + 1 keys of its own.
        self.suffix_lens = torch.full((self.num_samples,), self.suffix_length + 1, dtype=torch.int32,
                                      device=self.level_segments.device)

    def plan(self, num_q_heads: int, keys: torch.Tensor) -> TreePlan:
        """The attention plan for queries of ``num_q_heads`` heads over a layer whose keys are like ``keys``
        [S, Hkv, C, D]: made on the first call after the structure changed, then reused by every layer and step."""
        key = (num_q_heads, keys.shape[1], keys.shape[3], keys.dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = TreePlan(self.level_lens, self.level_segments, self.suffix_capacity, num_q_heads,
                                               keys.shape[1], keys.shape[3], keys.dtype, keys.device, self.backend)
        return plan

    def _replan(self) -> None:
        """The structure changed: the plans of the shapes seen so far are updated now, in place and outside any
        compiled step."""
        for plan in self._plans.values():
            plan.update(self.level_lens, self.level_segments, self.suffix_capacity)

    def is_full(self) -> bool:
        """Whether the next step's key needs the suffix to grow (``reserve``)."""
        return self.suffix_length >= self.suffix_capacity

    def grown_capacity(self) -> int:
        """The suffix capacity ``reserve`` grows to: double, capped at what max_new_tokens leaves."""
        return min(2 * self.suffix_capacity, self.max_new_tokens - self.forked_tokens)

    def reserve(self) -> bool:
        """Room for the next step's key: grows the suffix to ``grown_capacity()`` when full. Returns whether it grew
        (the only time the suffix bytes rise)."""
        if not self.is_full():
            return False
        if self.suffix_length >= self.max_new_tokens - self.forked_tokens:
            raise RuntimeError(f"the cache holds max_new_tokens={self.max_new_tokens} positions already")
        self.suffix_capacity = self.grown_capacity()
        for layer in self.layers:
            layer.resize_suffix(None, self.suffix_length, self.suffix_capacity)
        for plan in self._plans.values():
            plan.grow_suffix(self.suffix_capacity)
        return True

    def advance(self) -> None:
        """One decode step has been written into every layer."""
        self.suffix_length += 1
        self.position += 1
        self._refresh_lengths()

    def select_samples(self, rows: torch.Tensor) -> None:
        """Keep only the sample rows ``rows`` (int64, on the cache's device), in that order; only the suffix positions
        written so far are copied, and the shared levels not at all."""
        self.level_segments = self.level_segments.index_select(1, rows)
        for layer in self.layers:
            layer.resize_suffix(rows, self.suffix_length, self.suffix_capacity)
        self._refresh_lengths()
        self._replan()

    def fork(self, parents: torch.Tensor, capacity: int = SUFFIX_BLOCK) -> None:
        """Replace the rows by children: new row j continues the path of old row ``parents[j]`` (int64, on the
        cache's device; a parent may have any number of children, or none). The suffixes written so far become a
        level of shared segments, without a copy, so the KV bytes grow only by what is generated after the fork;
        the new suffix buffers start at ``capacity`` positions (then double)."""
        if self.suffix_length > 0:
            old_rows = self.num_samples
            room = self.max_new_tokens - self.forked_tokens - self.suffix_length
            if room <= 0:
                raise RuntimeError(f"the cache holds max_new_tokens={self.max_new_tokens} positions already")
            self.suffix_capacity = min(capacity, room)
            for layer in self.layers:
                layer.freeze_suffix(parents.shape[0], self.suffix_capacity)
            self.level_lens.append(torch.full((old_rows,), self.suffix_length, dtype=torch.int32,
                                              device=parents.device))
            self.level_segments = torch.cat([self.level_segments, torch.arange(
                old_rows, dtype=torch.int32, device=parents.device)[None]]).index_select(1, parents)
            self.forked_tokens += self.suffix_length
            self.suffix_length = 0
            self.position.zero_()
        else:  # nothing written since the last fork: the children only take their parents' paths
            self.level_segments = self.level_segments.index_select(1, parents)
            for layer in self.layers:
                layer.resize_suffix(parents, 0, self.suffix_capacity)
        self._refresh_lengths()
        self._replan()

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the prefill's levels, bytes of what was generated: fork levels and suffix) over all layers."""
        sizes = [layer.nbytes(self.prefill_levels) for layer in self.layers]
        return sum(prefix for prefix, _ in sizes), sum(suffix for _, suffix in sizes)
