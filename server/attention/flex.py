"""FlexAttention backend: decode and varlen prefill read the paged KV pool in place through block masks.

One layer's cache ``[num_blocks, block_size, KVH, D]`` is viewed (no copy) as one long key sequence
``[1, KVH, num_blocks * block_size, D]``: key index ``s`` is slot ``s`` (block ``s // block_size``, offset
``s % block_size``). :func:`torch.nn.attention.flex_attention.flex_attention` then attends over it with a
:class:`~torch.nn.attention.flex_attention.BlockMask` whose KV blocks are the pool's blocks (the sparse KV block
size is the pool's ``block_size``), so a query only visits the blocks its row's block table lists:

- **decode rows** (one query each): one call with batch ``B`` and one query per batch entry, the KV batch of 1
  broadcast; entry ``b``'s KV blocks are row ``b``'s block table, all but the last marked *full* (no mask
  evaluated), the last one masked to ``seq_len``. This is paged attention.
- **prefill rows** (the rest of the step, packed): one call with batch 1 over the packed query tokens, cut into
  query blocks of ``q_block_size`` tokens; a query block visits the union of the blocks its rows need up to their
  positions (shared prompt blocks once), *full* where the block holds one row's already-visible positions only.

The ``mask_mod`` maps a key slot back to its row's logical position through ``block_logical`` (``[blocks]``: each
block's index in the block tables that hold it) and checks ``block_tables[row, logical] == block``: a block shared
by several rows (a cached soft prompt's KV) sits at the same index in each of their tables, since its keys were
computed at those positions; the model runner and the tests keep to that. The mask alone is exact, so eager
``flex_attention`` (which evaluates only the mask, densely) and the compiled kernels (which skip the blocks the
block mask leaves out) compute the same function.

A compiled kernel loads a row's last block whole, positions past the row's length included, and multiplies their
(zero) attention weights with their values: stale values left there by a block's previous owner would turn the
output into NaN if they were not finite (0 x inf). :meth:`FlexBackend.prepare`, which the layer walk calls once per
step, therefore zeroes those slots (only that row uses them, and it writes each before attending to it); eager mode
multiplies every value of its KV span, so there non-finite values are replaced by zeros in its copy.

Eager vs compiled: on CUDA the call is compiled (``torch.compile``: Triton kernels, shapes dynamic); on the CPU it
runs eagerly by default: torch's unfused implementation materializes ``[B, H, Q, S]`` scores, where this backend
restricts ``S`` to the span of blocks the step uses. It is for tests and for checking the CUDA path's logic on
machines without a GPU, not for serving (the ``cpu`` backend is). ``compile=True`` on the CPU runs inductor's C++
FlexAttention template (static shapes, since its dynamic-shape build fails to compile in torch 2.13; a few
seconds per new shape; its KV index tables must span the whole pool).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from server.attention.metadata import AttentionMetadata

_COMPILED: dict[bool, Any] = {}
#: Compiled variants allowed per call site: with dynamic shapes, a size of 1 (one decode row, one block, one query
#: block) still gets its own variant, and torch's default of 8 would end a run with an error (``fullgraph``).
RECOMPILE_LIMIT = 64


def flex_function(compile: bool, dynamic: bool = True):
    """``flex_attention``, or one ``torch.compile``'d copy per ``dynamic`` setting (shared by all backends; raises
    dynamo's process-wide recompile limit to at least :data:`RECOMPILE_LIMIT`)."""
    if not compile:
        return flex_attention
    fn = _COMPILED.get(dynamic)
    if fn is None:
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
        fn = _COMPILED[dynamic] = torch.compile(flex_attention, dynamic=dynamic, fullgraph=True)
    return fn


@dataclass(frozen=True)
class FlexPlan:
    """The step's block masks, built once per step and shared by every layer.

    Attributes:
        base, span: the KV view covers pool blocks ``[base, base + span)``; every index below is relative to it.
        decode: block mask of the decode call (batch ``num_decode_rows``, one query each), or None.
        prefill: block mask of the prefill call (batch 1, the step's other tokens packed), or None.
        block_logical: ``[span]`` int32 logical index of each block in the tables that hold it, -1 if none.
        tail_slots: ``[R * block_size]`` int64 pool slots of every row's last block (absolute ids).
        tail_unwritten: ``[R * block_size]`` bool: the slot lies past its row's length.
    """

    base: int
    span: int
    decode: BlockMask | None
    prefill: BlockMask | None
    block_logical: torch.Tensor
    tail_slots: torch.Tensor
    tail_unwritten: torch.Tensor


def _left_pack(keep: torch.Tensor, values: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``keep``/``values`` ``[..., N]``: the kept values first (in order), then zeros, to ``width``
    columns; and how many were kept. Sync-free (no ``nonzero``)."""
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    packed = torch.where(keep, values, 0).gather(-1, order).to(torch.int32)
    n = packed.shape[-1]
    if width > n:
        packed = torch.nn.functional.pad(packed, (0, width - n))
    return keep.sum(-1).to(torch.int32), packed[..., :width].contiguous()


def build_plan(meta: AttentionMetadata, num_blocks: int, q_block_size: int = 16, window: bool = False,
               pad_to_span: bool = False) -> FlexPlan:
    """Block masks for ``meta`` over a pool of ``num_blocks`` blocks.

    Args:
        meta: the step's metadata (decode rows first).
        num_blocks: blocks in the pool.
        q_block_size: query tokens per sparse query block of the prefill call.
        window: restrict the KV view to the span of blocks the step uses (eager mode: fewer scores); else the
            whole pool (a fixed KV length, as compiled kernels and CUDA graphs want).
        pad_to_span: make the KV index tables ``span`` columns wide (inductor's CPU template requires it).
    Returns:
        the :class:`FlexPlan`.
    Raises:
        ValueError: a block id outside the pool.
    """
    bs, dev = meta.block_size, meta.block_tables.device
    tables = meta.block_tables.to(torch.int64)  # [R, M]
    R, M = tables.shape
    B, T = meta.num_decode_rows, meta.num_tokens
    used = [b for t in meta.block_tables_list for b in t]
    if used and (min(used) < 0 or max(used) >= num_blocks):
        raise ValueError(f"a block table holds a block outside the pool of {num_blocks} blocks")
    base, span = (min(used), max(used) - min(used) + 1) if window and used else (0, num_blocks)
    cols = torch.arange(M, device=dev)
    nblk = (meta.seq_lens + bs - 1) // bs  # [R]
    valid = cols[None] < nblk[:, None]
    rel = torch.where(valid, tables - base, -1)  # [R, M], -1 past each row's blocks
    blog = torch.full((span + 1,), -1, dtype=torch.int32, device=dev)  # the last slot takes the invalid entries
    blog.scatter_(0, torch.where(valid, rel, span).flatten(), cols.to(torch.int32).expand(R, M).flatten())
    blog = blog[:span]
    rel32 = rel.to(torch.int32)
    seq_lens = meta.seq_lens
    offs = torch.arange(bs, device=dev)
    tail_slots = (tables.gather(1, (nblk - 1)[:, None]) * bs + offs).flatten()
    tail_unwritten = (offs[None] >= (seq_lens - (nblk - 1) * bs)[:, None]).flatten()
    decode = prefill = None
    if B:
        last = (nblk[:B] - 1)[:, None]  # [B, 1]
        full_n, full_i = _left_pack(cols[None] < last, rel[:B], max(M, span if pad_to_span else 0))
        part_i = rel[:B].gather(1, last).to(torch.int32)
        part_i = torch.nn.functional.pad(part_i, (0, full_i.shape[-1] - 1))

        def decode_mask(b, h, q_idx, kv_idx):
            blk = kv_idx // bs
            lb = blog[blk]
            return (lb >= 0) & (rel32[b, lb.clamp(min=0)] == blk) & (lb * bs + kv_idx % bs < seq_lens[b])

        decode = BlockMask.from_kv_blocks(
            torch.ones(B, 1, 1, dtype=torch.int32, device=dev), part_i[:, None, None],
            full_n[:, None, None], full_i[:, None, None], BLOCK_SIZE=(q_block_size, bs), mask_mod=decode_mask,
            seq_lengths=(1, span * bs), compute_q_blocks=False,
        )
    if T > B:
        Tp, qb = T - B, q_block_size
        QB = -(-Tp // qb)
        doc = torch.repeat_interleave(torch.arange(B, R), torch.tensor(meta.query_lens[B:])).to(dev)  # [Tp] rows
        qpos = meta.positions[B:]
        pad = QB * qb - Tp  # padding queries repeat the last token (their outputs are dropped)
        doc = torch.cat([doc, doc[-1:].expand(pad)])
        qpos = torch.cat([qpos, qpos[-1:].expand(pad)])
        rows_q, pos_q = doc.view(QB, qb), qpos.view(QB, qb)
        run_end = torch.ones_like(rows_q, dtype=torch.bool)
        run_end[:, :-1] = rows_q[:, :-1] != rows_q[:, 1:]  # a row's last (highest-position) token in the block
        cand = rel[rows_q]  # [QB, qb, M]
        keep = run_end[..., None] & (cols <= (pos_q // bs)[..., None]) & (cand >= 0)
        # a block an earlier row of the same query block already lists (a shared prompt block) is visited once:
        # a stable sort by block id puts its first listing first among equals
        ids = torch.where(keep, cand, -1).flatten(1)  # [QB, qb * M]
        sorted_ids, order = ids.sort(dim=-1, stable=True)
        repeat = torch.zeros_like(keep).flatten(1)
        repeat[:, 1:] = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
        keep &= ~torch.zeros_like(repeat).scatter_(1, order, repeat).view_as(keep)
        single = (rows_q == rows_q[:, :1]).all(-1)  # [QB] one row only
        full = keep & single[:, None, None] & (((cols + 1) * bs - 1) <= pos_q[:, :1, None])
        width = max(qb * M, span if pad_to_span else 0)
        part_n, part_i = _left_pack((keep & ~full).flatten(1), cand.flatten(1), width)
        full_n, full_i = _left_pack(full.flatten(1), cand.flatten(1), width)

        def prefill_mask(b, h, q_idx, kv_idx):
            blk = kv_idx // bs
            lb = blog[blk]
            r = doc[q_idx]
            return (lb >= 0) & (rel32[r, lb.clamp(min=0)] == blk) & (lb * bs + kv_idx % bs <= qpos[q_idx])

        prefill = BlockMask.from_kv_blocks(
            part_n[None, None], part_i[None, None], full_n[None, None], full_i[None, None],
            BLOCK_SIZE=(qb, bs), mask_mod=prefill_mask, seq_lengths=(Tp, span * bs), compute_q_blocks=False,
        )
    return FlexPlan(base, span, decode, prefill, blog, tail_slots, tail_unwritten)


class FlexBackend:
    """Attention over the paged KV pool through FlexAttention (see the module docstring).

    One instance per model runner (not thread-safe): it keeps the step's :class:`FlexPlan`.

    Args:
        compile: compile ``flex_attention`` (Triton on CUDA, C++ on the CPU); None: on CUDA only.
        q_block_size: query tokens per sparse block of the prefill call (a power of two, >= 16 on CUDA).
        kernel_options: passed to ``flex_attention``; None: on CUDA ``BLOCK_M = q_block_size``, ``BLOCK_N =
            block_size`` and ``FORCE_USE_FLEX_ATTENTION`` (the tile sizes must divide the sparse block sizes),
            on the CPU none.
        dynamic: ``torch.compile``'s ``dynamic``; None: True on CUDA, False on the CPU.
    """

    name = "flex"

    def __init__(self, compile: bool | None = None, q_block_size: int = 16,
                 kernel_options: dict[str, Any] | None = None, dynamic: bool | None = None) -> None:
        if q_block_size < 1 or q_block_size & (q_block_size - 1):
            raise ValueError(f"q_block_size must be a power of two, got {q_block_size}")
        self.compile = compile
        self.q_block_size = q_block_size
        self.kernel_options = kernel_options
        self.dynamic = dynamic
        self._plan: tuple[AttentionMetadata, tuple, FlexPlan] | None = None

    def _compiled(self, device: torch.device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def plan(self, meta: AttentionMetadata, num_blocks: int, device: torch.device) -> FlexPlan:
        """The step's :class:`FlexPlan` for a pool of ``num_blocks`` blocks (built on the first layer)."""
        compiled = self._compiled(device)
        key = (num_blocks, compiled)
        cached = self._plan
        if cached is not None and cached[0] is meta and cached[1] == key:
            return cached[2]
        plan = build_plan(meta, num_blocks, self.q_block_size, window=not compiled,
                          pad_to_span=compiled and device.type == "cpu")
        self._plan = (meta, key, plan)
        return plan

    def prepare(self, meta: AttentionMetadata, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
        """Once per step, before the layers (after nothing else writes the pool): zero the slots past each row's
        length in its last block, in every layer (see the module docstring).

        Args:
            meta: the step's metadata.
            k_pool, v_pool: ``[layers, num_blocks, block_size, KVH, D]``.
        """
        L, nb, bs, kvh, d = k_pool.shape
        plan = self.plan(meta, nb, k_pool.device)
        for pool in (k_pool, v_pool):
            flat = pool.view(L, nb * bs, kvh, d)
            kept = flat.index_select(1, plan.tail_slots).masked_fill_(plan.tail_unwritten[None, :, None, None], 0)
            flat.index_copy_(1, plan.tail_slots, kept)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """Causal GQA attention of every query token over its row's cached positions.

        Args:
            q: ``[T, H, D]`` queries after rotary, tokens in ``meta``'s decode-first order.
            k_cache, v_cache: ``[num_blocks, block_size, KVH, D]`` contiguous, already holding this step's K/V.
            meta: the step's :class:`AttentionMetadata`.
            scale: softmax scale.
        Returns:
            ``[T, H, D]`` contiguous, ``q``'s dtype.
        """
        T, H, D = q.shape
        nb, bs, kvh, _ = k_cache.shape
        plan = self.plan(meta, nb, q.device)
        compiled = self._compiled(q.device)
        fn = flex_function(compiled, self.dynamic if self.dynamic is not None else q.device.type == "cuda")
        lo, hi = plan.base * bs, (plan.base + plan.span) * bs
        k = k_cache.view(nb * bs, kvh, D)[lo:hi].permute(1, 0, 2)[None]  # [1, KVH, S, D], a view
        v = v_cache.view(nb * bs, kvh, D)[lo:hi].permute(1, 0, 2)[None]
        if not compiled:  # eager multiplies every value of the span: keep stale non-finite ones out
            v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        B = meta.num_decode_rows
        gqa = H != kvh
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            if plan.decode is not None:
                o = fn(q[:B].unsqueeze(2), k, v, block_mask=plan.decode, scale=scale, enable_gqa=gqa,
                       kernel_options=self._options(q, bs, compiled))  # [B, H, 1, D]
                out[:B] = o[:, :, 0]
            if plan.prefill is not None:
                o = fn(q[B:].transpose(0, 1)[None], k, v, block_mask=plan.prefill, scale=scale, enable_gqa=gqa,
                       kernel_options=self._options(q, bs, compiled))  # [1, H, T - B, D]
                out[B:] = o[0].transpose(0, 1)
        return out

    def _options(self, q: torch.Tensor, block_size: int, compiled: bool) -> dict[str, Any] | None:
        if self.kernel_options is not None:
            return dict(self.kernel_options)
        if compiled and q.device.type == "cuda":
            return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": self.q_block_size, "BLOCK_N": block_size}
        return None
