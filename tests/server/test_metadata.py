"""The per-step attention metadata builder (server.attention.metadata): exact tensors for hand-made rows."""

from __future__ import annotations

import pytest
import torch

from server.attention.metadata import RowSpec, build_metadata
from server.kv_pool import KVPool

BS = 4

# two decode rows, then two prefill rows; block tables are scattered and one is longer than needed
ROWS = [
    RowSpec((7, 2), start=5, num_tokens=1),  # position 5: block 2, offset 1
    RowSpec([3], start=0, num_tokens=1),  # a one-token prompt: decode math
    RowSpec((5, 0, 9), start=2, num_tokens=7),  # positions 2..8 across three blocks
    RowSpec((1, 6, 4, 8), start=0, num_tokens=3),  # needs only its first block
]


def test_positions_slots_and_lengths():
    m = build_metadata(ROWS, BS)
    assert m.positions.tolist() == [5, 0, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert m.slot_mapping.tolist() == [
        2 * BS + 1,
        3 * BS + 0,
        5 * BS + 2, 5 * BS + 3, 0, 1, 2, 3, 9 * BS + 0,
        1 * BS + 0, 1 * BS + 1, 1 * BS + 2,
    ]
    assert m.query_start_loc.tolist() == [0, 1, 2, 9, 12]
    assert m.seq_lens.tolist() == [6, 1, 9, 3]
    assert m.num_decode_rows == 2
    assert (m.max_query_len, m.max_seq_len, m.block_size) == (7, 9, BS)
    assert (m.num_rows, m.num_tokens) == (4, 12)
    assert m.query_lens == (1, 1, 7, 3) and m.seq_lens_list == (6, 1, 9, 3)
    for t in (m.positions, m.slot_mapping, m.query_start_loc, m.seq_lens):
        assert t.dtype == torch.int64 and t.device.type == "cpu"


def test_block_tables_are_cut_to_each_row_and_padded_with_zeros():
    m = build_metadata(ROWS, BS)
    assert m.block_tables.dtype == torch.int32
    assert m.block_tables.tolist() == [[7, 2, 0], [3, 0, 0], [5, 0, 9], [1, 0, 0]]
    assert m.block_tables_list == ((7, 2), (3,), (5, 0, 9), (1,))


def test_slot_mapping_agrees_with_the_kv_pool_layout():
    pool = KVPool(num_blocks=10, block_size=BS, num_layers=1, num_kv_heads=1, head_dim=2,
                  dtype=torch.float32, device="cpu")
    m = build_metadata(ROWS, BS)
    expect = []
    for r in ROWS:
        expect += pool.slots_of(list(r.block_table), r.start + r.num_tokens)[r.start:].tolist()
    assert m.slot_mapping.tolist() == expect


def test_num_decode_rows_counts_leading_one_token_rows():
    prefill_only = build_metadata([RowSpec((0, 1), 0, 5), RowSpec((2,), 1, 2)], BS)
    assert prefill_only.num_decode_rows == 0
    assert prefill_only.positions.tolist() == [0, 1, 2, 3, 4, 1, 2]
    assert prefill_only.query_start_loc.tolist() == [0, 5, 7]
    decode_only = build_metadata([RowSpec((4,), 3, 1), RowSpec((1, 2), 4, 1), RowSpec((6,), 0, 1)], BS)
    assert decode_only.num_decode_rows == 3 and decode_only.max_query_len == 1
    assert decode_only.slot_mapping.tolist() == [4 * BS + 3, 2 * BS + 0, 6 * BS + 0]
    assert decode_only.seq_lens.tolist() == [4, 5, 1]


def test_a_row_ending_on_a_block_boundary_uses_exactly_its_blocks():
    m = build_metadata([RowSpec((3, 1, 2), 4, 4)], BS)  # positions 4..7: all of block 1, nothing of block 2
    assert m.slot_mapping.tolist() == [4, 5, 6, 7]
    assert m.block_tables.tolist() == [[3, 1]] and m.seq_lens.tolist() == [8]


def test_no_rows():
    m = build_metadata([], BS)
    assert m.num_rows == 0 and m.num_tokens == 0 and m.num_decode_rows == 0
    assert m.positions.tolist() == [] and m.slot_mapping.tolist() == []
    assert m.query_start_loc.tolist() == [0] and m.block_tables.shape == (0, 0)
    assert (m.max_query_len, m.max_seq_len) == (0, 0)


def test_refuses_an_empty_row():
    with pytest.raises(ValueError, match="row 1 has 0 tokens"):
        build_metadata([RowSpec((0,), 0, 1), RowSpec((1,), 2, 0)], BS)


def test_refuses_a_block_table_too_short_for_the_row():
    with pytest.raises(ValueError, match="row 0 needs 5 positions but its block table holds 1 blocks of 4"):
        build_metadata([RowSpec((1,), 3, 2)], BS)
    with pytest.raises(ValueError, match="row 0 needs 1 positions"):
        build_metadata([RowSpec((), 0, 1)], BS)
    build_metadata([RowSpec((1,), 3, 1)], BS)  # exactly full: fine


def test_refuses_a_one_token_row_after_a_prefill_row():
    with pytest.raises(ValueError, match="one-token row 2 comes after a prefill row"):
        build_metadata([RowSpec((0,), 0, 1), RowSpec((1,), 0, 3), RowSpec((2,), 2, 1)], BS)
