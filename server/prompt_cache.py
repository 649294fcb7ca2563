"""The prompt-KV cache: each soft prompt's virtual-token KV computed once and shared by its requests.

A soft prompt of ``n`` virtual tokens contributes KV for positions ``0..n-1`` that does not depend on the
request: the prompt run alone (design notes, section 2: the KV-prefix form of a soft prompt reproduces PEFT's
logits to ~1e-7). For an embedding prompt the cache keeps the KV of the first ``p = n - 1`` positions; the last
virtual token is computed with each request's text, so a request with empty text still has an input position for
its first logits. A prefix-tuning prompt is KV already: its entry holds all ``p = n`` positions
(:func:`server.request.cached_prompt_positions`).

Layout of one entry (:class:`PromptKV`), ``bs`` = block size:
- ``p // bs`` *full blocks* in the paged KV pool, read-only and shared: every running request of that prompt
  version puts them first in its block table (one reference each, :class:`~server.block_pool.BlockPool`);
- a *tail* of ``p % bs`` positions, which cannot be shared because the request writes its own positions after
  it in the same block: it is computed into the first own block of the request that created the entry, then the
  runner keeps it as a small tensor and copies it into the first own block of every later request.

Keys are content hashes (``SoftPrompt.sha256``), so a replaced prompt never serves its old KV to new requests,
while requests admitted earlier keep theirs. The cache holds entries no running request uses under a byte budget
(``p`` positions times the KV bytes per position), evicting the least recently used first; entries in use are never
evicted. This class is accounting only (no tensors): the scheduler calls it, the runner fills the blocks and
keeps the tails. Engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.block_pool import BlockPool, BlockPoolExhausted


@dataclass(eq=False)
class PromptKV:
    """One prompt version's cached virtual-token KV.

    Attributes:
        key: content hash of the prompt.
        num_tokens: cached positions ``p`` (all virtual tokens but the last; all of them for prefix tuning).
        full_blocks: ``p // block_size`` shared pool blocks holding positions ``0..len*bs-1``.
        tail_len: ``p % block_size`` positions kept outside the pool.
        computed: whether the runner has filled the blocks and the tail.
        users: running requests holding this entry.
        nbytes: KV bytes of the ``p`` positions.
    """

    key: str
    num_tokens: int
    full_blocks: tuple[int, ...]
    tail_len: int
    computed: bool = False
    users: int = 0
    nbytes: int = 0


class PromptKVCache:
    """Prompt-KV entries over a shared :class:`BlockPool`, LRU under a byte budget for entries not in use.

    Args:
        pool: the KV block pool (shared with the requests).
        budget_bytes: most bytes of entries kept while no running request uses them.
        bytes_per_token: KV bytes of one position across all layers.
    """

    def __init__(self, pool: BlockPool, budget_bytes: int, bytes_per_token: int) -> None:
        self.pool = pool
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self._entries: OrderedDict[str, PromptKV] = OrderedDict()
        self._evicted: list[PromptKV] = []
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def num_blocks(self) -> int:
        """Pool blocks the entries hold (their full blocks)."""
        return sum(len(e.full_blocks) for e in self._entries.values())

    @property
    def idle_blocks(self) -> int:
        """Pool blocks of entries no running request uses (kept under the budget, evictable on demand)."""
        return sum(len(e.full_blocks) for e in self._entries.values() if e.users == 0)

    @property
    def blocks_saved(self) -> int:
        """Pool blocks that sharing saves now: every user beyond the first of an entry would need its own copy."""
        return sum(len(e.full_blocks) * max(e.users - 1, 0) for e in self._entries.values())

    def acquire(self, key: str, num_tokens: int) -> tuple[PromptKV, bool]:
        """The entry for ``key`` with one more user, created (not yet computed) on a miss.

        The caller puts ``entry.full_blocks`` first in the request's block table; this call has already added the
        request's reference to them.

        Returns:
            ``(entry, created)``; when created, the runner must compute it before the request runs, writing the
            tail into the request's first own block.
        Raises:
            BlockPoolExhausted: a new entry's blocks do not fit even after evicting every unused entry (nothing
                changes).
        """
        entry = self._entries.get(key)
        created = entry is None
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            full, tail = divmod(num_tokens, self.pool.block_size)
            self.make_room(full)
            blocks = self.pool.allocate(full)  # raises BlockPoolExhausted
            entry = PromptKV(key, num_tokens, tuple(blocks), tail, nbytes=num_tokens * self.bytes_per_token)
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            self.misses += 1
        entry.users += 1
        self.pool.share(entry.full_blocks)
        return entry, created

    def release(self, entry: PromptKV) -> None:
        """One user fewer (its block-table references are released by the caller), then trim to the budget.
        An entry that was never computed is dropped at once.

        Raises:
            ValueError: the entry has no user left (a double release).
        """
        if entry.users <= 0:
            raise ValueError(f"prompt-KV entry {entry.key[:12]} released with no user")
        entry.users -= 1
        if entry.users == 0 and not entry.computed:
            self._drop(entry)
        elif entry.key in self._entries:
            self._entries.move_to_end(entry.key)  # recency counts from the last use, not the first
        self.trim()

    def mark_computed(self, entry: PromptKV) -> None:
        """The runner filled the entry's blocks and kept its tail."""
        entry.computed = True
        self.trim()

    def make_room(self, num_blocks: int) -> bool:
        """Evict unused entries, least recently used first, until ``num_blocks`` blocks are free. Returns whether
        they are; when even evicting every unused entry would not free enough, evicts nothing."""
        if self.pool.num_free >= num_blocks:
            return True
        unused = [e for e in self._entries.values() if e.users == 0]
        if self.pool.num_free + sum(len(e.full_blocks) for e in unused) < num_blocks:
            return False
        for entry in unused:
            self._drop(entry)
            if self.pool.num_free >= num_blocks:
                return True
        return self.pool.num_free >= num_blocks

    def trim(self) -> None:
        """Evict unused entries, least recently used first, while the entries exceed the byte budget."""
        if self.nbytes <= self.budget_bytes:
            return
        for entry in [e for e in self._entries.values() if e.users == 0]:
            self._drop(entry)
            if self.nbytes <= self.budget_bytes:
                return

    def drain_evicted(self) -> list[PromptKV]:
        """Entries evicted since the last call: the runner drops their tails and, with a host tier, copies the
        computed ones out of their blocks before anything writes those blocks again."""
        out, self._evicted = self._evicted, []
        return out

    def _drop(self, entry: PromptKV) -> None:
        del self._entries[entry.key]
        self.nbytes -= entry.nbytes
        self.pool.release(entry.full_blocks)
        self._evicted.append(entry)


__all__ = ["BlockPoolExhausted", "PromptKV", "PromptKVCache"]
