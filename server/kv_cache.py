"""KV-cache storage and accounting (paged).

The KV cache is one preallocated pool per engine: ``[num_layers, num_slots, num_kv_heads, head_dim]`` for K and
for V. Slots are handed out in blocks of ``block_size`` token positions. Each running request reserves, at
admission, the blocks for everything it can ever hold (``virtual + text + max_new_tokens`` positions), so a
running request is never preempted; the price is memory reserved for tokens an early EOS never uses.

The scheduler only sees :class:`BlockAllocator` (integers, no tensors); the model runner owns :class:`KVPool`.

Per-prompt virtual-token KV (:class:`PrefixCache`) is computed once per prompt content and copied into each new
request of that task, so prefill covers only the text (design notes, section 2: the KV-prefix form of a soft
prompt reproduces PEFT's logits to ~1e-7).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers: ``2 * layers * kv_heads * head_dim * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


class BlockAllocator:
    """Block accounting for the KV pool. Pure Python; only the engine thread calls it.

    Args:
        num_blocks: blocks in the pool.
        block_size: token positions per block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._held: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` positions need (ceil division)."""
        return -(-num_tokens // self.block_size)

    def fits_ever(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` positions could be admitted into an empty pool."""
        return self.blocks_for(num_tokens) <= self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Reserve blocks for ``num_tokens`` positions; returns the block ids in sequence order.

        Raises:
            ValueError: not enough free blocks, or the id already holds blocks.
        """
        if request_id in self._held:
            raise ValueError(f"request {request_id} already holds KV blocks")
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise ValueError(f"KV pool exhausted: need {n} blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._held[request_id] = blocks
        return blocks

    def free(self, request_id: str) -> None:
        """Return a request's blocks to the pool (no-op if it holds none)."""
        self._free.extend(reversed(self._held.pop(request_id, [])))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)


class KVPool:
    """The preallocated K/V tensors.

    Attributes:
        k, v: ``[num_layers, num_slots, num_kv_heads, head_dim]``, zero-initialised; slot ``pad_slot`` stays
            zero and is where padded positions of a batch read from (always masked out).
        scratch: slot ids ``[num_scratch]`` outside the allocator's blocks, used to compute prompt prefixes.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_scratch: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_block_slots = num_blocks * block_size
        num_slots = self.num_block_slots + num_scratch + 1
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch = torch.arange(self.num_block_slots, self.num_block_slots + num_scratch, device=device)
        self.pad_slot = num_slots - 1

    def slots_for(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        """Slot id of each position ``0..num_tokens-1`` of a sequence holding ``blocks``: ``[num_tokens]``."""
        b = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        offs = torch.arange(self.block_size, device=self.k.device)
        return (b[:, None] * self.block_size + offs[None]).reshape(-1)[:num_tokens]


@dataclass(frozen=True)
class PrefixKV:
    """KV of a soft prompt's virtual tokens computed alone at positions ``0..p-1``.

    Attributes:
        k, v: ``[num_layers, p, num_kv_heads, head_dim]``.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PrefixCache:
    """LRU of :class:`PrefixKV` keyed by prompt content hash (``SoftPrompt.sha256``), bounded in bytes.

    Content keys mean a replaced prompt never serves its old KV to new requests, while requests admitted earlier
    already hold their own copy. Thread-safe.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, PrefixKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> PrefixKV | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, item: PrefixKV) -> None:
        """Insert, evicting least recently used entries; an item larger than the whole budget is not kept."""
        with self._lock:
            if key in self._items or item.nbytes > self.capacity_bytes:
                return
            self._items[key] = item
            self._bytes += item.nbytes
            while self._bytes > self.capacity_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
