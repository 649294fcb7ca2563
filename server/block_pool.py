"""KV block accounting with reference counts: the integers behind the paged KV cache (no tensors here).

A block holds ``block_size`` consecutive token positions of one sequence. A block may be shared: the full blocks
of a soft prompt's virtual-token KV are held by the prompt-KV cache and by every running request of that prompt
version (:mod:`server.prompt_cache`). A block returns to the free list when its last holder releases it.
Only the engine thread calls this (no locking).
"""

from __future__ import annotations

from collections import Counter


class BlockPoolExhausted(RuntimeError):
    """Not enough free blocks for an allocation (the scheduler evicts or preempts, then retries)."""


class BlockPool:
    """Free list + reference counts of ``num_blocks`` KV blocks.

    Args:
        num_blocks: blocks in the pool, ``>= 1``.
        block_size: token positions per block, ``>= 1``.
    Raises:
        ValueError: a size below 1.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs: list[int] = [0] * num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` positions need (ceil division)."""
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1.

        Raises:
            BlockPoolExhausted: fewer than ``n`` blocks are free (nothing is taken).
        """
        if n > len(self._free):
            raise BlockPoolExhausted(f"KV pool exhausted: need {n} blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: list[int] | tuple[int, ...]) -> None:
        """Add one reference to each of ``blocks`` (all must be held already).

        Raises:
            ValueError: a block is free.
        """
        for b in blocks:
            if self._refs[b] < 1:
                raise ValueError(f"block {b} is free; only held blocks can be shared")
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int] | tuple[int, ...]) -> None:
        """Drop one reference from each of ``blocks``; blocks reaching 0 return to the free list.

        Raises:
            ValueError: a block is already free (a double release is a bug in the caller).
        """
        for b, n in Counter(blocks).items():
            if self._refs[b] < n:
                raise ValueError(f"block {b} released {n} time(s) but holds {self._refs[b]} reference(s)")
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
