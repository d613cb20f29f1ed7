"""SharedPrefixCache: each prompt's KV stored once, each sample's new KV in a preallocated suffix buffer.

Layout per attention layer:
  prefix_keys / prefix_values   [B, Hkv, P_max, D]   prompt b's keys in positions [0, prefix_lens[b])
  suffix_keys / suffix_values   [N, Hkv, T_max, D]   sample i's generated keys in positions [0, suffix_length)
with N = B·n samples and ``sample_to_prompt[i]`` the prompt of sample i. Every sample advances in lockstep (one
token per decode step), so the suffix length is one Python int shared by all rows: appending a step is a slice
copy, not a scatter, and needs no host sync.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.attention import attention_implementation


class SharedPrefixLayer(CacheLayerMixin):
    """One attention layer's prefix and suffix buffers (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, prefix_keys, prefix_values, num_samples: int, max_new_tokens: int, owner: "SharedPrefixCache"):
        super().__init__()
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values
        num_kv_heads, head_dim = prefix_keys.shape[1], prefix_keys.shape[3]
        shape = (num_samples, num_kv_heads, max_new_tokens, head_dim)
        self.suffix_keys = torch.empty(shape, dtype=prefix_keys.dtype, device=prefix_keys.device)
        self.suffix_values = torch.empty(shape, dtype=prefix_values.dtype, device=prefix_values.device)
        self.owner = owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        """Write this step's key/value [N, Hkv, 1, D] at the current suffix position; attention reads the buffers
        through the cache (``fastbon.hf``), so what is returned is only what HF's signature asks for."""
        position = self.owner.suffix_length
        self.suffix_keys[:, :, position] = key_states[:, :, 0]
        self.suffix_values[:, :, position] = value_states[:, :, 0]
        return self.suffix_keys, self.suffix_values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[2] + self.owner.suffix_length

    def get_max_length(self) -> int:
        return self.prefix_keys.shape[2] + self.suffix_keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def select_samples(self, rows: torch.Tensor) -> None:
        """Keep only the given sample rows (early pruning): the suffix buffers shrink, the prefix stays."""
        self.suffix_keys = self.suffix_keys.index_select(0, rows)
        self.suffix_values = self.suffix_values.index_select(0, rows)

    def nbytes(self) -> tuple[int, int]:
        """(prefix bytes, suffix bytes) held by this layer."""
        prefix = sum(t.numel() * t.element_size() for t in (self.prefix_keys, self.prefix_values))
        suffix = sum(t.numel() * t.element_size() for t in (self.suffix_keys, self.suffix_values))
        return prefix, suffix


class SharedPrefixCache(Cache):
    """A transformers ``Cache`` whose prompts' KV is stored once and shared by the n samples of each prompt.

    Build it from a prefill with ``from_prompt_cache``; the decode loop calls ``advance()`` after each step.
    The attention function registered by ``fastbon.hf`` reads the buffers through ``layers[module.layer_idx]``
    and runs ``self.attention``: the shared-prefix attention of the backend chosen once for this cache.
    """

    def __init__(self, prefix_keys: list, prefix_values: list, prefix_lens: torch.Tensor,
                 sample_to_prompt: torch.Tensor, max_new_tokens: int, backend: str | None = None):
        self.attention = attention_implementation(prefix_keys[0].device, backend, prefix_keys[0].dtype)
        self.prefix_lens = prefix_lens.to(torch.int32)
        self.sample_to_prompt = sample_to_prompt.to(torch.int32)
        self.suffix_length = 0
        num_samples = sample_to_prompt.shape[0]
        layers = [SharedPrefixLayer(keys, values, num_samples, max_new_tokens, self)
                  for keys, values in zip(prefix_keys, prefix_values, strict=True)]
        super().__init__(layers=layers)
        self._refresh_lengths()

    @classmethod
    def from_prompt_cache(cls, prompt_cache: Cache, prompt_mask: torch.Tensor, samples_per_prompt: int,
                          max_new_tokens: int, backend: str | None = None) -> "SharedPrefixCache":
        """Take a left-padded prefill's cache ([B, Hkv, L, D] per layer, ``prompt_mask`` [B, L]) and move each
        prompt's valid positions to the front, so prompt b occupies [0, prefix_lens[b]) of the shared prefix."""
        prefix_lens = prompt_mask.sum(-1)
        padding = prompt_mask.shape[1] - prefix_lens
        positions = torch.arange(prompt_mask.shape[1], device=prompt_mask.device)
        source = (positions[None, :] + padding[:, None]).clamp(max=prompt_mask.shape[1] - 1)
        prefix_keys, prefix_values = [], []
        for layer in prompt_cache.layers:
            index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            prefix_keys.append(layer.keys.gather(2, index))
            prefix_values.append(layer.values.gather(2, index))
        sample_to_prompt = torch.arange(prompt_mask.shape[0], device=prompt_mask.device).repeat_interleave(
            samples_per_prompt)
        return cls(prefix_keys, prefix_values, prefix_lens, sample_to_prompt, max_new_tokens, backend)

    @property
    def num_samples(self) -> int:
        return self.sample_to_prompt.shape[0]

    def _refresh_lengths(self) -> None:
        # After this step's key is written, attention sees suffix_length + 1 keys of its own.
        self.suffix_lens = torch.full((self.num_samples,), self.suffix_length + 1, dtype=torch.int32,
                                      device=self.sample_to_prompt.device)

    def advance(self) -> None:
        """One decode step has been written into every layer."""
        self.suffix_length += 1
        self._refresh_lengths()

    def select_samples(self, rows: torch.Tensor) -> None:
        """Keep only the sample rows ``rows`` (int64, on the cache's device), in that order."""
        self.sample_to_prompt = self.sample_to_prompt.index_select(0, rows)
        for layer in self.layers:
            layer.select_samples(rows)
        self._refresh_lengths()

    def nbytes(self) -> tuple[int, int]:
        """(prefix bytes, suffix bytes) held over all layers."""
        sizes = [layer.nbytes() for layer in self.layers]
        return sum(prefix for prefix, _ in sizes), sum(suffix for _, suffix in sizes)
