"""Prefix tuning (PEFT ``PREFIX_TUNING``, P-tuning v2) served as per-layer KV: equal to PEFT's own forward pass,
alone and in mixed batches with prompt tuning, p-tuning and base rows; its KV blocks shared; empty input refused."""

from __future__ import annotations

import copy

import pytest
import torch
from srv_helpers import (
    Spec,
    make_engine,
    make_prompt,
    new_request,
    peft_greedy_reference,
    queue_all,
    run_sync,
    save_peft_adapters,
)

from prompt_store.formats import Limits, load_path
from server.engine import RequestRejectedError
from server.model_runner import prefix_kv


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def result(req) -> tuple[list[int], str]:
    return list(req.output_token_ids), req.status.finish_reason


@pytest.fixture(scope="module")
def tiny_prefix_peft(tiny_loaded, tmp_path_factory):
    """PEFT 0.21 adapters on copies of the tiny model (2 layers, 2 KV heads, head size 16), saved with
    ``save_pretrained``, with their prompt encoders perturbed so the prefix is far from PEFT's init.

    Returns ``{name: (peft_model, saved_dir)}``."""
    from peft import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    root = tmp_path_factory.mktemp("peft-prefix")
    configs = {
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
        "prefix16": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16),
        "prefix-proj": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prefix_projection=True,
                                          encoder_hidden_size=24),
        "pt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6,
                                 prompt_tuning_init=PromptTuningInit.RANDOM),
        "ptune": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=32,
                                     encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP),
    }
    return save_peft_adapters(tiny_loaded.model, configs, root, seed=300, perturb=0.5)


def served(tiny_loaded, tiny_prefix_peft) -> dict:
    limits = tiny_loaded.prompt_limits()
    prompts = {}
    for name, (_, path) in tiny_prefix_peft.items():
        parsed = load_path(path, limits)
        prompts[name] = make_prompt(name, parsed.embeddings, parsed.peft_type)
    return prompts


def test_prefix_kv_layout_matches_peft_get_prompt(tiny_prefix_peft):
    """Block ``2l`` of a row is layer ``l``'s key, ``2l + 1`` its value, as PEFT's own cache holds them."""
    pm, path = tiny_prefix_peft["prefix-proj"]
    parsed = load_path(path, Limits(64, num_layers=2, num_key_value_heads=2, head_dim=16))
    k, v = prefix_kv(parsed.embeddings, 2, 2)
    assert k.shape == v.shape == (2, 5, 2, 16)
    with torch.no_grad():
        cache = pm.get_prompt(batch_size=1)
    for layer in range(2):
        assert torch.allclose(k[layer], cache.layers[layer].keys[0].transpose(0, 1), atol=1e-6)
        assert torch.allclose(v[layer], cache.layers[layer].values[0].transpose(0, 1), atol=1e-6)


def test_prefix_tuning_alone_equals_peft_forward(tiny_loaded, tiny_prefix_peft):
    prompts = served(tiny_loaded, tiny_prefix_peft)
    assert prompts["prefix"].peft_type == prompts["prefix-proj"].peft_type == "PREFIX_TUNING"
    assert prompts["prefix"].embeddings.shape == (20, 2 * 2 * 2 * 16)
    tok = tiny_loaded.tokenizer
    for name in ("prefix", "prefix-proj"):
        for text in ("The movie was great", "ok"):
            ids = tok(text)["input_ids"]
            (req,) = run_sync(make_engine(tiny_loaded), [Spec(ids, prompts[name], 6)])
            assert result(req) == peft_greedy_reference(tiny_prefix_peft[name][0], ids, 6), (name, text)


def test_all_kinds_in_one_mixed_batch_equal_peft_forward(tiny_loaded, tiny_prefix_peft):
    """Prefix tuning (with and without projection), prompt tuning, p-tuning and base rows share every step, and
    each row equals PEFT's forward for its own adapter (the base row: the plain model)."""
    prompts = served(tiny_loaded, tiny_prefix_peft)
    tok = tiny_loaded.tokenizer
    texts = ["The movie was great", "I did not like the ending at all, it was far too long", "ok"]
    jobs = [(name, t) for name in prompts for t in texts]
    specs = [Spec(tok(t)["input_ids"], prompts[name], 6) for name, t in jobs]
    specs.append(Spec(tok(texts[1])["input_ids"], None, 6))
    engine = make_engine(tiny_loaded)
    reqs = run_sync(engine, specs)
    assert len({r.first_token_time for r in reqs}) == 1  # one batch
    for (name, t), req in zip(jobs, reqs[:-1], strict=True):
        assert result(req) == peft_greedy_reference(tiny_prefix_peft[name][0], tok(t)["input_ids"], 6), (name, t)
    assert result(reqs[-1]) == peft_greedy_reference(tiny_loaded.model, tok(texts[1])["input_ids"], 6)


def test_prefix_blocks_are_shared_by_the_requests_of_a_prompt(tiny_loaded, tiny_prefix_peft):
    """A 20-token prefix with block size 16: one full shared block plus a 4-position tail per request; 6
    requests hold one prompt block between them, and their results equal each one alone."""
    prompts = served(tiny_loaded, tiny_prefix_peft)
    specs = [Spec(ids_of(3 + i, 400 + i), prompts["prefix"], 4) for i in range(6)]
    engine = make_engine(tiny_loaded)
    reqs = queue_all(engine, specs)
    plan = engine.step()
    assert len(plan.prompts_to_compute) == 1 and len(plan.tail_copies) == 5
    assert all(r.start >= 20 for r in plan.rows)  # no virtual position is recomputed
    entry = reqs[0].prompt_kv
    assert entry.num_tokens == 20 and len(entry.full_blocks) == 1 and entry.tail_len == 4
    assert all(q.block_table[0] == entry.full_blocks[0] for q in reqs)
    assert engine.core.pool.ref_count(entry.full_blocks[0]) == 7  # the cache + 6 requests
    while engine.core.has_work():
        engine.step()
    for spec, req in zip(specs, reqs, strict=True):
        assert result(req) == result(run_sync(make_engine(tiny_loaded), [spec])[0])


def test_prefix_kv_is_evicted_and_rewritten_equal(tiny_loaded, tiny_prefix_peft):
    """Under a prompt-KV budget of one prefix, alternating two prefix prompts evicts and rewrites them; results
    stay equal to PEFT's forward."""
    prompts = served(tiny_loaded, tiny_prefix_peft)
    tok = tiny_loaded.tokenizer
    engine = make_engine(tiny_loaded, prompt_kv_cache_bytes=1)
    ids = tok("A long time ago")["input_ids"]
    for name in ("prefix", "prefix-proj", "prefix"):
        (req,) = run_sync(engine, [Spec(ids, prompts[name], 5)])
        assert result(req) == peft_greedy_reference(tiny_prefix_peft[name][0], ids, 5), name
    assert len(engine.core.prompt_cache) == 0  # over budget: nothing unused is kept


def test_prefix_of_whole_blocks_has_no_tail(tiny_loaded, tiny_prefix_peft):
    """n = block size: one shared block, no tail to copy, and the request's text starts a block of its own."""
    prompts = served(tiny_loaded, tiny_prefix_peft)
    ids = tiny_loaded.tokenizer("Whole blocks only")["input_ids"]
    engine = make_engine(tiny_loaded)
    reqs = run_sync(engine, [Spec(ids, prompts["prefix16"], 5), Spec(ids[:2], prompts["prefix16"], 5)])
    assert engine.core.runner.tail_bytes == 0
    assert result(reqs[0]) == peft_greedy_reference(tiny_prefix_peft["prefix16"][0], ids, 5)
    assert result(reqs[1]) == peft_greedy_reference(tiny_prefix_peft["prefix16"][0], ids[:2], 5)


def test_prefix_prefetched_while_idle_is_a_cache_hit(tiny_loaded, tiny_prefix_peft):
    prompts = served(tiny_loaded, tiny_prefix_peft)
    engine = make_engine(tiny_loaded)
    engine.core.queue_prefetch(prompts["prefix"])
    assert engine.core.prefetch_some() == 1
    cache = engine.core.prompt_cache
    assert len(cache) == 1 and cache.nbytes == 20 * engine.core.bytes_per_token
    assert engine.core.runner.tail_bytes == 4 * engine.core.bytes_per_token  # 20 % 16 positions
    ids = tiny_loaded.tokenizer("Prefetched")["input_ids"]
    (req,) = queue_all(engine, [Spec(ids, prompts["prefix"], 5)])
    plan = engine.step()
    assert plan.prompts_to_compute == [] and len(plan.tail_copies) == 1 and cache.hits == 1
    while engine.core.has_work():
        engine.step()
    assert result(req) == peft_greedy_reference(tiny_prefix_peft["prefix"][0], ids, 5)


def test_preempted_prefix_requests_resume_equal_to_peft(tiny_loaded, tiny_prefix_peft):
    """A KV pool too small for every row's full length forces preemptions among prefix, prompt-tuned and base
    rows; each still equals PEFT's forward."""
    prompts = served(tiny_loaded, tiny_prefix_peft)
    names = ["prefix", "prefix-proj", "pt", "prefix", None, "prefix16"]
    specs = [Spec(ids_of(6 + i, 500 + i), prompts[n] if n else None, 20) for i, n in enumerate(names)]
    bpt = 2 * 2 * 2 * 16 * 4
    engine = make_engine(tiny_loaded, kv_cache_bytes=12 * 16 * bpt, prompt_kv_cache_bytes=0, max_num_seqs=8)
    reqs = run_sync(engine, specs)
    assert engine.core.scheduler.num_preemptions > 0
    for name, spec, req in zip(names, specs, reqs, strict=True):
        model = tiny_prefix_peft[name][0] if name else tiny_loaded.model
        assert result(req) == peft_greedy_reference(model, spec.ids, 20), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefix_served_in_half_precision_equals_peft_in_that_dtype(tiny_loaded, tiny_prefix_peft, dtype):
    """An fp32 prefix on a bf16 / fp16 model is cast once into the model-dtype KV pool; greedy tokens equal PEFT's
    forward at that dtype. The engine runs torch's attention and unpacked weights here: the C++ decode kernel and
    MKL-packed matmuls round half precision differently from HF's layers, which flips near-tied tokens of this
    random tiny model (a rounding difference, not a layout one)."""
    from srv_helpers import wrap_loaded

    pm, path = tiny_prefix_peft["prefix-proj"]
    half = copy.deepcopy(pm).to(dtype)
    loaded = wrap_loaded(half.base_model, tiny_loaded.tokenizer)
    loaded.dtype = dtype
    parsed = load_path(path, loaded.prompt_limits())
    prompt = make_prompt("h", parsed.embeddings, parsed.peft_type)
    engine = make_engine(loaded, attention_kernel=False, packed_weights=False)
    assert engine.core.runner.pool.k.dtype == dtype
    for text in ("The movie was great", "ok"):
        ids = tiny_loaded.tokenizer(text)["input_ids"]
        (req,) = run_sync(engine, [Spec(ids, prompt, 6)])
        assert result(req) == peft_greedy_reference(half, ids, 6), text


def test_empty_input_to_a_prefix_task_is_refused_but_not_to_an_embedding_task(tiny_loaded, tiny_prefix_peft):
    prompts = served(tiny_loaded, tiny_prefix_peft)
    engine = make_engine(tiny_loaded)
    with pytest.raises(RequestRejectedError) as info:
        engine.check(new_request(Spec([], prompts["prefix"], 4)))
    assert info.value.code == "empty_input" and "prefix-tuned" in str(info.value)
    engine.check(new_request(Spec([], prompts["pt"], 4)))  # the last virtual token is its input position
    (req,) = run_sync(engine, [Spec([], prompts["pt"], 3)])
    assert len(req.output_token_ids) == 3


def test_smollm_prefix_tuning_in_mixed_batch_equals_peft_forward(smol_loaded, smol_dir, tmp_path):
    """The real model (30 layers, 3 KV heads, head size 64): a PEFT prefix next to a base row equals PEFT."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    torch.manual_seed(5)
    pm = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10)).eval()
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.mul_(0.5)
    pm.save_pretrained(tmp_path / "pfx")
    parsed = load_path(tmp_path / "pfx", smol_loaded.prompt_limits())
    assert parsed.embeddings.shape == (10, 30 * 2 * 3 * 64)
    prompt = make_prompt("pfx", parsed.embeddings, parsed.peft_type)
    tok = smol_loaded.tokenizer
    task_ids, base_ids = tok("The capital of Italy is")["input_ids"], tok("Once upon a time")["input_ids"]
    reqs = run_sync(make_engine(smol_loaded, kv_cache_bytes=32 * 1024**2),
                    [Spec(task_ids, prompt, 6), Spec(base_ids, None, 6)])
    assert result(reqs[0]) == peft_greedy_reference(pm, task_ids, 6)
    assert result(reqs[1]) == peft_greedy_reference(smol_loaded.model, base_ids, 6)
