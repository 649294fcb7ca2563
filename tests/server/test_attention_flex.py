"""The FlexAttention backend on the CPU: against the reference backend (eager, and once compiled), its block masks
against its own mask, the tail zeroing, and the engine's greedy tokens against the CPU backend's.

Cases come from ``test_attention.make_case``: scattered block tables, shared prompt blocks, NaN in every slot no row
owns. The backend reads whole blocks, so :meth:`FlexBackend.prepare` runs first, as the layer walk runs it.
Tolerances: fp32 ``atol 1e-5`` (measured ~1e-6), bf16 ``atol 2e-2`` against an fp32 reference (as the CPU
backend's half-precision test).
"""

from __future__ import annotations

import pytest
import torch
from srv_helpers import Spec, make_engine, make_prompt, rand_tensor, run_sync
from test_attention import make_case

from server.attention.flex import FlexBackend, build_plan
from server.attention.reference import ReferenceBackend

CASES = {
    "decode": dict(rows=[(0, 1), (3, 1), (15, 1), (16, 1), (31, 1), (40, 1), (130, 1)]),
    "prefill": dict(rows=[(0, 2), (19, 20), (0, 33), (5, 17), (100, 7), (16, 16)]),
    "mixed": dict(rows=[(39, 1), (0, 1), (71, 1), (19, 20), (0, 40), (200, 3), (19, 20)], seed=3),
    "mixed-gqa4": dict(rows=[(39, 1), (71, 1), (19, 20), (0, 40)], H=8, KVH=2, D=32, seed=4),
    "shared-16": dict(rows=[(40, 1), (33, 1), (32, 1), (35, 20), (32, 7)], shared_blocks=2),
    "shared-4-tails": dict(rows=[(40, 1), (33, 1), (8, 1), (23, 20), (9, 7), (10, 30)], shared_blocks=2, bs=4,
                           seed=5),
    "one-row": dict(rows=[(0, 1)]),
}


def run_flex(backend: FlexBackend, q, k, v, meta, scale: float = 0.125) -> torch.Tensor:
    k, v = k.clone(), v.clone()
    with torch.inference_mode():
        backend.prepare(meta, k[None], v[None])
        return backend.forward(q, k, v, meta, scale)


@pytest.mark.parametrize("name", list(CASES))
def test_eager_flex_matches_reference(name):
    q, k, v, meta = make_case(**CASES[name])
    expect = ReferenceBackend().forward(q, k, v, meta, 0.125)
    got = run_flex(FlexBackend(), q, k, v, meta)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_eager_flex_bf16():
    q, k, v, meta = make_case([(39, 1), (600, 1), (0, 1), (19, 20)], dtype=torch.bfloat16, seed=4)
    expect = ReferenceBackend().forward(q.float(), k.float(), v.float(), meta, 0.125)
    got = run_flex(FlexBackend(), q, k, v, meta)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expect, atol=2e-2, rtol=0)


def test_compiled_flex_on_cpu_matches_reference():
    """Inductor's C++ FlexAttention kernel visits only the blocks the block masks list (eager mode evaluates the
    mask everywhere), so this checks the masks drive a real kernel: shared blocks once, full blocks unmasked."""
    q, k, v, meta = make_case(**CASES["shared-4-tails"])
    expect = ReferenceBackend().forward(q, k, v, meta, 0.125)
    torch.testing.assert_close(run_flex(FlexBackend(compile=True), q, k, v, meta), expect, atol=1e-5, rtol=0)


def _dense(mask_mod, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """``[batch, q_len, kv_len]`` bool: the mask evaluated at every pair."""
    qi, ki = torch.arange(q_len)[:, None], torch.arange(kv_len)[None]
    return torch.stack([mask_mod(torch.tensor(b), torch.tensor(0), qi, ki).expand(q_len, kv_len)
                        for b in range(batch)])


def _check_block_mask(bm, dense: torch.Tensor, real_q: int) -> None:
    """Each query block lists (partial or full, once) exactly the KV blocks where its real queries attend to
    something, and a full block is attended whole by every real query of its block."""
    qbs, kbs = bm.BLOCK_SIZE
    B, _, kv_len = dense.shape
    for b in range(B):
        for qb in range(bm.kv_num_blocks.shape[-1]):
            rows = dense[b, qb * qbs : min((qb + 1) * qbs, real_q)]  # [q, kv]
            tiles = rows.view(rows.shape[0], kv_len // kbs, kbs)
            need = set(torch.nonzero(tiles.any(-1).any(0)).flatten().tolist())
            part = bm.kv_indices[b, 0, qb, : bm.kv_num_blocks[b, 0, qb]].tolist()
            full = bm.full_kv_indices[b, 0, qb, : bm.full_kv_num_blocks[b, 0, qb]].tolist()
            assert len(part) + len(full) == len(set(part) | set(full)), (b, qb, part, full)  # no block twice
            assert set(part) | set(full) == need, (b, qb)
            for j in full:
                assert tiles[:, j].all(), (b, qb, j)


@pytest.mark.parametrize("name", ["mixed", "shared-16", "shared-4-tails"])
@pytest.mark.parametrize("q_block", [1, 4, 16])
def test_block_masks_list_exactly_the_attended_blocks(name, q_block):
    _, k, _, meta = make_case(**CASES[name])
    plan = build_plan(meta, k.shape[0], q_block)
    B, kv_len = meta.num_decode_rows, plan.span * meta.block_size
    if B:
        _check_block_mask(plan.decode, _dense(plan.decode.mask_mod, B, 1, kv_len), 1)
    tp = meta.num_tokens - B
    if tp:
        _check_block_mask(plan.prefill, _dense(plan.prefill.mask_mod, 1, tp, kv_len), tp)
    # the mask itself: query t of row r attends to exactly its row's positions 0..position[t]
    owners = {}
    for r, (table, qlen, slen) in enumerate(zip(meta.block_tables_list, meta.query_lens, meta.seq_lens_list,
                                                strict=True)):
        first = slen - qlen
        owners[r] = [{table[p // meta.block_size] * meta.block_size + p % meta.block_size for p in range(first + i + 1)}
                     for i in range(qlen)]
    dec = _dense(plan.decode.mask_mod, B, 1, kv_len) if B else None
    pre = _dense(plan.prefill.mask_mod, 1, tp, kv_len)[0] if tp else None
    t = 0
    for r in range(meta.num_rows):
        for i in range(meta.query_lens[r]):
            got = dec[r, 0] if r < B else pre[t - B]
            assert set(torch.nonzero(got).flatten().tolist()) == owners[r][i], (r, i)
            t += 1


def test_window_covers_only_the_step_blocks():
    _, k, _, meta = make_case(**CASES["mixed"])
    used = {b for t in meta.block_tables_list for b in t}
    plan = build_plan(meta, k.shape[0], window=True)
    assert plan.base == min(used) and plan.span == max(used) - min(used) + 1
    assert build_plan(meta, k.shape[0]).span == k.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        build_plan(meta, max(used))


def test_prepare_zeroes_only_unwritten_tail_slots():
    q, k, v, meta = make_case([(5, 1), (15, 1), (14, 3)], bs=4, spare=2)
    k = torch.nan_to_num(k, nan=7.0)
    before = k.clone()
    FlexBackend().prepare(meta, k[None], k[None].clone())
    changed = {int(s) for s in torch.nonzero((k != before).any(-1).any(-1).flatten()).flatten()}
    expect = set()
    for table, slen in zip(meta.block_tables_list, meta.seq_lens_list, strict=True):
        last = table[-1]
        expect |= {last * 4 + o for o in range(slen - 4 * (len(table) - 1), 4)}
    assert changed == expect and len(expect) == 2 + 0 + 3  # rows of 6, 16 and 17 positions


def test_q_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        FlexBackend(q_block_size=12)


def test_engine_greedy_tokens_equal_with_flex_and_cpu_backends(tiny_loaded):
    """Mixed tasks, base rows, shared prompt blocks (block size 4) and tails, chunked prefill, decode: the engine
    gives the same greedy tokens with either backend (fp32)."""
    prompts = {n: make_prompt(f"f{n}", rand_tensor(n, scale=1.0 + n / 4, seed=n)) for n in (1, 6, 11)}
    g = torch.Generator().manual_seed(1)
    specs = [Spec(torch.randint(3, 49152, (n,), generator=g).tolist(), p, m) for n, p, m in [
        (5, prompts[6], 6), (17, None, 5), (1, prompts[1], 4), (30, prompts[11], 7), (8, prompts[6], 6),
        (3, None, 4), (12, prompts[11], 5)]]
    cfg = dict(block_size=4, max_num_batched_tokens=48, kv_cache_bytes=2 * 1024**2, prompt_kv_cache_bytes=1024**2)
    tokens = {}
    for name in ("cpu", "flex"):
        engine = make_engine(tiny_loaded, attention_backend=name, **cfg)
        assert engine.runner.model.backend.name == name
        tokens[name] = [list(r.output_token_ids) for r in run_sync(engine, specs)]
    assert tokens["flex"] == tokens["cpu"]
    assert all(len(t) > 0 for t in tokens["flex"])


def test_backend_setting_reaches_the_engine(tiny_loaded):
    from srv_helpers import make_settings

    from server.attention.cpu import CpuBackend
    from server.engine_config import EngineConfig
    from server.model_runner import default_backend

    assert EngineConfig().attention_backend == "auto" == make_settings(None).attention_backend
    assert make_settings(None, attention_backend="flex").engine_config().attention_backend == "flex"
    assert isinstance(default_backend("cpu"), CpuBackend)  # auto on the CPU
    assert isinstance(default_backend("cuda"), FlexBackend)  # auto on CUDA (built lazily: no GPU needed here)
    assert isinstance(default_backend("cpu", name="reference"), ReferenceBackend)
    with pytest.raises(ValueError, match="one of"):
        default_backend("cpu", name="fast")
    assert make_engine(tiny_loaded, attention_backend="reference").runner.model.backend.name == "reference"
