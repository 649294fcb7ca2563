"""Attention backends over the paged KV cache: the CPU backend (C++ paged decode kernel + grouped SDPA prefill, and
its pure-torch fallback) against the gather-based reference; write_kv + build_metadata; reading only in-range KV.

Every cache slot no row uses holds NaN, so a backend that reads past a row's ``seq_len`` (or an unused block)
produces a non-finite output and fails.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from server.attention import cpu as cpu_mod
from server.attention.backend import write_kv
from server.attention.cpu import CpuBackend, paged_decode_op
from server.attention.metadata import AttentionMetadata, RowSpec, build_metadata
from server.attention.reference import ReferenceBackend

HAVE_CXX = shutil.which(os.environ.get("CXX") or "c++") is not None  # the compiler cpu.py would run


def make_case(rows: list[tuple[int, int]], *, H: int = 9, KVH: int = 3, D: int = 64, bs: int = 16,
              shared_blocks: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0, spare: int = 7):
    """A paged cache holding ``rows`` (``(cached positions, new tokens)``, decode rows first) at scattered blocks.

    The first ``shared_blocks`` blocks of every row are the same physical blocks with the same K/V (a shared
    prompt). Unused slots are NaN. Returns ``(q [T,H,D], k_cache, v_cache, meta)``.
    """
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lens = [s + n for s, n in rows]
    assert all(n >= shared_blocks * bs for n in lens)
    own = [-(-n // bs) - shared_blocks for n in lens]
    nb = shared_blocks + sum(own) + spare
    ids = list(range(nb))
    rng.shuffle(ids)  # scattered, non-contiguous tables
    shared, at = ids[:shared_blocks], shared_blocks
    tables = []
    for k in own:
        tables.append(shared + ids[at : at + k])
        at += k
    k_cache = torch.full((nb, bs, KVH, D), float("nan"), dtype=dtype)
    v_cache = torch.full((nb, bs, KVH, D), float("nan"), dtype=dtype)
    pre = shared_blocks * bs
    shared_k, shared_v = torch.randn(pre, KVH, D, generator=g), torch.randn(pre, KVH, D, generator=g)
    for table, n in zip(tables, lens, strict=True):
        k = torch.cat([shared_k, torch.randn(n - pre, KVH, D, generator=g)]).to(dtype)
        v = torch.cat([shared_v, torch.randn(n - pre, KVH, D, generator=g)]).to(dtype)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)])
        write_kv(k_cache, v_cache, k, v, slots)
    meta = build_metadata([RowSpec(t, s, n) for t, (s, n) in zip(tables, rows, strict=True)], bs)
    q = torch.randn(meta.num_tokens, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, meta


def backends() -> list[CpuBackend]:
    """Kernel (when a compiler exists), pure-torch fallback, and the fallback with other prefill groupings."""
    out = [CpuBackend(use_kernel=False), CpuBackend(use_kernel=False, max_pad_waste=float("inf")),
           CpuBackend(use_kernel=False, max_pad_waste=0.0)]
    if HAVE_CXX:
        out.insert(0, CpuBackend())
    return out


def check_all(q, k_cache, v_cache, meta: AttentionMetadata, atol: float = 1e-5) -> None:
    D = q.shape[-1]
    expect = ReferenceBackend().forward(q, k_cache, v_cache, meta, D**-0.5)
    assert torch.isfinite(expect).all()
    for b in backends():
        got = b.forward(q, k_cache, v_cache, meta, D**-0.5)
        assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
        assert torch.isfinite(got).all(), (b.use_kernel, b.max_pad_waste)
        torch.testing.assert_close(got, expect, atol=atol, rtol=0, msg=lambda m, b=b: f"{b.__dict__}: {m}")


@pytest.fixture(scope="module")
def kernel():
    """The built kernel. The project's machines (and CI) have a C++ compiler, so its absence is a failure here, not
    a skip; the pure-torch fallback has tests of its own."""
    assert HAVE_CXX, "no C++ compiler found: `make test` expects gcc/g++ (Debian's build-essential)"
    op = paged_decode_op()
    assert op is not None, "a C++ compiler is present but the paged decode kernel did not build; see the log"
    return op


@pytest.mark.parametrize("bs", [1, 4, 16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (16, 2, 64), (4, 2, 40), (2, 1, 36)])
def test_decode_only_matches_reference(kernel, bs, heads):  # head_dim 36: not a multiple of 8, torch path
    H, KVH, D = heads
    # contexts ending mid-block and on block boundaries; one row of length 1
    rows = [(0, 1), (3, 1), (15, 1), (16, 1), (31, 1), (40, 1), (130, 1)]
    check_all(*make_case(rows, H=H, KVH=KVH, D=D, bs=bs))


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_prefill_only_matches_reference(bs):
    rows = [(0, 2), (19, 20), (0, 33), (5, 17), (100, 7), (16, 16)]
    check_all(*make_case(rows, bs=bs))


@pytest.mark.parametrize("bs", [1, 4, 16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 64)])
def test_mixed_step_matches_reference(bs, heads):
    H, KVH, D = heads
    rows = [(39, 1), (0, 1), (71, 1), (19, 20), (0, 40), (200, 3), (19, 20)]
    check_all(*make_case(rows, H=H, KVH=KVH, D=D, bs=bs, seed=3))


def test_long_context(kernel):
    # 600 and more positions; also few rows, so the kernel splits the context into pieces and merges them
    check_all(*make_case([(599, 1), (1023, 1), (600, 5)], bs=16))
    check_all(*make_case([(1499, 1)], bs=16, seed=1))
    check_all(*make_case([(0, 1), (1999, 1)], H=4, KVH=1, D=64, bs=4, seed=2))  # a piece of row 0 is empty


def test_single_thread_and_default_threads_agree(kernel):
    q, k, v, meta = make_case([(599, 1), (40, 1)], seed=5)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CpuBackend().forward(q, k, v, meta, 0.125)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(CpuBackend().forward(q, k, v, meta, 0.125), one, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bs", [4, 16])
def test_rows_sharing_prompt_blocks(bs):
    # every row's table starts with the same physical blocks (a shared soft-prompt KV), then its own blocks
    rows = [(40, 1), (33, 1), (2 * bs, 1), (19 + bs, 20), (2 * bs, 7)]
    q, k, v, meta = make_case(rows, bs=bs, shared_blocks=2)
    assert len({t[:2] for t in meta.block_tables_list}) == 1
    check_all(q, k, v, meta)


def test_decode_reads_nothing_past_seq_len(kernel):
    q, k, v, meta = make_case([(16, 1), (17, 1), (0, 1), (62, 1)], bs=16)
    # NaN everywhere a row does not own: also the rest of each row's last block
    out = torch.empty_like(q)
    kernel(q, k, v, meta.block_tables, meta.seq_lens, 0.125, out)
    assert torch.isfinite(out).all()
    # and poisoning any slot a row does own changes that row's output to NaN (the check can fail)
    k2 = k.clone()
    t = meta.block_tables_list[1]
    k2[t[1], 0] = float("nan")  # position 16 of row 1 (seq_len 18)
    kernel(q, k2, v, meta.block_tables, meta.seq_lens, 0.125, out)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_dtypes(dtype, atol):
    rows = [(39, 1), (600, 1), (0, 1), (19, 20)]
    q, k, v, meta = make_case(rows, dtype=dtype, seed=4)
    expect = ReferenceBackend().forward(q.float(), k.float(), v.float(), meta, 0.125)
    for b in backends():
        got = b.forward(q, k, v, meta, 0.125)
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), expect, atol=atol, rtol=0)


def test_strided_query_and_output_views(kernel):
    # q as a view of a wider projection output ([T, H*D + extra] sliced), as a fused QKV would give
    q, k, v, meta = make_case([(39, 1), (71, 1), (5, 1)], seed=6)
    wide = torch.randn(q.shape[0], q.shape[1] * q.shape[2] + 32)
    wide[:, : q.shape[1] * q.shape[2]] = q.reshape(q.shape[0], -1)
    qv = wide[:, : q.shape[1] * q.shape[2]].view(q.shape[0], q.shape[1], q.shape[2])
    assert not qv.is_contiguous()
    torch.testing.assert_close(CpuBackend().forward(qv, k, v, meta, 0.125),
                               ReferenceBackend().forward(q, k, v, meta, 0.125), atol=1e-5, rtol=0)


def test_kernel_rejects_bad_input(kernel):
    q, k, v, meta = make_case([(5, 1), (9, 1)], bs=4)
    out = torch.empty_like(q)
    bad = meta.block_tables.clone()
    bad[0, 0] = k.shape[0]  # a block outside the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(q, k, v, bad, meta.seq_lens, 0.125, out)
    with pytest.raises(RuntimeError, match="seq_len"):
        kernel(q, k, v, meta.block_tables, torch.tensor([0, 10]), 0.125, out)
    with pytest.raises(RuntimeError, match="seq_len"):
        kernel(q, k, v, meta.block_tables, torch.tensor([6, 100]), 0.125, out)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(q.double(), k.double(), v.double(), meta.block_tables, meta.seq_lens, 0.125, out.double())
    with pytest.raises(RuntimeError, match="multiple"):
        kernel(q[:, :8], k[:, :, :3], v[:, :, :3], meta.block_tables, meta.seq_lens, 0.125, out[:, :8])


def test_prefill_groups_split_uneven_rows():
    rows = [(19, 480), (19, 20), (19, 20), (19, 20), (0, 20)]
    _, _, _, meta = make_case(rows)
    groups = cpu_mod._plan_groups(meta, range(meta.num_rows), 2.0, 9 * 64, torch.float32)
    assert sorted(g.n for g in groups) == [1, 4]  # the 480-token row alone; the short ones together
    assert len(cpu_mod._plan_groups(meta, range(meta.num_rows), float("inf"), 9 * 64, torch.float32)) == 1
    assert len(cpu_mod._plan_groups(meta, range(meta.num_rows), 0.0, 9 * 64, torch.float32)) == 5


def test_forced_fallback_when_kernel_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_mod, "_tried", True)
    monkeypatch.setattr(cpu_mod, "_op", None)
    b = CpuBackend()
    assert not b.kernel_available
    q, k, v, meta = make_case([(39, 1), (71, 1), (19, 20)], seed=7)
    torch.testing.assert_close(b.forward(q, k, v, meta, 0.125), ReferenceBackend().forward(q, k, v, meta, 0.125),
                               atol=1e-5, rtol=0)


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(cpu_mod, "_tried", False)
    monkeypatch.setattr(cpu_mod, "_op", None)
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger="server.attention.cpu"):
        assert cpu_mod.paged_decode_op() is None
        assert cpu_mod.paged_decode_op() is None
    assert sum("falls back" in r.message for r in caplog.records) == 1
    q, k, v, meta = make_case([(39, 1), (19, 20)], seed=8)
    torch.testing.assert_close(CpuBackend().forward(q, k, v, meta, 0.125),
                               ReferenceBackend().forward(q, k, v, meta, 0.125), atol=1e-5, rtol=0)


def test_build_is_cached_by_source_flags_and_cpu(kernel, tmp_path, monkeypatch):
    first = cpu_mod.build_kernel()  # the kernel fixture's build: found in the cache, not rebuilt
    mtime = first.stat().st_mtime_ns
    assert cpu_mod.build_kernel() == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(cpu_mod, "_cpu_id", lambda: "another cpu")
    monkeypatch.setattr(cpu_mod, "_compile_command", lambda src, out: ["true"])  # an empty "build", no compiler
    other = cpu_mod.build_kernel(tmp_path)  # another CPU: another file name
    assert other.name != first.name and other.name.startswith("paged_decode_")
    monkeypatch.setattr(cpu_mod, "_cpu_id", lambda: "a third cpu")
    monkeypatch.setattr(cpu_mod, "_compile_command", lambda src, out: ["false"])
    with pytest.raises(RuntimeError, match="compiler exited 1"):
        cpu_mod.build_kernel(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [other.name]  # no temporary file left behind


def test_write_kv_and_metadata_put_keys_where_block_tables_say():
    bs, KVH, D = 4, 2, 8
    rows = [RowSpec([5, 2], 6, 1), RowSpec([7], 0, 1), RowSpec([1, 4, 0], 3, 6), RowSpec([3, 6], 0, 5)]
    meta = build_metadata(rows, bs)
    assert meta.num_decode_rows == 2 and meta.query_lens == (1, 1, 6, 5)
    assert meta.seq_lens_list == (7, 1, 9, 5)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 8, 13]
    assert meta.positions.tolist() == [6, 0, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4]
    assert meta.block_tables_list == ((5, 2), (7,), (1, 4, 0), (3, 6))
    assert meta.block_tables.tolist() == [[5, 2, 0], [7, 0, 0], [1, 4, 0], [3, 6, 0]]
    k_cache = torch.zeros(8, bs, KVH, D)
    v_cache = torch.zeros(8, bs, KVH, D)
    T = meta.num_tokens
    # token t's key is t+1 everywhere, its value -(t+1)
    k = torch.arange(1, T + 1, dtype=torch.float32)[:, None, None].expand(T, KVH, D).contiguous()
    write_kv(k_cache, v_cache, k, -k, meta.slot_mapping)
    t = 0
    for r, spec in enumerate(rows):
        for p in range(spec.start, spec.start + spec.num_tokens):
            blk, off = spec.block_table[p // bs], p % bs
            assert meta.slot_mapping[t] == blk * bs + off
            assert (k_cache[blk, off] == t + 1).all() and (v_cache[blk, off] == -(t + 1)).all(), (r, p)
            t += 1
    assert int((k_cache != 0).any(-1).any(-1).sum()) == T  # nothing else written


def test_build_metadata_rejects_bad_rows():
    with pytest.raises(ValueError, match="at least one"):
        build_metadata([RowSpec([0], 0, 0)], 4)
    with pytest.raises(ValueError, match="block table"):
        build_metadata([RowSpec([0], 3, 2)], 4)
    with pytest.raises(ValueError, match="decode-first"):
        build_metadata([RowSpec([0], 0, 2), RowSpec([1], 0, 1)], 4)
