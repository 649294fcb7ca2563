"""The packed layer walk (LlamaLayers over the paged KV pool) and ModelRunner.execute against the Hugging Face
forward pass of the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from srv_helpers import rand_tensor

from prompt_store.registry import SoftPrompt, tensor_sha256
from server.attention.metadata import RowSpec, build_metadata
from server.attention.reference import ReferenceBackend
from server.block_pool import BlockPool
from server.kv_pool import KVPool, kv_bytes_per_token, model_kv_shape
from server.model_runner import ModelRunner
from server.prompt_cache import PromptKVCache
from server.request import Request, SamplingParams
from server.scheduler import Scheduler

ATOL = 1e-4
BS = 4


@pytest.fixture(params=["cpu", "reference"])
def runner(request, tiny_loaded) -> ModelRunner:
    layers, kvh, hd = model_kv_shape(tiny_loaded.model.config)
    pool = KVPool(64, BS, layers, kvh, hd, tiny_loaded.dtype, "cpu")
    return ModelRunner(tiny_loaded, pool, ReferenceBackend() if request.param == "reference" else None)


@dataclass
class Row:
    """One row of a hand-built step: ``ids`` at positions ``start..``, the first ``len(virtual)`` of them virtual."""

    blocks: list[int]
    start: int
    ids: list[int]
    virtual: torch.Tensor | None = None
    need_logits: bool = True


def run(runner: ModelRunner, rows: list[Row]) -> torch.Tensor:
    """Packed forward of ``rows`` (one-token rows must come first); logits of rows with ``need_logits``."""
    meta = build_metadata([RowSpec(r.blocks, r.start, len(r.ids)) for r in rows], BS)
    flat, virtual, last = [], [], []
    for r in rows:
        if r.virtual is not None:
            virtual.append((len(flat), r.virtual))
        flat.extend(r.ids)
        if r.need_logits:
            last.append(len(flat) - 1)
    with torch.inference_mode():
        x = runner._embed(flat, virtual)
        h = runner.model.forward(x, meta, runner.pool.k, runner.pool.v)
        return runner.model.logits(h[last])


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(model, ids: list[int], prompt: torch.Tensor | None = None) -> torch.Tensor:
    """All-position logits ``[L, V]`` of the HF forward with ``inputs_embeds = cat(P, embed(ids))``."""
    x = model.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))
    if prompt is not None:
        x = torch.cat([prompt[None].to(x.dtype), x], dim=1)
    return model(inputs_embeds=x).logits[0].float()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=0)


def test_plain_text_prefill_matches_hf_and_writes_rotated_keys(runner, tiny_loaded):
    ids = ids_of(11, 0)
    blocks = [9, 2, 30]
    out = run(runner, [Row(blocks, 0, ids)])
    assert out.shape == (1, 49152) and out.dtype == torch.float32
    assert close(out[0], hf_logits(tiny_loaded.model, ids)[-1])
    # the pool holds the same K/V as HF's cache (keys after rotary), in this row's blocks
    x = tiny_loaded.model.get_input_embeddings()(torch.tensor([ids]))
    cache = tiny_loaded.model(inputs_embeds=x, use_cache=True).past_key_values
    slots = runner.pool.slots_of(blocks, 11)
    for li in range(2):
        flat_k = runner.pool.k[li].reshape(-1, *runner.pool.k.shape[3:])
        flat_v = runner.pool.v[li].reshape(-1, *runner.pool.v.shape[3:])
        assert torch.allclose(flat_k[slots], cache.layers[li].keys[0].transpose(0, 1), atol=ATOL)
        assert torch.allclose(flat_v[slots], cache.layers[li].values[0].transpose(0, 1), atol=ATOL)


def test_chunked_prefill_matches_hf(runner, tiny_loaded):
    ids = ids_of(13, 1)
    ref = hf_logits(tiny_loaded.model, ids)
    blocks = [5, 17, 3, 40]
    assert close(run(runner, [Row(blocks, 0, ids[:5])])[0], ref[4])
    assert run(runner, [Row(blocks, 5, ids[5:6], need_logits=False)]).shape[0] == 0  # a 1-token chunk
    assert close(run(runner, [Row(blocks, 6, ids[6:])])[0], ref[-1])


def test_decode_steps_match_hf(runner, tiny_loaded):
    ids = ids_of(6, 2)
    blocks = [1, 8, 4]
    logits = run(runner, [Row(blocks, 0, ids)])[0]
    seq = list(ids)
    for _ in range(5):
        assert close(logits, hf_logits(tiny_loaded.model, seq)[-1])
        tok = int(logits.argmax())
        seq.append(tok)
        logits = run(runner, [Row(blocks, len(seq) - 1, [tok])])[0]
    assert close(logits, hf_logits(tiny_loaded.model, seq)[-1])


def test_packed_rows_of_different_lengths(runner, tiny_loaded):
    model = tiny_loaded.model
    lens = [1, 3, 9, 6]  # the one-token row first, as the metadata requires
    seqs = [ids_of(n, 10 + i) for i, n in enumerate(lens)]
    tables = [[20 + 3 * i, 2 + 3 * i, 50 - i] for i in range(len(lens))]
    out = run(runner, [Row(t, 0, q) for t, q in zip(tables, seqs, strict=True)])
    assert out.shape[0] == 4
    for i, q in enumerate(seqs):
        assert close(out[i], hf_logits(model, q)[-1]), f"row {i}"
    for _ in range(3):  # decode steps: rows of different lengths in one paged decode call
        toks = [int(o.argmax()) for o in out]
        rows = []
        for t, q, tok in zip(tables, seqs, toks, strict=True):
            q.append(tok)
            rows.append(Row(t, len(q) - 1, [tok]))
        out = run(runner, rows)
        for i, q in enumerate(seqs):
            assert close(out[i], hf_logits(model, q)[-1]), f"row {i} after decoding"


def test_mixed_prefill_and_decode_rows(runner, tiny_loaded):
    model = tiny_loaded.model
    a, b = ids_of(7, 20), ids_of(4, 21)
    ta_, tb_, tc_ = [11, 12, 13], [30, 31], [40, 41, 42]
    out = run(runner, [Row(ta_, 0, a), Row(tb_, 0, b)])
    ta, tb = int(out[0].argmax()), int(out[1].argmax())
    a.append(ta)
    b.append(tb)
    c = ids_of(10, 22)
    out = run(runner, [Row(ta_, len(a) - 1, [ta]), Row(tb_, len(b) - 1, [tb]),
                       Row(tc_, 0, c[:4], need_logits=False)])
    assert out.shape[0] == 2
    assert close(out[0], hf_logits(model, a)[-1])
    assert close(out[1], hf_logits(model, b)[-1])
    assert close(run(runner, [Row(tc_, 4, c[4:])])[0], hf_logits(model, c)[-1])


def test_virtual_tokens_then_text_match_hf_inputs_embeds(runner, tiny_loaded):
    model = tiny_loaded.model
    P = rand_tensor(7, scale=2.0, seed=4)
    ids = ids_of(9, 5)
    ref = hf_logits(model, ids, P)
    blocks = [14, 6, 22, 9, 33]
    # the prompt alone at positions 0..5 (what the prompt-KV cache computes), then the last virtual token + text
    run(runner, [Row(blocks, 0, [0] * 6, P[:6], need_logits=False)])
    out = run(runner, [Row(blocks, 6, [0] + ids, P[6:])])
    assert close(out[0], ref[-1])
    tok = int(out[0].argmax())
    out = run(runner, [Row(blocks, 7 + len(ids), [tok])])
    assert close(out[0], hf_logits(model, ids + [tok], P)[-1])
    # every virtual token computed in the row itself gives the same logits
    full = run(runner, [Row([44, 45, 46, 47], 0, [0] * 7 + ids, P)])
    assert close(full[0], ref[-1])


def _sp(task: str, emb: torch.Tensor) -> SoftPrompt:
    return SoftPrompt(task, emb, emb.shape[0], emb.shape[1], "float32", tensor_sha256(emb), 1, "test", "RAW", 0.0,
                      emb.nbytes)


def _engine_parts(tiny_loaded, backend=None, num_blocks=64):
    layers, kvh, hd = model_kv_shape(tiny_loaded.model.config)
    bpt = kv_bytes_per_token(layers, kvh, hd, tiny_loaded.dtype)
    pool = BlockPool(num_blocks, BS)
    cache = PromptKVCache(pool, 1 << 20, bpt)
    sched = Scheduler(pool, cache, 8, 256)
    runner = ModelRunner(tiny_loaded, KVPool(num_blocks, BS, layers, kvh, hd, tiny_loaded.dtype, "cpu"), backend)
    return sched, runner


def test_execute_shares_prompt_blocks_and_matches_hf(tiny_loaded):
    """Two requests of one prompt (shared full blocks + copied tail), another prompt and a base row in one step,
    then decode steps: every row equals the HF forward with inputs_embeds = cat(P, embed(ids))."""
    model = tiny_loaded.model
    sched, runner = _engine_parts(tiny_loaded)
    P, Q = rand_tensor(11, seed=1), rand_tensor(3, scale=3.0, seed=2)  # 10 cached positions: 2 blocks + tail 2
    reqs = [
        Request("a", ids_of(5, 1), SamplingParams(max_new_tokens=4), soft_prompt=_sp("p", P), task="p"),
        Request("b", ids_of(9, 2), SamplingParams(max_new_tokens=4), soft_prompt=_sp("p", P), task="p"),
        Request("c", ids_of(2, 3), SamplingParams(max_new_tokens=4), soft_prompt=_sp("q", Q), task="q"),
        Request("d", ids_of(6, 4), SamplingParams(max_new_tokens=4)),
    ]
    prompts = [P, P, Q, None]
    for r in reqs:
        sched.add(r)
    plan = sched.schedule()
    assert len(plan.prompts_to_compute) == 2
    assert reqs[0].block_table[:2] == reqs[1].block_table[:2]  # shared full blocks of P
    assert reqs[0].block_table[2] != reqs[1].block_table[2]  # each its own block after the tail
    seqs = [list(r.prompt_token_ids) for r in reqs]
    for _ in range(4):
        res = runner.execute(plan)
        assert not res.failed
        for r, s, p in zip(reqs, seqs, prompts, strict=True):
            if r.request_id in res.sampled:
                ref = hf_logits(model, s, p)[-1]
                assert res.sampled[r.request_id] == int(ref.argmax()), r.request_id
                s.append(res.sampled[r.request_id])
        sched.update_from_output(plan, res.sampled)
        if not sched.has_work():
            break
        plan = sched.schedule()
    assert [len(s) - len(r.prompt_token_ids) for s, r in zip(seqs, reqs, strict=True)] == [4, 4, 4, 4]


def test_execute_drops_non_finite_rows_only(tiny_loaded):
    sched, runner = _engine_parts(tiny_loaded)
    good = Request("good", ids_of(4, 7), SamplingParams(max_new_tokens=2))
    bad = Request("bad", ids_of(4, 8), SamplingParams(max_new_tokens=2),
                  soft_prompt=_sp("nan", torch.full((2, tiny_loaded.hidden_size), float("nan"))), task="nan")
    sched.add(good)
    sched.add(bad)
    res = runner.execute(sched.schedule())
    assert res.failed == frozenset({"bad"}) and set(res.sampled) == {"good"}


def test_seeded_sampling_survives_preemption_state(tiny_loaded):
    """The runner keeps a request's generator until the scheduler reports it finished."""
    sched, runner = _engine_parts(tiny_loaded)
    r = Request("s", ids_of(3, 9), SamplingParams(max_new_tokens=3, temperature=1.0, seed=5))
    sched.add(r)
    plan = sched.schedule()
    runner.execute(plan)
    gen = runner._generators["s"]
    sched.finish(r, r.status.FINISHED_ABORTED)
    plan = sched.schedule()
    assert plan.finished_ids == ["s"]
    runner.execute(plan)
    assert "s" not in runner._generators and gen is not None


def test_fused_projections_are_views_of_one_tensor(tiny_loaded, runner):
    """Q/K/V and gate/up weights were fused without copies: the HF modules' weights view the fused tensors."""
    layer = tiny_loaded.model.model.layers[0]
    qkv = runner.model.qkv[0].weight
    assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    gate_up = runner.model.gate_up[0].weight
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()


def test_packed_linear_equals_f_linear():
    """MKL's packed GEMM gives F.linear's values: bit for bit from 2 rows on (small and large packings), within
    float rounding for 1 row (F.linear then takes a GEMV path)."""
    from server.llama import Linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    lin = Linear(w, b, pack=True)
    assert (lin.packed is not None) == torch.backends.mkl.is_available()
    for m in (2, 7, 64, 300):
        x = torch.randn(m, 40, generator=g)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, w, b)), m
    x = torch.randn(1, 40, generator=g)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert Linear(w, b, pack=False).packed is None


def test_kv_bytes_per_token(tiny_loaded):
    layers, kvh, hd = model_kv_shape(tiny_loaded.model.config)
    assert kv_bytes_per_token(layers, kvh, hd, tiny_loaded.dtype) == 2 * 2 * 2 * 16 * 4
