"""The engine's KV: one pool of fixed-size blocks per layer, read as the levels of the KV tree.

Every row's keys lie on a path of blocks: its prompt's blocks (shared by the n samples of the prompt, and by every
request whose prompt starts with the same cached blocks), then the blocks of its own generated tokens. Level l of
the tree is the l-th block of every row's path, so the pool's block index is the segment index at every level and
one ``TreePlan`` over the pool serves all rows of all requests: a block is read once per step for all the rows
that share it. A row whose path is shorter points at block 0 at the deeper levels, which is kept empty (length 0,
no partial state: it adds nothing to the row's sums).

``BLOCK`` is the cpu attention kernel's key chunk (``kChunk``), so each block is exactly one chunk of the kernel's
fixed-order reduction: a row's sums depend only on its own path, never on which rows share the step.
"""

from collections import OrderedDict

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops.tree_attention import TreePlan

BLOCK = 256
EMPTY = 0  # the block every row points at past the end of its path


class PoolFull(MemoryError):
    """No free block is left in the pool under the engine's memory budget."""


class BlockPool:
    """Per layer keys [blocks, Hkv, BLOCK, Dk] and values [blocks, Hkv, BLOCK, Dv], each block's length int32
    [blocks], and a reference count per block (rows on whose path it lies, plus the prefix cache)."""

    def __init__(self, layer_shapes: list, dtype, device, max_blocks: int, first_blocks: int = 16):
        """``layer_shapes``: per layer (kv_heads, key_dim, value_dim); ``max_blocks``: the budget's cap."""
        self.layer_shapes, self.dtype, self.device = layer_shapes, dtype, device
        self.max_blocks = max(2, max_blocks)
        capacity = min(self.max_blocks, max(2, first_blocks))
        self.keys = [torch.zeros((capacity, heads, BLOCK, key_dim), dtype=dtype, device=device)
                     for heads, key_dim, _ in layer_shapes]
        self.values = [torch.zeros((capacity, heads, BLOCK, value_dim), dtype=dtype, device=device)
                       for heads, _, value_dim in layer_shapes]
        self.lens = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.refs = [1] + [0] * (capacity - 1)  # the empty block is never handed out
        self.reserved = 0  # blocks' worth of the budget held for the rows' step buffers (logits, activations)
        self.free = list(range(capacity - 1, 0, -1))
        self.block_bytes = sum(heads * BLOCK * (key_dim + value_dim) for heads, key_dim, value_dim in layer_shapes) \
            * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity(self) -> int:
        return self.lens.shape[0]

    def blocks_in_use(self) -> int:
        return self.capacity - len(self.free) - 1  # the empty block holds nothing

    def nbytes(self) -> int:
        """Bytes held by the blocks in use (the pool's spare capacity is not counted)."""
        return self.blocks_in_use() * self.block_bytes

    def limit(self) -> int:
        return self.max_blocks - self.reserved

    def can_allocate(self, count: int) -> bool:
        return self.limit() - self.blocks_in_use() >= count

    def _grow(self) -> None:
        if self.capacity - 1 >= self.limit():  # the empty block takes a place in the tensors, not in the budget
            raise PoolFull(f"the KV pool holds its budget's {self.max_blocks} blocks")
        new = min(self.limit() + 1, 2 * self.capacity)
        for tensors in (self.keys, self.values):
            for index, old in enumerate(tensors):
                grown = old.new_zeros((new, *old.shape[1:]))
                grown[:old.shape[0]] = old
                tensors[index] = grown
        lens = self.lens.new_zeros(new)
        lens[:self.capacity] = self.lens
        self.free.extend(range(new - 1, self.capacity - 1, -1))
        self.refs.extend([0] * (new - self.capacity))
        self.lens = lens

    def allocate(self) -> int:
        """A free block (length 0) with one reference."""
        if self.blocks_in_use() >= self.limit():
            raise PoolFull(f"the KV pool holds its budget's {self.limit()} blocks")
        if not self.free:
            self._grow()
        block = self.free.pop()
        self.refs[block] = 1
        self.lens[block] = 0
        return block

    def ref(self, block: int) -> None:
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    def copy_block(self, source: int) -> int:
        """A new block holding ``source``'s keys and values (a fork's partial block)."""
        block = self.allocate()
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[block] = tensor[source]
        self.lens[block] = self.lens[source]
        return block

    def write_prompt(self, blocks: list, layer_keys: list, layer_values: list, start: int) -> None:
        """Store a prompt's keys/values per layer [Hkv, T, D] (positions [start, start + T)) in ``blocks`` (the
        prompt's blocks, the first of which holds position ``start``: ``start`` is a multiple of BLOCK)."""
        length = layer_keys[0].shape[1]
        for offset in range(0, length, BLOCK):
            block, end = blocks[(start + offset) // BLOCK], min(length, offset + BLOCK)
            for pool, keys in zip(self.keys, layer_keys, strict=True):
                pool[block, :, :end - offset] = keys[:, offset:end]
            for pool, values in zip(self.values, layer_values, strict=True):
                pool[block, :, :end - offset] = values[:, offset:end]
            self.lens[block] = end - offset

    def read_prompt(self, blocks: list, length: int) -> tuple[list, list]:
        """Per layer keys/values [1, Hkv, length, D] of the first ``length`` positions of ``blocks``."""
        def gather(pool):
            return torch.cat([pool[block] for block in blocks], dim=1)[None, :, :length]
        return [gather(pool) for pool in self.keys], [gather(pool) for pool in self.values]


class PrefixCache:
    """Prompt blocks kept after their requests complete, keyed by (weights version, the prompt's tokens up to the
    block's end): a new prompt starting with cached blocks takes them instead of forwarding those tokens again.
    Least recently used first out when the pool needs blocks. The cache holds one reference per block."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.entries = OrderedDict()  # key -> block

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, keys: list) -> list:
        """The cached blocks of the longest run of ``keys`` from the first, each touched (most recent)."""
        blocks = []
        for key in keys:
            block = self.entries.get(key)
            if block is None:
                break
            self.entries.move_to_end(key)
            blocks.append(block)
        return blocks

    def insert(self, key, block: int) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.pool.ref(block)
        self.entries[key] = block

    def evict(self, count: int) -> int:
        """Drop up to ``count`` least recently used blocks that nothing else holds; returns how many were freed."""
        freed = 0
        for key in list(self.entries):
            if freed >= count:
                break
            block = self.entries[key]
            if self.pool.refs[block] == 1:
                del self.entries[key]
                self.pool.release(block)
                freed += 1
        return freed

    def clear(self) -> None:
        for block in self.entries.values():
            self.pool.release(block)
        self.entries.clear()


class _PoolLayer(CacheLayerMixin):
    """One attention layer's view of the pool: every level is the pool itself (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "PagedCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.attention_features = None  # set by the attention router on the first call
        self.is_initialized = True

    @property
    def level_keys(self):
        return [self.cache.pool.keys[self.index]] * self.cache.num_levels

    @property
    def level_values(self):
        return [self.cache.pool.values[self.index]] * self.cache.num_levels

    @property
    def suffix_keys(self):
        return self.cache.empty_suffix[0]

    @property
    def suffix_values(self):
        return self.cache.empty_suffix[1]

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        """Write each row's key/value [N, Hkv, 1, D] at its place in its current block (the rows past the live ones
        pad the batch and write into the empty block, which no row reads)."""
        cache = self.cache
        self.cache.pool.keys[self.index][cache.write_blocks, :, cache.write_offsets] = key_states[:, :, 0]
        self.cache.pool.values[self.index][cache.write_blocks, :, cache.write_offsets] = value_states[:, :, 0]
        return self.suffix_keys, self.suffix_values

    def key_capacity(self) -> int:
        return self.cache.num_levels * BLOCK

    def get_seq_length(self) -> int:
        return self.cache.longest_path

    def get_max_length(self) -> int:
        return self.cache.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class PagedCache(Cache):
    """A transformers ``Cache`` over the block pool for one decode step of the engine's rows.

    ``set_rows`` gives each row's path (block ids, root first) and where its new key goes; the attention router
    (``fastbon.hf``) reads ``layers[i].level_keys`` / ``level_values``, an empty suffix and ``plan(...)``.
    """

    def __init__(self, pool: BlockPool, max_length: int, backend=None):
        self.pool, self.backend, self.max_length = pool, backend, max_length
        self.attention_calls = 0
        self._plans = {}
        self.num_levels = 1
        self.longest_path = 0
        self.empty_suffix = None
        layers = [_PoolLayer(self, index) for index in range(len(pool.keys))]
        super().__init__(layers=layers)

    def set_rows(self, paths: list, write_blocks: list, write_offsets: list, padded_rows: int,
                 levels: int | None = None, pad_paths: list = ()) -> None:
        """This step's rows: ``paths`` per live row its blocks (the last one receives the row's new key at
        ``write_offsets``); rows past ``len(paths)`` up to ``padded_rows`` pad the batch, reading ``pad_paths``
        first (``fastbon.engine``'s shadow rows), then an empty path; the tree has ``levels`` levels (default: the
        longest path; deeper levels are the empty block)."""
        device = self.pool.device
        self.num_levels = max(levels or 0, max(len(path) for path in (*paths, *pad_paths)))
        segments = torch.full((self.num_levels, padded_rows), EMPTY, dtype=torch.int32)
        for row, path in enumerate((*paths, *pad_paths)):
            segments[:len(path), row] = torch.tensor(path, dtype=torch.int32)
        self.level_segments = segments.to(device)
        pad = padded_rows - len(paths)
        self.write_blocks = torch.tensor(write_blocks + [EMPTY] * pad, dtype=torch.int64, device=device)
        self.write_offsets = torch.tensor(write_offsets + [0] * pad, dtype=torch.int64, device=device)
        self.longest_path = max((len(path) - 1) * BLOCK + offset + 1 for path, offset in zip(paths, write_offsets,
                                                                                            strict=True))
        first = self.pool.keys[0]
        if self.empty_suffix is None or self.empty_suffix[0].shape[0] != padded_rows:
            self.empty_suffix = tuple(torch.zeros((padded_rows, tensors[0].shape[1], 1, tensors[0].shape[3]),
                                                  dtype=first.dtype, device=device)
                                      for tensors in (self.pool.keys, self.pool.values))
            self.suffix_lens = torch.zeros(padded_rows, dtype=torch.int32, device=device)
        levels = [self.pool.lens] * self.num_levels
        for plan in self._plans.values():
            plan.update(levels, self.level_segments, 1)

    def plan(self, num_q_heads: int, keys: torch.Tensor) -> TreePlan:
        key = (num_q_heads, keys.shape[1], keys.shape[3], keys.dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = TreePlan([self.pool.lens] * self.num_levels, self.level_segments, 1,
                                               num_q_heads, keys.shape[1], keys.shape[3], keys.dtype, keys.device,
                                               self.backend)
        return plan
