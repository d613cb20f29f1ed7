"""SharedPrefixCache: each prompt's KV stored once, each sample's new KV in a suffix buffer that grows with it.

Layout per attention layer:
  prefix_keys / prefix_values   [B, Hkv, P_max, D]   prompt b's keys in positions [0, prefix_lens[b])
  suffix_keys / suffix_values   [N, Hkv, C, D]       sample i's generated keys in positions [0, suffix_length)
with N = B·n samples and ``sample_to_prompt[i]`` the prompt of sample i. Every sample advances in lockstep (one
token per decode step), so the suffix length is one Python int shared by all rows: appending a step is a slice
copy, not a scatter, and needs no host sync.

The suffix capacity C follows the tokens generated, never ``max_new_tokens``: it starts at ``SUFFIX_BLOCK``
positions and doubles (capped at ``max_new_tokens``) when a step would pass it, so the bytes held stay within 2x
of what the live rows wrote and the copies amortise to one per token. Rows leaving the batch are compacted by
copying only the positions written so far.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.attention import attention_implementation

# Suffix positions allocated at the start (then doubling): one block covers most short completions.
SUFFIX_BLOCK = 64


def _suffix_buffer(num_samples: int, like: torch.Tensor, capacity: int) -> torch.Tensor:
    return torch.empty((num_samples, like.shape[1], capacity, like.shape[3]), dtype=like.dtype, device=like.device)


class SharedPrefixLayer(CacheLayerMixin):
    """One attention layer's prefix and suffix buffers (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, prefix_keys, prefix_values, num_samples: int, capacity: int, owner: "SharedPrefixCache"):
        super().__init__()
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values
        self.suffix_keys = _suffix_buffer(num_samples, prefix_keys, capacity)
        self.suffix_values = _suffix_buffer(num_samples, prefix_values, capacity)
        self.owner = owner
        # (window, softcap, sinks) of this layer's attention in the op's form: set by fastbon.hf on the first call.
        self.attention_features = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        """Write this step's key/value [N, Hkv, 1, D] at the current suffix position; attention reads the buffers
        through the cache (``fastbon.hf``), so what is returned is only what HF's signature asks for."""
        # The position as a tensor, not a Python int: a compiled decode step then runs every step unchanged.
        self.suffix_keys.index_copy_(2, self.owner.position, key_states)
        self.suffix_values.index_copy_(2, self.owner.position, value_states)
        return self.suffix_keys, self.suffix_values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[2] + self.owner.suffix_length

    def get_max_length(self) -> int:
        return self.prefix_keys.shape[2] + self.owner.max_new_tokens

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

    def nbytes(self) -> tuple[int, int]:
        """(prefix bytes, suffix bytes) held by this layer."""
        prefix = sum(t.numel() * t.element_size() for t in (self.prefix_keys, self.prefix_values))
        suffix = sum(t.numel() * t.element_size() for t in (self.suffix_keys, self.suffix_values))
        return prefix, suffix


class SharedPrefixCache(Cache):
    """A transformers ``Cache`` whose prompts' KV is stored once and shared by the n samples of each prompt.

    Built from a prefill (``fastbon.prefill``); the decode loop calls ``reserve()`` before and ``advance()`` after
    each step.
    The attention function registered by ``fastbon.hf`` reads the buffers through ``layers[module.layer_idx]``
    and runs ``self.attention``: the shared-prefix attention of the backend chosen once for this cache.
    """

    def __init__(self, prefix_keys: list, prefix_values: list, prefix_lens: torch.Tensor,
                 sample_to_prompt: torch.Tensor, max_new_tokens: int, backend: str | None = None):
        self.attention = attention_implementation(prefix_keys[0].device, backend, prefix_keys[0].dtype)
        self.prefix_lens = prefix_lens.to(torch.int32)
        self.sample_to_prompt = sample_to_prompt.to(torch.int32)
        self.suffix_length = 0
        self.position = torch.zeros(1, dtype=torch.int64, device=self.prefix_lens.device)  # suffix_length, on device
        self.max_new_tokens = max_new_tokens
        self.suffix_capacity = min(SUFFIX_BLOCK, max_new_tokens)
        self.attention_calls = 0  # layers served by fastbon's attention: the decode loop checks the routing with it
        num_samples = sample_to_prompt.shape[0]
        layers = [SharedPrefixLayer(keys, values, num_samples, self.suffix_capacity, self)
                  for keys, values in zip(prefix_keys, prefix_values, strict=True)]
        super().__init__(layers=layers)
        self._refresh_lengths()

    @property
    def num_samples(self) -> int:
        return self.sample_to_prompt.shape[0]

    def _refresh_lengths(self) -> None:
        # After this step's key is written, attention sees suffix_length + 1 keys of its own.
        self.suffix_lens = torch.full((self.num_samples,), self.suffix_length + 1, dtype=torch.int32,
                                      device=self.sample_to_prompt.device)

    def reserve(self) -> bool:
        """Room for the next step's key: doubles the suffix capacity (capped at ``max_new_tokens``) when full.
        Returns whether it grew (the only time the suffix bytes rise)."""
        if self.suffix_length < self.suffix_capacity:
            return False
        if self.suffix_length >= self.max_new_tokens:
            raise RuntimeError(f"the cache holds max_new_tokens={self.max_new_tokens} positions already")
        self.suffix_capacity = min(2 * self.suffix_capacity, self.max_new_tokens)
        for layer in self.layers:
            layer.resize_suffix(None, self.suffix_length, self.suffix_capacity)
        return True

    def advance(self) -> None:
        """One decode step has been written into every layer."""
        self.suffix_length += 1
        self.position += 1
        self._refresh_lengths()

    def select_samples(self, rows: torch.Tensor) -> None:
        """Keep only the sample rows ``rows`` (int64, on the cache's device), in that order; only the positions
        written so far are copied."""
        self.sample_to_prompt = self.sample_to_prompt.index_select(0, rows)
        for layer in self.layers:
            layer.resize_suffix(rows, self.suffix_length, self.suffix_capacity)
        self._refresh_lengths()

    def nbytes(self) -> tuple[int, int]:
        """(prefix bytes, suffix bytes) held over all layers."""
        sizes = [layer.nbytes() for layer in self.layers]
        return sum(prefix for prefix, _ in sizes), sum(suffix for _, suffix in sizes)
