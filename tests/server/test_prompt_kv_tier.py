"""The host tier of the prompt-KV cache: LRU under a byte budget, copies independent of the pool."""

from __future__ import annotations

import pytest
import torch

from server.prompt_kv_tier import HostPromptKV


def kv(p: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2 layers, p positions, 2 KV heads, 4]`` fp32 K and V: ``p * 2 * 2 * 4 * 4 * 2`` = 128 p bytes."""
    return torch.full((2, p, 2, 4), fill), torch.full((2, p, 2, 4), -fill)


def test_put_take_round_trip_is_a_copy():
    tier = HostPromptKV(budget_bytes=10_000)
    k, v = kv(3, 1.5)
    assert tier.put("a", k, v) and tier.nbytes == 3 * 128 and "a" in tier
    k.fill_(9.0)  # the pool block is rewritten after eviction: the tier's copy must not change
    got = tier.take("a")
    assert got is not None and torch.equal(got[0], torch.full((2, 3, 2, 4), 1.5)) and torch.equal(got[1], -got[0])
    assert tier.take("a") is None and tier.nbytes == 0 and len(tier) == 0 and tier.hits == 1


def test_lru_under_budget_and_too_large_refused():
    tier = HostPromptKV(budget_bytes=5 * 128)
    assert tier.put("a", *kv(2, 1.0)) and tier.put("b", *kv(2, 2.0))
    assert tier.put("c", *kv(2, 3.0))  # 6 positions > 5: the oldest ("a") goes
    assert "a" not in tier and {"b", "c"} <= set(tier._entries) and tier.nbytes == 4 * 128
    assert not tier.put("big", *kv(6, 4.0)) and "big" not in tier and tier.nbytes == 4 * 128
    assert tier.put("b", *kv(1, 5.0)) and tier.nbytes == 3 * 128  # re-putting a key replaces it
    assert HostPromptKV(0).put("x", *kv(1, 1.0)) is False


def test_negative_budget_refused():
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        HostPromptKV(-1)


def test_engine_brings_evicted_prompts_back_from_the_host_tier_unchanged(tiny_loaded, monkeypatch):
    """A device budget of one byte evicts every prompt once unused; with a host tier the next request of that prompt
    gets its KV copied back (no prompt pass, no prefix rewrite) and the same tokens as without the tier."""
    from srv_helpers import Spec, make_engine, make_prompt, rand_tensor, run_sync

    prompts = [make_prompt("emb", rand_tensor(21, scale=1.5, seed=31)),
               make_prompt("pfx", torch.randn(20, 128, generator=torch.Generator().manual_seed(32)) * 0.5,
                           "PREFIX_TUNING")]
    ids = tiny_loaded.tokenizer("Back from the host")["input_ids"]
    plain = make_engine(tiny_loaded, prompt_kv_cache_bytes=1)
    want = {p.task: run_sync(plain, [Spec(ids, p, 6)])[0].output_token_ids for p in prompts}
    engine = make_engine(tiny_loaded, prompt_kv_cache_bytes=1, prompt_kv_host_bytes=1 << 20)
    runner = engine.core.runner
    for p in prompts:  # first use: computed / written, then evicted to the host when the request ends
        assert run_sync(engine, [Spec(ids, p, 6)])[0].output_token_ids == want[p.task]
    run_sync(engine, [Spec(ids, None, 1)])  # a step that applies the last eviction
    tier = runner.host_tier
    assert len(tier) == 2 and tier.stores == 2 and tier.nbytes == (20 + 20) * engine.core.bytes_per_token
    calls = []
    monkeypatch.setattr(runner, "_prompt_pass", lambda group: calls.append("pass"))
    monkeypatch.setattr(runner, "_write_prefix", lambda entry, req: calls.append("prefix"))
    for p in prompts:
        assert run_sync(engine, [Spec(ids, p, 6)])[0].output_token_ids == want[p.task], p.task
    assert calls == [] and tier.hits == 2
