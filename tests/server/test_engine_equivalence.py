"""Every row of a mixed batch equals the same request run alone and the forward-pass greedy reference.

Covers the cases C1, C2, C3, C4 and C11a of shared/cases/README.md, PEFT prompt-tuning and p-tuning checkpoints
(tiny model and SmolLM2), chunked prefill, queueing under the sequence and KV limits, and seeded sampling.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from srv_helpers import (
    EOS_ID,
    Spec,
    decode_text,
    greedy_reference,
    make_engine,
    make_prompt,
    new_request,
    peft_greedy_reference,
    queue_all,
    rand_tensor,
    raw_bytes,
    run_alone,
    run_sync,
    save_peft_adapters,
    submit_and_wait,
)

from prompt_store.formats import Limits, load_path
from server.engine import RequestRejectedError
from server.request import RequestStatus


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ref_of(loaded, spec: Spec) -> tuple[list[int], str]:
    prompt = None if spec.prompt is None else spec.prompt.embeddings
    return greedy_reference(loaded.model, spec.ids, prompt, spec.max_new_tokens, loaded.eos_token_ids)


def result(req) -> tuple[list[int], str]:
    return list(req.output_token_ids), req.status.finish_reason


def assert_kv_released(engine) -> None:
    """No request holds KV blocks: every block in use belongs to the prompt-KV cache."""
    core = engine.core
    assert not core.scheduler.running
    assert core.pool.num_used == core.prompt_cache.num_blocks
    assert all(e.users == 0 for e in core.prompt_cache._entries.values())


def assert_same_first_step(reqs) -> None:
    """Requests that got their first token in the same engine step share ``first_token_time``."""
    assert len({r.first_token_time for r in reqs}) == 1


# ------------------------------------------------------------------------------------------------ mixed batches
def test_mixed_tasks_and_base_rows_equal_alone_and_reference(tiny_loaded):
    prompts = {n: make_prompt(f"t{n}", rand_tensor(n, scale=1.0 + n / 4, seed=n)) for n in (1, 4, 11, 20)}
    specs = [
        Spec(ids_of(5, 1), prompts[4], 6),
        Spec(ids_of(17, 2), None, 9),
        Spec(ids_of(1, 3), prompts[1], 5),
        Spec(ids_of(30, 4), prompts[20], 7),
        Spec(ids_of(8, 5), prompts[11], 8),
        Spec(ids_of(3, 6), None, 4),
        Spec(ids_of(12, 7), prompts[4], 10),
    ]
    engine = make_engine(tiny_loaded)
    batch = run_sync(engine, specs)
    assert_same_first_step(batch)
    for spec, req in zip(specs, batch, strict=True):
        ref = ref_of(tiny_loaded, spec)
        assert result(req) == ref
        assert run_alone(make_engine(tiny_loaded), spec) == ref
        assert len(req.output_token_ids) == spec.max_new_tokens  # the tiny model does not reach EOS here
    assert_kv_released(engine)


def test_c1_short_and_long_input_same_task_same_step(tiny_loaded):
    """C1: padding between the virtual tokens and the text. 8 virtual tokens, a 3- and a 30-token input."""
    p = make_prompt("c1", rand_tensor(8, scale=2.0, seed=11))
    specs = [Spec(ids_of(3, 12), p, 10), Spec(ids_of(30, 13), p, 10)]
    engine = make_engine(tiny_loaded)
    reqs = run_sync(engine, specs)
    assert_same_first_step(reqs)
    for spec, req in zip(specs, reqs, strict=True):
        assert result(req) == ref_of(tiny_loaded, spec)
        assert result(req) == run_alone(make_engine(tiny_loaded), spec)
    # the two rows of one task differ (the short row did not get the long row's context or vice versa)
    assert reqs[0].output_token_ids != reqs[1].output_token_ids


def _find_inputs(loaded, n_tokens: int, want, seeds=range(200), max_new: int = 8):
    """First ``ids_of(n_tokens, seed)`` whose reference satisfies ``want(tokens, finish)``; computed, not guessed."""
    for seed in seeds:
        ids = ids_of(n_tokens, 1000 * n_tokens + seed)
        ref = greedy_reference(loaded.model, ids, None, max_new, loaded.eos_token_ids)
        if want(*ref):
            return ids, ref
    raise AssertionError(f"no {n_tokens}-token input with the wanted reference among {len(seeds)} seeds")


def test_c2_pad_equals_eos_short_row_and_real_eos(tiny_eos_loaded):
    """C2: SmolLM2's tokenizer has pad == EOS. Batch a 2-token with a 20-token input (8 new tokens), plus a row
    whose reference emits EOS at step k: it stops at k, the others go on."""
    tok = tiny_eos_loaded.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == EOS_ID
    loaded = tiny_eos_loaded
    short_ids, short_ref = _find_inputs(loaded, 2, lambda t, f: t[0] != EOS_ID)
    long_ids, long_ref = _find_inputs(loaded, 20, lambda t, f: f == "length")
    eos_ids, eos_ref = _find_inputs(loaded, 6, lambda t, f: f == "stop" and 2 <= len(t) < 8)
    k = len(eos_ref[0])
    specs = [Spec(short_ids, None, 8), Spec(long_ids, None, 8), Spec(eos_ids, None, 8)]
    engine = make_engine(loaded)
    reqs = run_sync(engine, specs)
    assert_same_first_step(reqs)
    assert result(reqs[0]) == short_ref and len(reqs[0].output_token_ids) >= 1
    assert reqs[0].output_token_ids[0] != EOS_ID  # the short row is not empty
    assert result(reqs[1]) == long_ref == (long_ref[0], "length") and len(long_ref[0]) == 8
    assert result(reqs[2]) == eos_ref
    assert len(reqs[2].output_token_ids) == k and reqs[2].output_token_ids[-1] == EOS_ID
    assert reqs[2].status == RequestStatus.FINISHED_STOPPED
    # and with a soft prompt in front, the short row still equals its reference
    p = make_prompt("c2", rand_tensor(3, seed=21))
    spec = Spec(short_ids, p, 8)
    (req,) = run_sync(make_engine(loaded), [spec, Spec(long_ids, None, 8)])[:1]
    assert result(req) == ref_of(loaded, spec)


def test_c2_eos_row_through_started_engine(tiny_eos_loaded):
    """The stop at step k is reported as finish_reason "stop" with k tokens in the stream outputs."""
    loaded = tiny_eos_loaded
    eos_ids, (eos_toks, _) = _find_inputs(loaded, 4, lambda t, f: f == "stop" and 2 <= len(t) < 8)
    long_ids, long_ref = _find_inputs(loaded, 20, lambda t, f: f == "length")
    engine = make_engine(loaded)
    engine.start()
    try:
        (a_toks, a_last), (b_toks, b_last) = submit_and_wait(
            engine, [Spec(long_ids, None, 8), Spec(eos_ids, None, 8)]
        )
    finally:
        engine.stop()
    assert (a_toks, a_last.finish_reason) == long_ref
    assert b_toks == eos_toks and b_last.finish_reason == "stop"
    assert b_last.num_output_tokens == len(eos_toks)


def test_c3_rows_never_get_another_tasks_prompt(tiny_loaded):
    """C3: A near-zero prompt, B large-norm prompt, base; 24 requests cycling them, shuffled orders."""
    A = make_prompt("a", rand_tensor(6, scale=1e-4, seed=31))
    B = make_prompt("b", rand_tensor(9, scale=20.0, seed=32))
    kinds = {"A": A, "B": B, "base": None}
    texts = [ids_of(n, 40 + n) for n in (4, 7, 11, 2)]
    refs = {}
    for ti, ids in enumerate(texts):
        for name, p in kinds.items():
            refs[ti, name] = ref_of(tiny_loaded, Spec(ids, p, 6))
        # precondition: the three references of one text differ, so a swapped prompt would show
        assert len({tuple(refs[ti, n][0]) for n in kinds}) == 3
    jobs = [(i % 4, name) for i, name in enumerate(["A", "B", "base"] * 8)]  # 24 requests
    for order_seed in (0, 1):
        order = jobs[:]
        random.Random(order_seed).shuffle(order)
        specs = [Spec(texts[ti], kinds[name], 6) for ti, name in order]
        reqs = run_sync(make_engine(tiny_loaded), specs)
        assert_same_first_step(reqs)
        for (ti, name), req in zip(order, reqs, strict=True):
            assert result(req) == refs[ti, name], (ti, name)
            for other in kinds:
                if other != name:
                    assert result(req) != refs[ti, other]
    # the same through the running engine thread, submitted in another shuffled order
    order = jobs[:]
    random.Random(2).shuffle(order)
    engine = make_engine(tiny_loaded)
    engine.start()
    try:
        outs = submit_and_wait(engine, [Spec(texts[ti], kinds[name], 6) for ti, name in order])
    finally:
        engine.stop()
    for (ti, name), (toks, last) in zip(order, outs, strict=True):
        assert (toks, last.finish_reason) == refs[ti, name], (ti, name)


class MaskRecorder:
    """Wraps the runner so that, at prefill and at every decode step, each row's attended key length (its
    ``seq_len`` in the step's attention metadata) is recorded next to what it must be: virtual + text +
    generated-so-far positions of the request owning the row. Prompt-KV passes are recorded with request None.
    ``ok`` checks that the row's metadata block table is the request's own block table."""

    def __init__(self, engine, monkeypatch) -> None:
        import server.model_runner as mr

        runner = engine.runner
        self.records: list[dict] = []
        self.lock = threading.Lock()
        current: dict = {}
        orig_forward, orig_build = runner._forward, mr.build_metadata

        def forward(rows):
            current["rows"] = rows
            return orig_forward(rows)

        def build(specs, block_size, device="cpu"):
            meta = orig_build(specs, block_size, device)
            rows = current.pop("rows", None)
            for i, (qlen, slen, table) in enumerate(zip(meta.query_lens, meta.seq_lens_list, meta.block_tables_list,
                                                        strict=True)):
                kind = "decode" if qlen == 1 and slen > 1 else "prefill"
                if rows is None:
                    self._add(None, kind, slen, None, True)
                    continue
                q = rows[i].request
                expected = q.num_virtual_tokens + len(q.prompt_token_ids) + len(q.output_token_ids)
                self._add(q, kind, slen, expected, list(table) == q.block_table[: len(table)])
            return meta

        monkeypatch.setattr(runner, "_forward", forward)
        monkeypatch.setattr(mr, "build_metadata", build)

    def _add(self, q, kind, attended, expected, ok) -> None:
        with self.lock:
            self.records.append(dict(request=q, kind=kind, attended=attended, expected=expected, ok=ok))


def test_c4_mask_length_matches_virtual_text_and_generated(make_client, prompts_dir: Path, monkeypatch):
    """C4: 20 virtual tokens, 16 concurrent 37-token inputs, 5 new tokens: every answer 200 with 5 tokens, and at
    prefill and at every decode step each row attends to exactly virtual + text + generated-so-far keys."""
    P = rand_tensor(20, scale=1.5, seed=41)
    (prompts_dir / "c4.safetensors").write_bytes(raw_bytes(P))
    client = make_client()
    engine = client.app.state.sp.engine
    tok = engine.loaded.tokenizer
    texts = []
    for i in range(16):
        words = f"request {i} says"
        while len(tok(words)["input_ids"]) < 37:
            words += " word"
        texts.append(words)
        assert len(tok(words)["input_ids"]) == 37
    rec = MaskRecorder(engine, monkeypatch)
    responses: list = [None] * 16

    def go(i: int) -> None:
        responses[i] = client.post("/v1/tasks/c4/generate",
                                   json={"inputs": texts[i], "parameters": {"max_new_tokens": 5}})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in responses:
        assert r is not None and r.status_code == 200, r and r.text
        body = r.json()
        assert body["usage"] == {"prompt_tokens": 37, "virtual_tokens": 20, "completion_tokens": 5}
        assert body["finish_reason"] == "length"
    rows = [x for x in rec.records if x["request"] is not None]
    assert all(x["ok"] for x in rec.records)
    assert all(x["attended"] == x["expected"] for x in rows)
    per_req: dict[str, list] = {}
    for x in rows:
        per_req.setdefault(x["request"].request_id, []).append((x["kind"], x["attended"]))
    assert len(per_req) == 16
    for seq in per_req.values():
        assert seq == [("prefill", 57), ("decode", 58), ("decode", 59), ("decode", 60), ("decode", 61)]
    # the virtual-token prefix (all but the last virtual token) was computed once, alone, for 19 positions: when
    # the prompt loaded (prefetch, before the recorder was installed) or for the first request
    prefix_rows = [x for x in rec.records if x["request"] is None]
    assert [(x["kind"], x["attended"]) for x in prefix_rows] in ([], [("prefill", 19)])
    assert engine.core.prompt_cache.misses == 1
    # and each answer equals its greedy reference
    for text, r in zip(texts, responses, strict=True):
        ids = tok(text)["input_ids"]
        ref, _ = greedy_reference(engine.loaded.model, ids, P, 5)
        assert r.json()["generated_text"] == decode_text(tok, ref)


def test_c11a_virtual_tokens_do_not_eat_the_new_token_budget(tiny_loaded):
    """C11a: 20 virtual tokens, a 5-token input, max_new_tokens 7: exactly 7 tokens, as without the prompt."""
    p = make_prompt("c11", rand_tensor(20, seed=51))
    ids = ids_of(5, 52)
    assert ref_of(tiny_loaded, Spec(ids, p, 7))[1] == "length"  # EOS not reached
    engine = make_engine(tiny_loaded)
    engine.start()
    try:
        (with_toks, with_last), (base_toks, base_last) = submit_and_wait(
            engine, [Spec(ids, p, 7), Spec(ids, None, 7)]
        )
    finally:
        engine.stop()
    assert len(with_toks) == len(base_toks) == 7
    assert (with_last.num_prompt_tokens, with_last.num_virtual_tokens, with_last.num_output_tokens) == (5, 20, 7)
    assert (base_last.num_prompt_tokens, base_last.num_virtual_tokens, base_last.num_output_tokens) == (5, 0, 7)
    assert with_last.finish_reason == base_last.finish_reason == "length"
    assert with_toks == ref_of(tiny_loaded, Spec(ids, p, 7))[0]


# ------------------------------------------------------------------------------------------------ limits
def test_chunked_prefill_and_queueing_keep_results(tiny_loaded):
    """Small step budget (prompts prefilled in chunks), 2 running sequences at most, a small KV pool: every
    row still equals its reference."""
    prompts = [make_prompt(f"q{n}", rand_tensor(n, seed=60 + n)) for n in (3, 13)]
    specs = [
        Spec(ids_of(40, 61), prompts[0], 5),
        Spec(ids_of(33, 62), None, 6),
        Spec(ids_of(2, 63), prompts[1], 4),
        Spec(ids_of(25, 64), prompts[1], 5),
        Spec(ids_of(9, 65), None, 3),
    ]
    # 16 tokens a step; KV pool of 8 blocks x 16 positions: at most two of these requests fit at once
    bpt = 2 * 2 * 2 * 16 * 4
    engine = make_engine(tiny_loaded, max_num_batched_tokens=16, max_num_seqs=2, kv_cache_bytes=8 * 16 * bpt,
                         prompt_kv_cache_bytes=0)
    assert engine.core.pool.num_blocks == 8
    max_running = 0
    orig_step = engine.step

    def step():
        nonlocal max_running
        plan = orig_step()
        assert plan.num_batched_tokens <= 16
        max_running = max(max_running, len(plan.rows))
        return plan

    engine.step = step
    reqs = run_sync(engine, specs)
    assert max_running == 2
    for spec, req in zip(specs, reqs, strict=True):
        assert result(req) == ref_of(tiny_loaded, spec)
    assert_kv_released(engine)


def test_preempted_requests_resume_with_the_tokens_they_would_have_produced(tiny_loaded):
    """KV on demand: a pool too small for every running request's full length forces preemptions (the most
    recently admitted request is freed and recomputed later); every row, greedy and seeded, still equals its
    reference / the same request alone, and nothing leaks."""
    prompts = [make_prompt(f"pre{n}", rand_tensor(n, scale=1.5, seed=200 + n)) for n in (6, 21)]
    specs = [
        Spec(ids_of(9, 201), prompts[0], 24),
        Spec(ids_of(14, 202), None, 24),
        Spec(ids_of(5, 203), prompts[1], 24),
        Spec(ids_of(11, 204), prompts[0], 24),
        Spec(ids_of(7, 205), prompts[1], 20, temperature=0.9, seed=77),
    ]
    bpt = 2 * 2 * 2 * 16 * 4
    # 10 blocks of 16 positions: all five are admitted (each needs 1-2 blocks at first) but cannot all grow
    engine = make_engine(tiny_loaded, kv_cache_bytes=10 * 16 * bpt, prompt_kv_cache_bytes=0, max_num_seqs=8)
    reqs = run_sync(engine, specs)
    assert engine.core.scheduler.num_preemptions > 0
    assert sum(r.num_preemptions for r in reqs) == engine.core.scheduler.num_preemptions
    for spec, req in zip(specs[:4], reqs[:4], strict=True):
        assert result(req) == ref_of(tiny_loaded, spec)
    assert result(reqs[4]) == run_alone(make_engine(tiny_loaded), specs[4])
    assert_kv_released(engine)
    fams = engine.metrics.render().decode()
    assert f"softprompt_preemptions_total {float(engine.core.scheduler.num_preemptions)}" in fams


def test_requests_of_one_prompt_share_its_kv_blocks(tiny_loaded):
    """Eight running requests of one 37-token prompt read the same 2 full blocks (36 positions) for its virtual
    tokens: the pool holds 2 prompt blocks + each request's own blocks, and the metrics show the blocks saved."""
    p = make_prompt("shared", rand_tensor(37, seed=210))
    specs = [Spec(ids_of(4 + i, 211 + i), p, 3) for i in range(8)]
    engine = make_engine(tiny_loaded)
    reqs = queue_all(engine, specs)
    plan = engine.step()
    assert len(plan.prompts_to_compute) == 1 and len(plan.tail_copies) == 7  # the creator computes its tail
    shared = reqs[0].block_table[:2]
    assert all(q.block_table[:2] == shared for q in reqs)
    assert [engine.core.pool.ref_count(b) for b in shared] == [9, 9]  # the cache + 8 requests
    assert len({q.block_table[2] for q in reqs}) == 8  # each request's own block after the tail
    assert engine.core.prompt_cache.blocks_saved == 2 * 7
    assert engine.core.pool.num_used == 2 + 8  # without sharing: 8 x 3 blocks
    while engine.core.has_work():
        engine.step()
    for spec, req in zip(specs, reqs, strict=True):
        assert result(req) == ref_of(tiny_loaded, spec)
    assert_kv_released(engine)


def test_prompt_kv_cache_evicts_lru_under_its_budget_and_recomputes_equal(tiny_loaded):
    """A budget of two prompts' KV: a third prompt evicts the least recently used one; serving the evicted
    prompt again recomputes it and gives the same tokens."""
    bpt = 2 * 2 * 2 * 16 * 4
    prompts = [make_prompt(f"lru{i}", rand_tensor(17, seed=220 + i)) for i in range(3)]
    engine = make_engine(tiny_loaded, prompt_kv_cache_bytes=2 * 16 * bpt)
    cache = engine.core.prompt_cache
    first = [run_alone(engine, Spec(ids_of(5, 230), p, 4)) for p in prompts]
    assert len(cache) == 2 and prompts[0].sha256 not in cache._entries  # the oldest went
    assert cache.nbytes == 2 * 16 * bpt
    misses = cache.misses
    again = run_alone(engine, Spec(ids_of(5, 230), prompts[0], 4))
    assert cache.misses == misses + 1 and again == first[0]
    assert first[0] == ref_of(tiny_loaded, Spec(ids_of(5, 230), prompts[0], 4))
    assert_kv_released(engine)


def test_engine_check_rejects_what_can_never_run(tiny_loaded):
    p = make_prompt("r", rand_tensor(20, seed=70))
    # 8 blocks of 16 positions = 128
    engine = make_engine(tiny_loaded, kv_cache_bytes=8 * 16 * 512, prompt_kv_cache_bytes=0)
    with pytest.raises(RequestRejectedError) as e:
        engine.check(new_request(Spec([], None, 4)))
    assert e.value.code == "empty_input"
    engine.check(new_request(Spec([], p, 4)))  # the virtual tokens alone are a prompt
    with pytest.raises(RequestRejectedError) as e:
        engine.check(new_request(Spec(ids_of(200, 71), p, 40)))
    assert e.value.code == "context_length_exceeded"
    assert all(s in str(e.value) for s in ("(20)", "(200)", "(40)", "260", "256"))
    with pytest.raises(RequestRejectedError) as e:
        engine.check(new_request(Spec(ids_of(100, 72), p, 9)))
    assert e.value.code == "kv_cache_exceeded" and "129" in str(e.value) and "128" in str(e.value)
    engine.check(new_request(Spec(ids_of(100, 72), p, 8)))  # exactly 128 positions


def test_seeded_sampling_independent_of_neighbours(tiny_loaded):
    p = make_prompt("s", rand_tensor(4, seed=80))
    target = Spec(ids_of(6, 81), p, 8, temperature=1.0, top_p=0.95, seed=1234)
    alone = run_alone(make_engine(tiny_loaded), target)
    crowd = [Spec(ids_of(3 + i, 90 + i), None if i % 2 else p, 8, temperature=0.7, seed=i) for i in range(5)]
    batch = run_sync(make_engine(tiny_loaded), crowd[:2] + [target] + crowd[2:])
    assert result(batch[2]) == alone
    other_seed = run_alone(make_engine(tiny_loaded), Spec(target.ids, p, 8, temperature=1.0, top_p=0.95,
                                                          seed=4321))
    assert other_seed != alone  # the seed matters, so the equality above is not vacuous


def test_bf16_prompt_is_served_in_model_dtype(tiny_loaded):
    p = make_prompt("bf", rand_tensor(5, scale=3.0, seed=82).to(torch.bfloat16))
    assert p.dtype == "bfloat16"
    spec = Spec(ids_of(7, 83), p, 6)
    ref = greedy_reference(tiny_loaded.model, spec.ids, p.embeddings.float(), 6)
    assert run_alone(make_engine(tiny_loaded), spec) == ref


def test_abort_frees_the_row_and_its_blocks(tiny_loaded):
    engine = make_engine(tiny_loaded)
    engine.start()
    try:
        req = new_request(Spec(ids_of(5, 84), None, 200))
        stream = engine.submit(req)
        first = next(stream.iter_sync(timeout=30))
        assert len(first.new_token_ids) == 1
        engine.abort(req.request_id)
        outs = list(stream.iter_sync(timeout=30))
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert req.status == RequestStatus.FINISHED_ABORTED and len(req.output_token_ids) < 200
        assert_kv_released(engine)
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------------ PEFT checkpoints
@pytest.fixture(scope="module")
def tiny_peft(tiny_loaded, smol_dir, tmp_path_factory):
    """PEFT 0.21 prompt-learning adapters on copies of the tiny model, saved with save_pretrained.

    Returns ``{name: (peft_model, saved_dir)}``."""
    from peft import (
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    root = tmp_path_factory.mktemp("peft")
    configs = {
        "pt-random": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6,
                                        prompt_tuning_init=PromptTuningInit.RANDOM),
        "pt-text": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text="Classify the sentiment of this review:",
                                      tokenizer_name_or_path=str(smol_dir)),
        "ptune-mlp": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5,
                                         encoder_hidden_size=32,
                                         encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP),
    }
    return save_peft_adapters(tiny_loaded.model, configs, root, seed=100)


def test_peft_checkpoints_served_equal_peft_forward(tiny_loaded, tiny_peft):
    limits = Limits(hidden_size=64)
    prompts = {}
    for name, (_, path) in tiny_peft.items():
        parsed = load_path(path, limits)
        prompts[name] = make_prompt(name, parsed.embeddings, parsed.peft_type)
    assert {n: p.peft_type for n, p in prompts.items()} == {
        "pt-random": "PROMPT_TUNING", "pt-text": "PROMPT_TUNING", "ptune-mlp": "P_TUNING"}
    assert {n: p.num_virtual_tokens for n, p in prompts.items()} == {"pt-random": 6, "pt-text": 7, "ptune-mlp": 5}
    tok = tiny_loaded.tokenizer
    texts = ["The movie was great", "I did not like the ending at all, it was far too long", "ok"]
    jobs = [(name, t) for name in prompts for t in texts]
    specs = [Spec(tok(t)["input_ids"], prompts[name], 6) for name, t in jobs]
    specs.append(Spec(tok(texts[1])["input_ids"], None, 6))  # a base row in the same batch
    reqs = run_sync(make_engine(tiny_loaded), specs)
    assert_same_first_step(reqs)
    for (name, t), req in zip(jobs, reqs[:-1], strict=True):
        ref = peft_greedy_reference(tiny_peft[name][0], tok(t)["input_ids"], 6)
        assert result(req) == ref, name
    assert result(reqs[-1]) == ref_of(tiny_loaded, specs[-1])


def test_smollm_peft_text_init_adapter_in_mixed_batch(smol_loaded, smol_dir, tmp_path):
    """The real model: a PEFT PROMPT_TUNING TEXT-init adapter, served next to a base row, equals PEFT's forward."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                             prompt_tuning_init=PromptTuningInit.TEXT,
                             prompt_tuning_init_text="Answer in French:", tokenizer_name_or_path=str(smol_dir))
    pm = get_peft_model(base, cfg).eval()
    pm.save_pretrained(tmp_path / "fr")
    parsed = load_path(tmp_path / "fr", Limits(hidden_size=576))
    prompt = make_prompt("fr", parsed.embeddings, parsed.peft_type)
    tok = smol_loaded.tokenizer
    task_ids = tok("The capital of Italy is")["input_ids"]
    base_ids = tok("Once upon a time")["input_ids"]
    specs = [Spec(task_ids, prompt, 6), Spec(base_ids, None, 6)]
    reqs = run_sync(make_engine(smol_loaded, kv_cache_bytes=32 * 1024**2), specs)
    assert_same_first_step(reqs)
    assert result(reqs[0]) == peft_greedy_reference(pm, task_ids, 6)
    assert result(reqs[1]) == greedy_reference(smol_loaded.model, base_ids, None, 6)


def test_smollm_c2_short_long_and_real_eos(smol_loaded):
    """C2 on the real model, whose pad token is its EOS token: a 2-token and a 20-token input plus a chat turn
    whose reference ends with a real EOS at step k, batched; each equals its reference, finish reason included."""
    tok = smol_loaded.tokenizer
    model = smol_loaded.model
    assert tok.pad_token_id == tok.eos_token_id == EOS_ID and EOS_ID in smol_loaded.eos_token_ids
    short_ids = tok("Hello there")["input_ids"]
    long_ids = tok("The history of the city goes back many centuries, and its old walls still stand "
                   "today near the river that runs through the valley")["input_ids"][:20]
    assert (len(short_ids), len(long_ids)) == (2, 20)
    eos_row = None
    for q in ("What is 2+2?", "Say yes.", "Reply with one word: hello"):
        ids = tok(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        ref = greedy_reference(model, ids, None, 8, smol_loaded.eos_token_ids)
        if ref[1] == "stop":
            eos_row = (ids, ref)
            break
    assert eos_row is not None, "no chat turn ended with EOS within 8 tokens"
    specs = [Spec(short_ids, None, 8), Spec(long_ids, None, 8), Spec(eos_row[0], None, 8)]
    reqs = run_sync(make_engine(smol_loaded, kv_cache_bytes=32 * 1024**2), specs)
    assert_same_first_step(reqs)
    assert result(reqs[0]) == greedy_reference(model, short_ids, None, 8, smol_loaded.eos_token_ids)
    assert len(reqs[0].output_token_ids) >= 1 and reqs[0].output_token_ids[0] != EOS_ID
    assert result(reqs[1]) == greedy_reference(model, long_ids, None, 8, smol_loaded.eos_token_ids)
    assert result(reqs[2]) == eos_row[1]
    k = len(eos_row[1][0])
    assert len(reqs[2].output_token_ids) == k and reqs[2].output_token_ids[-1] == EOS_ID


def test_prefetched_prompt_kv_serves_its_first_request_equal(tiny_loaded):
    """A prompt's KV computed ahead of traffic (prefetch, while idle) is a cache hit for its first request, which
    still equals its reference; a prefetch that would exceed the budget is skipped rather than evicting."""
    bpt = 2 * 2 * 2 * 16 * 4
    p, q = make_prompt("pf", rand_tensor(21, seed=240)), make_prompt("pf2", rand_tensor(21, seed=241))
    engine = make_engine(tiny_loaded, prompt_kv_cache_bytes=20 * bpt)  # room for one 20-position prompt
    core = engine.core
    core.queue_prefetch(p)
    core.queue_prefetch(q)
    core.queue_prefetch(make_prompt("one", rand_tensor(1, seed=242)))  # nothing to cache for one virtual token
    assert core.prefetch_pending == 2
    assert core.prefetch_some() == 1  # q would exceed the budget: dropped, p stays cached
    assert p.sha256 in core.prompt_cache and q.sha256 not in core.prompt_cache and core.prefetch_pending == 0
    assert core.pool.num_used == core.prompt_cache.num_blocks == 1  # the tail's temporary block went back
    misses = core.prompt_cache.misses
    spec = Spec(ids_of(6, 243), p, 5)
    assert run_alone(engine, spec) == ref_of(tiny_loaded, spec)
    assert core.prompt_cache.misses == misses and core.prompt_cache.hits >= 1
    assert_kv_released(engine)
