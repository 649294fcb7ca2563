"""Regression tests for faults found in review: blank admin tokens, newline task names, the admin gate that
refuses before reading a body, prompts that overflow the model dtype, one row's non-finite logits, decode rows
starved by a long chunked prefill, and submissions racing the engine's death."""

from __future__ import annotations

import threading

import pytest
import torch
from srv_helpers import Spec, make_engine, make_prompt, new_request, raw_bytes, run_alone, run_sync

from prompt_store.errors import PromptError
from prompt_store.formats import Limits, validate_embeddings, validate_task_name
from server.config import Settings
from server.engine import EngineDeadError
from server.request import RequestStatus


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_admin_token_means_admin_disabled(make_client, blank):
    assert Settings(admin_token=blank).admin_token is None
    client = make_client(admin_token=blank)
    for header in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "}):
        r = client.get("/v1/admin/prompts", headers=header)
        assert r.status_code == 403, r.text
        assert "admin disabled" in r.json()["error"]["message"]


def test_empty_bearer_never_matches(client):
    for header in ({"Authorization": "Bearer"}, {"Authorization": "Bearer  "}, {"Authorization": "Basic x"}):
        r = client.get("/v1/admin/prompts", headers=header)
        assert r.status_code == 401, r.text


@pytest.mark.parametrize("name", ["abc\n", "x.safetensors\n", "ok\nok"])
def test_task_names_with_newlines_are_refused(name):
    with pytest.raises(PromptError) as err:
        validate_task_name(name)
    assert err.value.reason == "bad_name"


def test_upload_with_newline_name_is_refused(client, admin_headers):
    r = client.put("/v1/admin/prompts/abc%0A", headers=admin_headers,
                   files={"file": ("p.safetensors", raw_bytes(torch.zeros(2, 64)))})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "bad_name"
    assert client.get("/v1/tasks").json()["tasks"] == []


def test_admin_gate_answers_before_the_body_is_read(client, admin_headers):
    """A declared Content-Length over the limit gets 413 (with a token) or 401 (without) from the gate."""
    huge = str(64 * 1024 * 1024)
    body = b"x" * 10  # never read: the gate answers first
    r = client.put("/v1/admin/prompts/t", content=body, headers={"Content-Length": huge, **admin_headers})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    r = client.put("/v1/admin/prompts/t", content=body, headers={"Content-Length": huge})
    assert r.status_code == 401, r.text


def test_prompt_that_overflows_the_model_dtype_is_refused():
    t = torch.zeros(4, 8)
    t[1, 2] = 1e5  # finite in fp32, inf in fp16
    assert validate_embeddings(t, Limits(8)).shape == (4, 8)
    with pytest.raises(PromptError) as err:
        validate_embeddings(t, Limits(8, model_dtype=torch.float16))
    assert err.value.reason == "non_finite"
    assert "float16" in str(err.value) and "1 values" in str(err.value)
    assert validate_embeddings(t, Limits(8, model_dtype=torch.bfloat16)).shape == (4, 8)


def test_non_finite_logits_fail_only_their_row(tiny_loaded, monkeypatch):
    engine = make_engine(tiny_loaded)
    good, bad = Spec([5, 6, 7], max_new_tokens=4), Spec([9, 10], max_new_tokens=4)
    alone, _ = run_alone(engine, good)
    runner = engine.runner
    real_forward, real_logits = runner._forward, runner.model.logits
    poisoned: set[str] = set()
    rows_now: list = []

    def forward(rows):
        rows_now[:] = [r for r in rows if r.completes_prompt]
        return real_forward(rows)

    def logits(hidden):
        out = real_logits(hidden).clone()
        for i, r in enumerate(rows_now):
            if r.request.request_id in poisoned:
                out[i] = float("nan")
        return out

    monkeypatch.setattr(runner, "_forward", forward)
    monkeypatch.setattr(runner.model, "logits", logits)
    reqs = [new_request(good), new_request(bad)]
    for q in reqs:
        q.eos_token_ids = engine.eos_token_ids
        engine.scheduler.add(q)
    engine.step()  # admits and prefills both
    poisoned.add(reqs[1].request_id)
    while engine.scheduler.has_work():
        engine.step()
    assert reqs[0].status == RequestStatus.FINISHED_LENGTH and reqs[0].output_token_ids == alone
    assert reqs[1].status == RequestStatus.FINISHED_ERROR
    assert len(reqs[1].output_token_ids) == 1  # the prefill token came before the poisoned step
    assert engine.core.pool.num_used == engine.core.prompt_cache.num_blocks == 0


def test_decode_rows_are_not_starved_by_a_long_chunked_prefill(tiny_loaded):
    """With a 32-token step budget, a 200-token prompt admitted first is prefilled in chunks, while a request
    that is already decoding still gets its token at every step."""
    engine = make_engine(tiny_loaded, max_num_batched_tokens=32, max_num_seqs=4)
    short = new_request(Spec([3, 4], max_new_tokens=8))
    short.eos_token_ids = engine.eos_token_ids
    engine.scheduler.add(short)
    engine.step()  # short prefilled, first token out
    long = new_request(Spec(list(range(10, 210)), max_new_tokens=2))
    long.eos_token_ids = engine.eos_token_ids
    engine.scheduler.add(long)
    for _ in range(6):
        before = len(short.output_token_ids)
        plan = engine.step()
        starts = {r.request.request_id: r.num_tokens for r in plan.rows}
        assert starts[short.request_id] == 1
        assert len(short.output_token_ids) == before + 1 or short.status.is_finished
        assert starts[long.request_id] == 31  # the rest of the 32-token budget
    (ref,) = run_sync(make_engine(tiny_loaded), [Spec([3, 4], max_new_tokens=8)])
    while engine.scheduler.has_work():
        engine.step()
    assert short.output_token_ids == ref.output_token_ids


def test_submit_after_the_loop_died_raises_instead_of_hanging(tiny_loaded, monkeypatch):
    engine = make_engine(tiny_loaded)
    engine.start()
    try:
        monkeypatch.setattr(type(engine), "alive", property(lambda self: True))  # the check passed just before
        engine._fail_all(EngineDeadError("loop died"))
        with pytest.raises(EngineDeadError):
            engine.submit(new_request(Spec([1, 2, 3])))
        assert engine._streams == {}
    finally:
        monkeypatch.undo()
        engine.stop()


def test_prompt_with_values_overflowing_fp16_is_refused_by_the_server(make_client, admin_headers, tiny_loaded):
    """The app passes the model dtype into the store's limits (fp32 here: 1e5 is fine and is served)."""
    client = make_client()
    t = torch.zeros(3, 64)
    t[0, 0] = 1e5
    r = client.put("/v1/admin/prompts/big", headers=admin_headers, files={"file": ("b.safetensors", raw_bytes(t))})
    assert r.status_code == 201, r.text
    assert client.app.state.sp.store.limits.model_dtype == tiny_loaded.dtype
    assert make_prompt("big", t).num_virtual_tokens == 3


def test_stop_during_a_long_step_fails_streams_but_leaves_requests_to_the_loop(tiny_loaded, monkeypatch):
    """``stop`` whose wait times out while a step runs: every stream gets its error at once, the request's state
    is not touched from the stopping thread (the loop owns it), and the loop exits after that step."""
    engine = make_engine(tiny_loaded)
    entered, release = threading.Event(), threading.Event()
    real = engine.runner.execute

    def slow(plan):
        entered.set()
        release.wait(30)
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", slow)
    engine.start()
    req = new_request(Spec([5, 6, 7], None, 50))
    stream = engine.submit(req)
    assert entered.wait(30)
    engine.stop(timeout=0.2)
    outs = list(stream.iter_sync(timeout=5))
    assert outs[-1].finished and outs[-1].finish_reason == "error" and "engine stopped" in outs[-1].error
    assert req.status == RequestStatus.RUNNING  # still the loop's, mid-step
    assert not engine.alive
    release.set()
    engine._thread.join(30)
    assert not engine._thread.is_alive()
