"""The paged KV tensors (server.kv_pool): bytes per token, the block-aligned layout and slot ids."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from server.kv_pool import KVPool, kv_bytes_per_token, model_kv_shape


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    assert kv_bytes_per_token(2, 2, 16, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 64 * 2
    assert kv_bytes_per_token(30, 3, 64, torch.float32) == 46_080  # SmolLM2-135M in fp32


def test_model_kv_shape_reads_llama_configs():
    gqa = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert model_kv_shape(gqa) == (30, 3, 64)
    mha = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None, hidden_size=64)
    assert model_kv_shape(mha) == (2, 4, 16)
    explicit = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                               head_dim=32)
    assert model_kv_shape(explicit) == (2, 2, 32)


def test_kv_pool_is_block_aligned_and_zeroed():
    pool = KVPool(num_blocks=4, block_size=3, num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                  device="cpu")
    assert pool.k.shape == (2, 4, 3, 2, 8) and pool.v.shape == pool.k.shape
    assert pool.k.dtype == torch.float32 and pool.k.device.type == "cpu"
    assert (pool.num_blocks, pool.block_size) == (4, 3)
    assert float(pool.k.abs().sum()) == 0.0 and float(pool.v.abs().sum()) == 0.0
    assert pool.nbytes == 2 * 2 * 4 * 3 * 2 * 8 * 4
    assert pool.nbytes == pool.num_blocks * pool.block_size * kv_bytes_per_token(2, 2, 8, torch.float32)
    assert pool.k.data_ptr() != pool.v.data_ptr()


def test_slots_of_follows_the_block_table():
    pool = KVPool(num_blocks=4, block_size=3, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                  device="cpu")
    # blocks in sequence order, positions inside a block contiguous
    assert pool.slots_of([2, 0], 5).tolist() == [6, 7, 8, 0, 1]
    assert pool.slots_of([3], 3).tolist() == [9, 10, 11]
    assert pool.slots_of([1, 3, 0], 7).tolist() == [3, 4, 5, 9, 10, 11, 0]
    assert pool.slots_of([1], 0).tolist() == []


def test_a_slot_addresses_its_block_tile_in_every_layer():
    pool = KVPool(num_blocks=3, block_size=4, num_layers=2, num_kv_heads=1, head_dim=1, dtype=torch.float32,
                  device="cpu")
    slot = int(pool.slots_of([2, 1], 6)[5])  # position 5: block 1, offset 1
    pool.k.view(2, -1, 1, 1)[:, slot] = 7.0  # write through the flat slot view
    assert pool.k[:, 1, 1].flatten().tolist() == [7.0, 7.0]
    assert float(pool.k.sum()) == 14.0
