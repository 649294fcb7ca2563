"""The prompt-KV cache (server.prompt_cache): shared full blocks + tail, ref counts, LRU under a byte budget.

Accounting only: every check is on block ids, reference counts and bytes (``num_tokens * bytes_per_token``).
The caller's side of a request is spelled out as the scheduler does it: ``acquire`` adds the request's reference to
the full blocks, the request releases them itself, then calls ``release``.
"""

from __future__ import annotations

import pytest

from server.block_pool import BlockPool, BlockPoolExhausted
from server.prompt_cache import PromptKV, PromptKVCache

BPT = 10  # bytes per token



def keys(entries) -> list[str]:
    """The keys of evicted entries, in eviction order."""
    return [e.key for e in entries]

def make(num_blocks: int = 16, block_size: int = 4, budget: int = 10_000) -> tuple[BlockPool, PromptKVCache]:
    pool = BlockPool(num_blocks, block_size)
    return pool, PromptKVCache(pool, budget, BPT)


def refs(pool: BlockPool) -> list[int]:
    return [pool.ref_count(b) for b in range(pool.num_blocks)]


def drop_user(pool: BlockPool, cache: PromptKVCache, entry: PromptKV) -> None:
    """What a finishing request does: release its block-table references to the full blocks, then the entry."""
    pool.release(entry.full_blocks)
    cache.release(entry)


def cached(pool: BlockPool, cache: PromptKVCache, key: str, num_tokens: int) -> PromptKV:
    """An entry computed and no longer used by anyone (kept under the budget)."""
    entry, created = cache.acquire(key, num_tokens)
    assert created
    cache.mark_computed(entry)
    drop_user(pool, cache, entry)
    return entry


def test_acquire_creates_full_blocks_and_leaves_the_tail_to_the_request():
    pool, cache = make(num_blocks=8)
    entry, created = cache.acquire("a", 10)  # 10 positions, blocks of 4: 2 full blocks + a tail of 2
    assert created
    assert entry.key == "a" and entry.num_tokens == 10
    assert entry.full_blocks == (0, 1) and entry.tail_len == 2
    assert not entry.computed and entry.users == 1 and entry.nbytes == 10 * BPT
    # the cache's own reference plus the request's on the full blocks; the tail goes to the request's own block
    assert refs(pool) == [2, 2, 0, 0, 0, 0, 0, 0]
    assert pool.num_free == 6
    assert len(cache) == 1 and cache.num_blocks == 2 and cache.nbytes == 100
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.blocks_saved == 0


def test_second_acquire_hits_and_shares_the_full_blocks():
    pool, cache = make(num_blocks=8)
    first, _ = cache.acquire("a", 10)
    second, created = cache.acquire("a", 10)
    assert not created and second is first
    assert first.users == 2
    assert refs(pool) == [3, 3, 0, 0, 0, 0, 0, 0]
    assert pool.num_free == 6  # a hit takes no block
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.blocks_saved == 2  # the second user reads 2 blocks it would otherwise need
    third, _ = cache.acquire("a", 10)
    assert third is first and first.users == 3 and refs(pool)[:2] == [4, 4]
    assert cache.blocks_saved == 4
    assert cache.nbytes == 100 and len(cache) == 1  # bytes counted once per entry


def test_mark_computed_keeps_the_full_blocks():
    pool, cache = make(num_blocks=8)
    entry, _ = cache.acquire("a", 10)
    cache.mark_computed(entry)
    assert entry.computed
    assert refs(pool) == [2, 2, 0, 0, 0, 0, 0, 0] and pool.num_free == 6
    assert cache.num_blocks == 2
    # a later user gets the same full blocks (the runner copies the tail it kept into its own block)
    again, created = cache.acquire("a", 10)
    assert not created and again.full_blocks == (0, 1)
    assert refs(pool)[:3] == [3, 3, 0]


def test_release_keeps_the_entry_under_budget():
    pool, cache = make(num_blocks=8, budget=100)
    entry = cached(pool, cache, "a", 10)
    assert entry.users == 0
    assert len(cache) == 1 and cache.nbytes == 100
    assert refs(pool) == [1, 1, 0, 0, 0, 0, 0, 0]  # the cache's own reference only
    assert keys(cache.drain_evicted()) == []
    again, created = cache.acquire("a", 10)
    assert not created and again is entry and refs(pool)[:2] == [2, 2]


def test_release_evicts_least_recently_used_unused_entries_over_budget():
    pool, cache = make(num_blocks=16, budget=300)
    a, b, c = (cached(pool, cache, k, 10) for k in "abc")  # 100 bytes each: exactly the budget
    assert len(cache) == 3 and cache.nbytes == 300 and keys(cache.drain_evicted()) == []
    assert (a.full_blocks, b.full_blocks, c.full_blocks) == ((0, 1), (2, 3), (4, 5))
    hit, _ = cache.acquire("a", 10)  # a becomes the most recently used: LRU order b, c, a
    drop_user(pool, cache, hit)
    d, created = cache.acquire("d", 10)
    assert created and cache.nbytes == 400  # over budget, but d is not computed yet: trimmed when it is
    cache.mark_computed(d)
    assert cache.nbytes == 300 and len(cache) == 3
    assert keys(cache.drain_evicted()) == ["b"]
    assert keys(cache.drain_evicted()) == []  # listed once
    assert pool.ref_count(2) == 0 and pool.ref_count(3) == 0  # b's blocks are free again
    drop_user(pool, cache, d)
    assert cache.nbytes == 300 and keys(cache.drain_evicted()) == []
    # a smaller budget evicts in LRU order: c, then a
    cache.budget_bytes = 150
    cache.trim()
    assert keys(cache.drain_evicted()) == ["c", "a"] and len(cache) == 1 and cache.nbytes == 100


def test_entries_in_use_are_never_evicted():
    pool, cache = make(num_blocks=16, budget=150)
    a, _ = cache.acquire("a", 10)
    b, _ = cache.acquire("b", 10)
    cache.mark_computed(a)
    cache.mark_computed(b)
    cache.trim()
    # 200 bytes over a budget of 150, but both are held by running requests
    assert len(cache) == 2 and cache.nbytes == 200 and keys(cache.drain_evicted()) == []
    assert cache.make_room(pool.num_blocks) is False  # nothing unused to evict
    assert len(cache) == 2 and keys(cache.drain_evicted()) == []
    drop_user(pool, cache, a)  # a unused, total over budget: evicted
    assert keys(cache.drain_evicted()) == ["a"] and len(cache) == 1 and cache.nbytes == 100
    drop_user(pool, cache, b)  # under budget now: kept
    assert len(cache) == 1 and keys(cache.drain_evicted()) == []


def test_make_room_evicts_unused_entries_lru_first_to_free_blocks():
    pool, cache = make(num_blocks=8, block_size=4)
    a = cached(pool, cache, "a", 8)  # 2 full blocks, no tail
    b, _ = cache.acquire("b", 8)  # in use
    cache.mark_computed(b)
    c = cached(pool, cache, "c", 8)
    assert (a.full_blocks, b.full_blocks, c.full_blocks) == ((0, 1), (2, 3), (4, 5))
    assert pool.num_free == 2
    assert cache.make_room(2) is True and keys(cache.drain_evicted()) == []  # already free: nothing evicted
    assert cache.make_room(3) is True
    assert keys(cache.drain_evicted()) == ["a"] and pool.num_free == 4 and len(cache) == 2
    assert cache.make_room(6) is True
    assert keys(cache.drain_evicted()) == ["c"] and pool.num_free == 6
    assert cache.make_room(7) is False  # b is in use
    assert len(cache) == 1 and refs(pool)[2:4] == [2, 2]


def test_make_room_evicts_nothing_when_evicting_every_unused_entry_is_not_enough():
    pool, cache = make(num_blocks=8, block_size=4)
    cached(pool, cache, "a", 8)
    cached(pool, cache, "b", 8)
    held = pool.allocate(3)  # a running request's own blocks
    assert pool.num_free == 1
    assert cache.make_room(6) is False
    assert len(cache) == 2 and keys(cache.drain_evicted()) == [] and pool.num_free == 1
    pool.release(held)
    assert cache.make_room(6) is True and keys(cache.drain_evicted()) == ["a"]


def test_acquire_of_a_new_prompt_evicts_unused_entries_to_fit():
    pool, cache = make(num_blocks=4, block_size=4)
    cached(pool, cache, "a", 8)  # blocks 0, 1
    cached(pool, cache, "b", 4)  # block 2
    assert pool.num_free == 1
    entry, created = cache.acquire("c", 9)  # 2 full blocks (+ a tail): one eviction is enough
    assert created and keys(cache.drain_evicted()) == ["a"]
    assert entry.full_blocks == (0, 1)  # a's blocks, reused
    assert len(cache) == 2 and cache.nbytes == (4 + 9) * BPT


def test_acquire_that_cannot_fit_raises_and_changes_nothing():
    pool, cache = make(num_blocks=4, block_size=4)
    cached(pool, cache, "a", 4)  # block 0, unused
    user, _ = cache.acquire("b", 4)  # block 1, in use
    pool.allocate(1)  # block 2, a request's own
    with pytest.raises(BlockPoolExhausted):
        cache.acquire("c", 13)  # 3 full blocks; evicting "a" would free only 2
    assert len(cache) == 2 and keys(cache.drain_evicted()) == [] and pool.num_free == 1
    assert (cache.hits, cache.misses) == (0, 2) and cache.nbytes == 80
    assert user.users == 1


def test_an_uncomputed_entry_whose_last_user_releases_is_dropped():
    pool, cache = make(num_blocks=8, budget=10_000)
    entry, _ = cache.acquire("a", 10)
    second, _ = cache.acquire("a", 10)
    drop_user(pool, cache, second)
    assert len(cache) == 1  # still one user
    drop_user(pool, cache, entry)
    # never computed: nothing to keep, even far under budget; every block is free
    assert len(cache) == 0 and cache.nbytes == 0 and pool.num_free == 8
    assert keys(cache.drain_evicted()) == ["a"]
    again, created = cache.acquire("a", 10)
    assert created and again is not entry


def test_blocks_saved_counts_users_beyond_the_first():
    pool, cache = make(num_blocks=16, block_size=4)
    a, _ = cache.acquire("a", 9)  # 2 full blocks
    for _ in range(2):
        cache.acquire("a", 9)
    b, _ = cache.acquire("b", 3)  # no full block: nothing to share
    cache.acquire("b", 3)
    c, _ = cache.acquire("c", 4)  # 1 full block, one user
    assert (len(a.full_blocks), len(b.full_blocks), len(c.full_blocks)) == (2, 0, 1)
    assert cache.blocks_saved == 2 * 2
    drop_user(pool, cache, a)
    assert cache.blocks_saved == 2 * 1


def test_exact_multiple_of_the_block_size_has_no_tail():
    pool, cache = make(num_blocks=4, block_size=4)
    entry, created = cache.acquire("a", 8)
    assert created and entry.full_blocks == (0, 1)
    assert entry.tail_len == 0
    assert cache.num_blocks == 2 and pool.num_free == 2
    cache.mark_computed(entry)
    assert pool.num_free == 2 and refs(pool) == [2, 2, 0, 0]


def test_prompt_shorter_than_a_block_is_all_tail():
    pool, cache = make(num_blocks=4, block_size=4)
    entry, _ = cache.acquire("a", 3)
    assert entry.full_blocks == () and entry.tail_len == 3
    assert refs(pool) == [0, 0, 0, 0]  # the tail is computed into the creating request's own block
    cache.mark_computed(entry)
    assert pool.num_free == 4 and cache.num_blocks == 0
    assert cache.nbytes == 3 * BPT  # the tail still counts: it is kept outside the pool


def test_budget_zero_keeps_nothing_unused():
    pool, cache = make(num_blocks=8, budget=0)
    entry, _ = cache.acquire("a", 10)
    cache.mark_computed(entry)
    assert len(cache) == 1 and cache.nbytes == 100  # in use: kept over the budget
    second, created = cache.acquire("a", 10)
    assert not created and second is entry
    drop_user(pool, cache, second)
    assert len(cache) == 1
    drop_user(pool, cache, entry)
    assert len(cache) == 0 and cache.nbytes == 0 and pool.num_free == 8
    assert keys(cache.drain_evicted()) == ["a"]
