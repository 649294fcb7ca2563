"""KV accounting (BlockAllocator), the KV pool layout, and the per-prompt prefix cache (LRU by bytes)."""

from __future__ import annotations

import pytest
import torch

from server.kv_cache import BlockAllocator, KVPool, PrefixCache, PrefixKV, kv_bytes_per_token


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    assert kv_bytes_per_token(2, 2, 16, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2


def test_block_allocator_rejects_empty_pool():
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)


def test_blocks_for_is_ceil_division():
    a = BlockAllocator(10, 4)
    assert [a.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free_account_blocks():
    a = BlockAllocator(10, 4)
    assert (a.num_free_blocks, a.num_used_blocks) == (10, 0)
    b1 = a.allocate("r1", 9)  # 3 blocks
    b2 = a.allocate("r2", 4)  # 1 block
    assert len(b1) == 3 and len(b2) == 1
    assert not set(b1) & set(b2)
    assert all(0 <= b < 10 for b in b1 + b2)
    assert (a.num_free_blocks, a.num_used_blocks) == (6, 4)
    a.free("r1")
    assert (a.num_free_blocks, a.num_used_blocks) == (9, 1)
    a.free("r1")  # no-op the second time
    a.free("never-allocated")
    assert a.num_free_blocks == 9
    a.free("r2")
    assert a.num_free_blocks == 10
    # every block can be handed out again, each exactly once
    again = a.allocate("r3", 40)
    assert sorted(again) == list(range(10))


def test_allocate_refuses_double_allocation_and_exhaustion():
    a = BlockAllocator(4, 4)
    a.allocate("r1", 8)
    with pytest.raises(ValueError, match="already holds"):
        a.allocate("r1", 1)
    assert a.can_allocate(8) and not a.can_allocate(9)
    with pytest.raises(ValueError, match="exhausted"):
        a.allocate("r2", 9)
    assert a.num_free_blocks == 2  # the failed call took nothing
    assert a.fits_ever(16) and not a.fits_ever(17)


def test_kv_pool_layout_and_slots():
    pool = KVPool(num_blocks=4, block_size=3, num_scratch=5, num_layers=2, num_kv_heads=2, head_dim=8,
                  dtype=torch.float32, device=torch.device("cpu"))
    assert pool.k.shape == (2, 4 * 3 + 5 + 1, 2, 8) and pool.v.shape == pool.k.shape
    assert pool.pad_slot == 4 * 3 + 5
    assert pool.scratch.tolist() == [12, 13, 14, 15, 16]
    assert float(pool.k.abs().sum()) == 0.0
    # blocks in sequence order, positions inside a block contiguous
    assert pool.slots_for([2, 0], 5).tolist() == [6, 7, 8, 0, 1]
    assert pool.slots_for([3], 3).tolist() == [9, 10, 11]


def _item(nbytes_per_tensor: int) -> PrefixKV:
    n = nbytes_per_tensor // 4
    return PrefixKV(torch.zeros(1, n, 1, 1), torch.zeros(1, n, 1, 1))


def test_prefix_cache_lru_by_bytes():
    cache = PrefixCache(capacity_bytes=3 * 800)
    items = {k: _item(400) for k in "abcd"}  # 800 bytes each (k + v)
    assert items["a"].nbytes == 800 and items["a"].num_tokens == 100
    for k in "abc":
        cache.put(k, items[k])
    assert len(cache) == 3 and cache.nbytes == 2400
    assert cache.get("a") is items["a"]  # "a" is now the most recently used
    cache.put("d", items["d"])  # evicts the least recently used: "b"
    assert cache.get("b") is None
    assert cache.get("a") is items["a"] and cache.get("c") is items["c"] and cache.get("d") is items["d"]
    assert cache.nbytes == 2400 and len(cache) == 3
    assert cache.hits == 4 and cache.misses == 1


def test_prefix_cache_evicts_several_for_a_big_item_and_skips_oversized():
    cache = PrefixCache(capacity_bytes=2000)
    cache.put("a", _item(400))
    cache.put("b", _item(400))
    big = _item(800)  # 1600 bytes: both others must go
    cache.put("c", big)
    assert len(cache) == 1 and cache.nbytes == 1600 and cache.get("c") is big
    cache.put("huge", _item(1200))  # 2400 > capacity: not kept, nothing evicted
    assert cache.get("huge") is None and cache.get("c") is big and cache.nbytes == 1600


def test_prefix_cache_put_same_key_twice_keeps_first():
    cache = PrefixCache(capacity_bytes=10_000)
    first, second = _item(400), _item(400)
    cache.put("k", first)
    cache.put("k", second)
    assert cache.get("k") is first and cache.nbytes == 800


def test_prefix_cache_zero_capacity_keeps_nothing():
    cache = PrefixCache(capacity_bytes=0)
    cache.put("k", _item(4))
    assert cache.get("k") is None and len(cache) == 0 and cache.nbytes == 0
