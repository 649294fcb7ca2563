"""KV block accounting with reference counts (server.block_pool): no tensors, exact block ids."""

from __future__ import annotations

import pytest

from server.block_pool import BlockPool, BlockPoolExhausted


def refs(pool: BlockPool) -> list[int]:
    return [pool.ref_count(b) for b in range(pool.num_blocks)]


def test_rejects_an_empty_pool_or_block():
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockPool(0, 16)
    with pytest.raises(ValueError, match="block_size >= 1"):
        BlockPool(4, 0)


def test_blocks_for_is_ceil_division():
    pool = BlockPool(10, 4)
    assert [pool.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9, 40)] == [0, 1, 1, 1, 2, 2, 3, 10]
    assert BlockPool(1, 1).blocks_for(7) == 7


def test_allocate_hands_out_low_ids_first_with_one_reference():
    pool = BlockPool(6, 4)
    assert (pool.num_free, pool.num_used) == (6, 0)
    assert refs(pool) == [0] * 6
    a = pool.allocate(3)
    b = pool.allocate(1)
    assert a == [0, 1, 2] and b == [3]
    assert refs(pool) == [1, 1, 1, 1, 0, 0]
    assert (pool.num_free, pool.num_used) == (2, 4)
    assert pool.allocate(0) == [] and pool.num_free == 2


def test_share_and_release_count_references():
    pool = BlockPool(4, 4)
    blocks = pool.allocate(2)  # [0, 1]
    pool.share(blocks)
    pool.share([1])
    assert refs(pool) == [2, 3, 0, 0]
    assert pool.num_used == 2  # sharing takes no block
    pool.release(blocks)
    assert refs(pool) == [1, 2, 0, 0] and pool.num_free == 2
    pool.release([1])
    pool.release([0])
    assert refs(pool) == [0, 1, 0, 0] and pool.num_free == 3
    pool.release([1])
    assert refs(pool) == [0, 0, 0, 0] and pool.num_free == 4 and pool.num_used == 0


def test_exhaustion_raises_and_takes_nothing():
    pool = BlockPool(4, 4)
    pool.allocate(3)
    with pytest.raises(BlockPoolExhausted, match="need 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1 and refs(pool) == [1, 1, 1, 0]
    assert pool.allocate(1) == [3]
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(1)
    assert isinstance(BlockPoolExhausted("x"), RuntimeError)


def test_double_release_raises_and_changes_nothing():
    pool = BlockPool(4, 4)
    a = pool.allocate(2)  # [0, 1]
    pool.release([0])
    with pytest.raises(ValueError, match=r"block 0 released 1 time\(s\) but holds 0"):
        pool.release([0])
    # one free block in the list: nothing of the call is applied, block 1 keeps its reference
    with pytest.raises(ValueError, match="block 0"):
        pool.release(a)
    assert refs(pool) == [0, 1, 0, 0] and pool.num_free == 3


def test_the_same_block_twice_in_one_release_needs_two_references():
    pool = BlockPool(3, 4)
    (b,) = pool.allocate(1)
    with pytest.raises(ValueError, match=f"block {b}"):
        pool.release([b, b])
    assert pool.ref_count(b) == 1 and pool.num_free == 2
    pool.share([b])
    pool.release([b, b])
    assert pool.ref_count(b) == 0 and pool.num_free == 3
    assert sorted(pool.allocate(3)) == [0, 1, 2]  # the block is in the free list exactly once


def test_share_of_a_free_block_raises_and_changes_nothing():
    pool = BlockPool(4, 4)
    pool.allocate(1)  # [0]
    with pytest.raises(ValueError, match="block 2 is free"):
        pool.share([0, 2])
    assert refs(pool) == [1, 0, 0, 0]  # block 0 did not get the reference either


def test_freed_blocks_are_reused():
    pool = BlockPool(5, 4)
    a = pool.allocate(3)  # [0, 1, 2]
    b = pool.allocate(2)  # [3, 4]
    assert pool.num_free == 0
    pool.release(a)
    assert pool.num_free == 3
    # the blocks released last come back first, in their original order
    assert pool.allocate(3) == [0, 1, 2]
    pool.release(b)
    pool.release([1])
    assert pool.allocate(3) == [1, 3, 4]
    assert refs(pool) == [1] * 5 and pool.num_free == 0


def test_a_shared_block_returns_to_the_free_list_only_with_its_last_holder():
    pool = BlockPool(2, 4)
    (b,) = pool.allocate(1)
    pool.share([b])  # a second holder (e.g. a request reading a cached prompt block)
    pool.release([b])
    assert pool.num_free == 1 and pool.ref_count(b) == 1
    assert pool.allocate(1) == [1]  # the held block is not handed out again
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(1)
    pool.release([b])
    assert pool.allocate(1) == [b]
