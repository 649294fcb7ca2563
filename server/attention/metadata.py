"""Per-step attention metadata: what every attention backend reads, built once per engine step.

Token order in a step (the "packed" layout): decode rows first, one query token each, then prefill rows, each a
run of consecutive query tokens. This is vLLM v1's ordering (decodes before prefills), so a backend can send the
first ``num_decode_tokens`` tokens to a paged decode kernel and the rest to a varlen prefill path.

Shapes use: ``T`` tokens in the step, ``R`` rows (requests), ``B`` decode rows (``B <= R``), ``M`` the longest
block table in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for one step; tensors live on the model's device.

    Attributes:
        positions: ``[T]`` int64 position of each query token in its sequence (rotary embedding input).
        slot_mapping: ``[T]`` int64 KV slot (``block * block_size + offset``) each token's new K/V is written to.
        query_start_loc: ``[R + 1]`` int64 cumulative query lengths; row ``r``'s tokens are
            ``[query_start_loc[r], query_start_loc[r+1])``.
        seq_lens: ``[R]`` int64 context length of each row after this step (cached + new positions).
        block_tables: ``[R, M]`` int32 physical block ids of each row's positions ``0..seq_len-1`` in order;
            entries past a row's last block are 0 and never read.
        num_decode_rows: rows ``0..B-1`` are decode rows: one query token each (so tokens ``0..B-1``); every
            one-token row counts, a one-token prompt or last prefill chunk included, since the math is the same.
        max_query_len, max_seq_len: largest query length / context length among the rows.
        block_size: token positions per KV block.
        query_lens, seq_lens_list, block_tables_list: the same as Python ints, for backends that loop on the host.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    num_decode_rows: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_lens: tuple[int, ...]
    seq_lens_list: tuple[int, ...]
    block_tables_list: tuple[tuple[int, ...], ...]

    @property
    def num_rows(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens))


@dataclass(frozen=True)
class RowSpec:
    """One row's share of a step, as the runner hands it to :func:`build_metadata`.

    Attributes:
        block_table: physical block ids holding positions ``0, 1, ...`` of the row's sequence.
        start: first position computed now (positions ``[0, start)`` are already in the KV cache).
        num_tokens: positions computed now, ``>= 1``.
    """

    block_table: tuple[int, ...] | list[int]
    start: int
    num_tokens: int


def build_metadata(rows: list[RowSpec], block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
    """Build the step's :class:`AttentionMetadata`. Rows must already be in decode-first order.

    Raises:
        ValueError: a row has no tokens, a decode row follows a prefill row, or a row's block table is too short
            for ``start + num_tokens`` positions.
    """
    num_decode = 0
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    seen_prefill = False
    for i, r in enumerate(rows):
        end = r.start + r.num_tokens
        if r.num_tokens < 1:
            raise ValueError(f"row {i} has {r.num_tokens} tokens; every row needs at least one")
        if len(r.block_table) * block_size < end:
            raise ValueError(
                f"row {i} needs {end} positions but its block table holds {len(r.block_table)} blocks of "
                f"{block_size}"
            )
        if r.num_tokens == 1 and not seen_prefill:
            num_decode += 1
        elif r.num_tokens == 1:
            raise ValueError(f"one-token row {i} comes after a prefill row; order rows decode-first")
        else:
            seen_prefill = True
        bt = r.block_table
        for p in range(r.start, end):
            slots.append(bt[p // block_size] * block_size + p % block_size)
        positions.extend(range(r.start, end))
        qsl.append(qsl[-1] + r.num_tokens)
        seq_lens.append(end)
    m = max((-(-s // block_size) for s in seq_lens), default=0)
    tables = [tuple(r.block_table[: -(-s // block_size)]) for r, s in zip(rows, seq_lens, strict=True)]
    bt_t = torch.zeros(len(rows), m, dtype=torch.int32)
    for i, t in enumerate(tables):
        if t:
            bt_t[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    qlens = tuple(r.num_tokens for r in rows)
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.long, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
        block_tables=bt_t.to(device),
        num_decode_rows=num_decode,
        max_query_len=max(qlens, default=0),
        max_seq_len=max(seq_lens, default=0),
        block_size=block_size,
        query_lens=qlens,
        seq_lens_list=tuple(seq_lens),
        block_tables_list=tuple(tables),
    )
