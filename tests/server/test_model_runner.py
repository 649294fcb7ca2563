"""ModelRunner.forward (packed rows over a paged KV pool) against the Hugging Face forward pass of the tiny model."""

from __future__ import annotations

import pytest
import torch
from srv_helpers import rand_tensor

from server.model_runner import ModelRunner, RowInput

ATOL = 1e-4


@pytest.fixture
def runner(tiny_loaded) -> ModelRunner:
    return ModelRunner(tiny_loaded, num_blocks=64, block_size=4, max_virtual_tokens=32,
                       prefix_cache_bytes=1 << 20)


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def slots(runner: ModelRunner, blocks: list[int], n: int | None = None) -> torch.Tensor:
    """Slots of a sequence holding ``blocks`` (deliberately not contiguous, to exercise the paging)."""
    return runner.pool.slots_for(blocks, n or len(blocks) * runner.pool.block_size)


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
    sl = slots(runner, [9, 2, 30])
    out = runner.forward([RowInput(sl, 0, ids)])
    ref = hf_logits(tiny_loaded.model, ids)
    assert out.shape == (1, 49152) and out.dtype == torch.float32
    assert close(out[0], ref[-1])
    # the pool holds the same K/V as HF's cache (keys after rotary), at this row's slots
    x = tiny_loaded.model.get_input_embeddings()(torch.tensor([ids]))
    cache = tiny_loaded.model(inputs_embeds=x, use_cache=True).past_key_values
    for li in range(2):
        hk = cache.layers[li].keys[0].transpose(0, 1)  # [L, KVH, D]
        hv = cache.layers[li].values[0].transpose(0, 1)
        assert torch.allclose(runner.pool.k[li, sl[:11]], hk, atol=ATOL)
        assert torch.allclose(runner.pool.v[li, sl[:11]], hv, atol=ATOL)


def test_chunked_prefill_matches_hf(runner, tiny_loaded):
    ids = ids_of(13, 1)
    ref = hf_logits(tiny_loaded.model, ids)
    sl = slots(runner, [5, 17, 3, 40])
    first = runner.forward([RowInput(sl, 0, ids[:5], need_logits=True)])
    assert close(first[0], ref[4])
    none = runner.forward([RowInput(sl, 5, ids[5:6], need_logits=False)])  # a 1-token chunk mid-prompt
    assert none.shape[0] == 0
    last = runner.forward([RowInput(sl, 6, ids[6:])])
    assert close(last[0], ref[-1])


def test_decode_steps_match_hf(runner, tiny_loaded):
    ids = ids_of(6, 2)
    sl = slots(runner, [1, 8, 4])
    logits = runner.forward([RowInput(sl, 0, ids)])[0]
    seq = list(ids)
    for _ in range(5):
        assert close(logits, hf_logits(tiny_loaded.model, seq)[-1])
        tok = int(logits.argmax())
        seq.append(tok)
        logits = runner.forward([RowInput(sl, len(seq) - 1, [tok])])[0]
    assert close(logits, hf_logits(tiny_loaded.model, seq)[-1])


def test_packed_rows_of_different_lengths(runner, tiny_loaded):
    model = tiny_loaded.model
    lens = [3, 9, 1, 6]
    seqs = [ids_of(n, 10 + i) for i, n in enumerate(lens)]
    sls = [slots(runner, [20 + 3 * i, 2 + 3 * i, 50 - i]) for i in range(len(lens))]
    # prefill all four in one packed pass (the 1-token row goes through the decode path)
    out = runner.forward([RowInput(s, 0, q) for s, q in zip(sls, seqs, strict=True)])
    assert out.shape[0] == 4
    for i, q in enumerate(seqs):
        assert close(out[i], hf_logits(model, q)[-1]), f"row {i}"
    # three decode steps: rows of different lengths share one padded, masked attention call
    for _ in range(3):
        toks = [int(o.argmax()) for o in out]
        rows = []
        for s, q, t in zip(sls, seqs, toks, strict=True):
            q.append(t)
            rows.append(RowInput(s, len(q) - 1, [t]))
        out = runner.forward(rows)
        for i, q in enumerate(seqs):
            assert close(out[i], hf_logits(model, q)[-1]), f"row {i} after decoding"
    assert float(runner.pool.k[:, runner.pool.pad_slot].abs().sum()) == 0.0  # padding never written


def test_mixed_prefill_and_decode_rows_and_need_logits_order(runner, tiny_loaded):
    model = tiny_loaded.model
    a, b = ids_of(7, 20), ids_of(4, 21)
    sa, sb, sc = slots(runner, [11, 12, 13]), slots(runner, [30, 31]), slots(runner, [40, 41, 42])
    out = runner.forward([RowInput(sa, 0, a), RowInput(sb, 0, b)])
    ta, tb = int(out[0].argmax()), int(out[1].argmax())
    a.append(ta)
    b.append(tb)
    c = ids_of(10, 22)
    # decode a, start c's prefill in two chunks (first without logits), decode b
    out = runner.forward([
        RowInput(sa, len(a) - 1, [ta]),
        RowInput(sc, 0, c[:4], need_logits=False),
        RowInput(sb, len(b) - 1, [tb]),
    ])
    assert out.shape[0] == 2
    assert close(out[0], hf_logits(model, a)[-1])
    assert close(out[1], hf_logits(model, b)[-1])
    out = runner.forward([RowInput(sc, 4, c[4:])])
    assert close(out[0], hf_logits(model, c)[-1])


def test_prefix_for_matches_hf_cache_and_is_cached(runner, tiny_loaded):
    model = tiny_loaded.model
    P = rand_tensor(7, scale=1.0, seed=3)
    prefix = runner.prefix_for("key-p", P)
    assert prefix is not None and prefix.num_tokens == 6
    assert prefix.k.shape == (2, 6, 2, 16)
    cache = model(inputs_embeds=P[None, :6], use_cache=True).past_key_values
    for li in range(2):
        assert torch.allclose(prefix.k[li], cache.layers[li].keys[0].transpose(0, 1), atol=ATOL)
        assert torch.allclose(prefix.v[li], cache.layers[li].values[0].transpose(0, 1), atol=ATOL)
    hits = runner.prefix_cache.hits
    assert runner.prefix_for("key-p", P) is prefix
    assert runner.prefix_cache.hits == hits + 1
    assert runner.prefix_for("one-token", P[:1]) is None  # nothing to cache for a 1-token prompt


def test_load_prefix_then_text_matches_hf_inputs_embeds(runner, tiny_loaded):
    model = tiny_loaded.model
    P = rand_tensor(7, scale=2.0, seed=4)
    ids = ids_of(9, 5)
    ref = hf_logits(model, ids, P)
    sl = slots(runner, [14, 6, 22, 9, 33])
    runner.load_prefix(sl, runner.prefix_for("k4", P))
    out = runner.forward([RowInput(sl, 6, [0] + ids, virtual=P[6:])])
    assert close(out[0], ref[-1])
    # one decode step on top
    tok = int(out[0].argmax())
    out = runner.forward([RowInput(sl, 7 + len(ids), [tok])])
    assert close(out[0], hf_logits(model, ids + [tok], P)[-1])
    # computing every virtual token in the row itself (no prefix) gives the same logits
    sl2 = slots(runner, [44, 45, 46, 47])
    full = runner.forward([RowInput(sl2, 0, [0] * 7 + ids, virtual=P)])
    assert close(full[0], ref[-1])


def test_prompt_only_rows_and_one_token_prompts(runner, tiny_loaded):
    model = tiny_loaded.model
    P = rand_tensor(5, scale=1.0, seed=6)
    sl = slots(runner, [3, 4])
    runner.load_prefix(sl, runner.prefix_for("k5", P))
    out = runner.forward([RowInput(sl, 4, [0], virtual=P[4:])])  # empty text: the last virtual token only
    ref = model(inputs_embeds=P[None]).logits[0, -1]
    assert close(out[0], ref)
    P1 = rand_tensor(1, seed=7)
    ids = ids_of(4, 8)
    out = runner.forward([RowInput(slots(runner, [60, 61]), 0, [0] + ids, virtual=P1)])
    assert close(out[0], hf_logits(model, ids, P1)[-1])


def test_rows_with_different_prompts_and_base_rows_in_one_pass(runner, tiny_loaded):
    model = tiny_loaded.model
    P3, P8 = rand_tensor(3, seed=9), rand_tensor(8, scale=5.0, seed=10)
    t1, t2, t3 = ids_of(5, 11), ids_of(12, 12), ids_of(2, 13)
    s1, s2, s3 = slots(runner, [0, 1, 2]), slots(runner, [5, 6, 7, 8, 10, 12]), slots(runner, [15, 16])
    runner.load_prefix(s1, runner.prefix_for("p3", P3))
    runner.load_prefix(s2, runner.prefix_for("p8", P8))
    out = runner.forward([
        RowInput(s1, 2, [0] + t1, virtual=P3[2:]),
        RowInput(s2, 7, [0] + t2, virtual=P8[7:]),
        RowInput(s3, 0, t3),
    ])
    refs = [hf_logits(model, t1, P3)[-1], hf_logits(model, t2, P8)[-1], hf_logits(model, t3)[-1]]
    for i in range(3):
        assert close(out[i], refs[i]), f"row {i}"
    # and one shared decode step (lengths 3+5+1, 8+12+1, 2+1)
    toks = [int(o.argmax()) for o in out]
    out = runner.forward([
        RowInput(s1, 3 + 5, [toks[0]]), RowInput(s2, 8 + 12, [toks[1]]), RowInput(s3, 2, [toks[2]]),
    ])
    refs = [hf_logits(model, t1 + [toks[0]], P3)[-1], hf_logits(model, t2 + [toks[1]], P8)[-1],
            hf_logits(model, t3 + [toks[2]])[-1]]
    for i in range(3):
        assert close(out[i], refs[i]), f"row {i} decoding"


def test_forward_refuses_empty_rows_and_overruns(runner):
    sl = slots(runner, [1])
    with pytest.raises(ValueError, match="0 tokens"):
        runner.forward([RowInput(sl, 0, [])])
    with pytest.raises(ValueError, match="exceeds 4 slots"):
        runner.forward([RowInput(sl, 2, [5, 6, 7])])


def test_bytes_per_token(tiny_loaded):
    assert ModelRunner.bytes_per_token(tiny_loaded) == 2 * 2 * 2 * 16 * 4


def test_prefixes_for_batches_misses_and_equals_one_at_a_time(tiny_loaded):
    """Several new prompts (different lengths, one repeated, one of a single token) computed in packed passes give
    the same KV as each computed alone, and each distinct key is computed once."""
    from server.model_runner import PREFIX_BATCH, ModelRunner

    runner = ModelRunner(tiny_loaded, num_blocks=64, block_size=16, max_virtual_tokens=12, prefix_cache_bytes=1 << 24)
    alone = ModelRunner(tiny_loaded, num_blocks=64, block_size=16, max_virtual_tokens=12, prefix_cache_bytes=1 << 24)
    g = torch.Generator().manual_seed(3)
    lengths = [12, 5, 9, 1, 12, 7, 12, 12, 12, 12, 12, 12]  # more than the scratch holds in one pass
    prompts = [(f"k{i}", torch.randn(n, tiny_loaded.hidden_size, generator=g)) for i, n in enumerate(lengths)]
    prompts.append(prompts[1])  # the same key again
    assert sum(n - 1 for n in lengths) > PREFIX_BATCH * 12
    calls = []
    real = runner.forward
    runner.forward = lambda rows: calls.append(len(rows)) or real(rows)
    got = runner.prefixes_for(prompts)
    assert len(got) == len(prompts) and got[3] is None and got[-1] is got[1]
    assert sum(calls) == len(lengths) - 1 and len(calls) >= 2  # each distinct multi-token prompt once, packed
    for (key, emb), item in zip(prompts, got, strict=True):
        ref = alone.prefix_for(key, emb)
        if ref is None:
            assert item is None
            continue
        torch.testing.assert_close(item.k, ref.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item.v, ref.v, rtol=1e-5, atol=1e-5)
    assert runner.prefixes_for(prompts[:2])[0] is got[0]  # cached now
