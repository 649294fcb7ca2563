"""Operations (issue 10) in process: 429 with Retry-After (requests and tokens), deadlines, the API key, the body
limit, the admin listener, and every generation request counted once with its final status. Drain and cancelled
streams need a real server: tests/api/test_drain.py and tests/api/test_disconnect.py."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from srv_helpers import (
    Spec,
    assert_error,
    families,
    make_engine,
    new_request,
    rand_tensor,
    raw_bytes,
    samples,
    value,
)

from server.request import RequestStatus

ADMIN = {"Authorization": "Bearer test-admin-token"}  # tests/conftest.py ADMIN_TOKEN
REQS = "softprompt_requests"


@pytest.fixture
def qa(prompts_dir):
    (prompts_dir / "qa.safetensors").write_bytes(raw_bytes(rand_tensor(4, scale=2.0, seed=1)))


def gen(client, task=None, text="hello there", n=4, **params):
    url = f"/v1/tasks/{task}/generate" if task else "/v1/generate"
    return client.post(url, json={"inputs": text, "parameters": {"max_new_tokens": n, **params}})


def slow_down(client, seconds: float = 0.02) -> None:
    """Every engine step of ``client``'s app takes at least ``seconds`` more (the tiny model is too fast to time)."""
    engine = client.app.state.sp.engine
    real = engine.runner._forward

    def forward(rows):
        time.sleep(seconds)
        return real(rows)

    engine.runner._forward = forward


@contextlib.contextmanager
def engine_held(client):
    """Hold the engine inside its next step until the block exits; yields an event set once it is held."""
    engine = client.app.state.sp.engine
    gate, held = threading.Event(), threading.Event()
    real = engine.step

    def step():
        plan = real()
        if not held.is_set():
            held.set()
            gate.wait(30)
        return plan

    engine.step = step
    try:
        yield held
    finally:
        gate.set()


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)))
    t.start()
    return t, out


def wait_for(pred, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def kv_request_blocks(client) -> float:
    return value(families(client), "softprompt_kv_cache_blocks", owner="requests")


# ------------------------------------------------------------------------------------------------ deadlines
def test_request_timeout_ends_a_running_request_and_frees_its_row(make_client, qa):
    client = make_client()
    slow_down(client)
    r = gen(client, "qa", n=150, timeout=0.3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "timeout"
    assert 0 < body["usage"]["completion_tokens"] < 150
    assert body["generated_text"]  # the text so far is kept
    fams = families(client)
    assert value(fams, "softprompt_running_requests") == 0
    assert value(fams, "softprompt_kv_cache_blocks", owner="requests") == 0
    assert value(fams, REQS, "_total", task="qa", status="200", reason="timeout") == 1
    assert gen(client, "qa", n=3).json()["finish_reason"] == "length"  # the server goes on


def test_server_default_deadline_and_the_request_cannot_extend_it(make_client, qa):
    client = make_client(request_timeout=0.3)
    slow_down(client)
    for params in ({}, {"timeout": 1000.0}):
        r = gen(client, None, n=150, **params)
        assert r.json()["finish_reason"] == "timeout" and r.json()["usage"]["completion_tokens"] < 150, params


def test_timeout_in_streams_and_openai_routes(make_client, qa):
    client = make_client()
    slow_down(client)
    r = client.post("/v1/tasks/qa/generate", json={"inputs": "hi", "stream": True,
                                                   "parameters": {"max_new_tokens": 150, "timeout": 0.3}})
    final = [ln for ln in r.text.splitlines() if '"finish_reason"' in ln]
    assert len(final) == 1 and '"finish_reason": "timeout"' in final[0]
    r = client.post("/v1/completions", json={"model": "qa", "prompt": "hi", "max_tokens": 150, "timeout": 0.3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "timeout"
    r = gen(client, "qa", n=3, timeout=0)
    assert_error(r, 422, param="parameters.timeout")


def test_deadline_expires_waiting_and_running_requests_in_the_engine(tiny_loaded):
    engine = make_engine(tiny_loaded, max_num_seqs=1)
    core = engine.core
    a, b = new_request(Spec([5, 6, 7], None, 20)), new_request(Spec([8, 9], None, 20))
    core.add(a)
    core.add(b)
    core.step()  # a runs, b waits (one sequence slot)
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    now = time.monotonic()
    b.deadline = now - 1
    outs = core.expire(now)
    assert [(o.request_id, o.finish_reason, o.finished) for o in outs] == [(b.request_id, "timeout", True)]
    assert list(core.scheduler.waiting) == [] and b.block_table == []
    a.deadline = now - 1
    (out,) = core.expire(now)
    assert out.finish_reason == "timeout" and out.num_output_tokens == 1
    assert core.pool.num_used == 0 and not core.scheduler.has_work()
    assert core.expire(now) == []


# ------------------------------------------------------------------------------------------------ overload
def test_full_queue_answers_429_with_retry_after(make_client, qa):
    client = make_client(max_waiting=1)
    engine = client.app.state.sp.engine
    with engine_held(client) as held:
        ta, ra = in_background(gen, client, "qa", n=3)
        assert held.wait(30)  # a is admitted; the engine is held inside its first step
        tb, rb = in_background(gen, client, None, "second", 3)
        assert wait_for(lambda: engine._inbox.qsize() == 1)  # b waits in the inbox: nothing drains it meanwhile
        r = gen(client, None, "third", 3)
        assert_error(r, 429, code="overloaded", contains=("1 requests already waiting",))
        assert r.headers["retry-after"] == "1"  # no request completed yet: no rate to go by
    ta.join(60)
    tb.join(60)
    assert ra["r"].status_code == 200 and rb["r"].status_code == 200
    assert gen(client, None, "fourth", 2).status_code == 200


def test_token_bounded_queue_answers_429_with_retry_after(make_client, qa):
    client = make_client(max_waiting_tokens=8)
    engine = client.app.state.sp.engine
    with engine_held(client) as held:
        ta, ra = in_background(gen, client, "qa", n=3)
        assert held.wait(30)  # a runs, the engine is held in its step
        long_text = "one two three four five six seven eight nine ten"
        tb, rb = in_background(gen, client, None, long_text, 3)  # an empty queue takes any one request
        assert wait_for(lambda: engine.queued_tokens > 8)
        r = gen(client, None, "hi", 3)
        assert_error(r, 429, code="overloaded", contains=("prompt tokens already waiting", "limit of 8"))
        assert r.headers["retry-after"] == "1"  # no request completed yet: no rate to go by
    ta.join(60)
    tb.join(60)
    assert ra["r"].status_code == 200 and rb["r"].status_code == 200
    assert engine.queued_tokens == 0  # admitted requests are off the count
    assert gen(client, None, "hi", 2).status_code == 200
    assert value(families(client), REQS, "_total", status="429", reason="overloaded") == 1


def test_retry_after_follows_the_recent_completion_rate(tiny_loaded):
    engine = make_engine(tiny_loaded)
    assert engine.retry_after() == 1  # no completions seen yet
    engine._charged.update({f"w{i}": 2 for i in range(5)})  # 5 requests waiting
    now = time.monotonic()
    engine._finish_times.extend([now - 2, now - 1, now])  # 1 request/s
    assert engine.retry_after() == 5
    engine._finish_times.extend([now + i / 1000 for i in range(1, 200)])
    assert engine.retry_after() == 1  # fast completions: at least 1 s
    engine._finish_times.clear()
    engine._finish_times.extend([now - 300, now - 200])  # old: outside the 60 s window
    assert engine.retry_after() == 1
    engine._finish_times.extend([now - 59, now])  # one completion in 59 s: 5 waiting need 295 s
    assert engine.retry_after() == 60  # capped


def test_only_completions_count_toward_the_rate(make_client, qa):
    client = make_client()
    engine = client.app.state.sp.engine
    slow_down(client)
    gen(client, "qa", n=50, timeout=0.05)  # a timeout is not a completion
    assert len(engine._finish_times) == 0
    gen(client, "qa", n=2)
    assert len(engine._finish_times) == 1


# ------------------------------------------------------------------------------------------------ gates
def test_api_key_guards_inference_routes_only(make_client, qa):
    client = make_client(api_key="sk-test")
    for r in (gen(client, "qa"), client.get("/v1/models"), client.get("/v1/tasks"),
              client.post("/v1/completions", json={"model": "qa", "prompt": "x"},
                          headers={"Authorization": "Bearer sk-wrong"})):
        assert_error(r, 401, code="invalid_api_key", contains=("Authorization: Bearer",))
        assert r.headers["www-authenticate"] == "Bearer"
    key = {"Authorization": "Bearer sk-test"}
    r = client.post("/v1/tasks/qa/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, headers=key)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert client.get("/v1/models", headers=key).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/v1/admin/prompts", headers=ADMIN).status_code == 200  # admin has its own token
    assert value(families(client), REQS, "_total", status="401", reason="invalid_api_key") == 2  # the 2 POSTs


def test_body_limit_is_413_before_parsing(make_client, qa):
    client = make_client(max_request_bytes=2048)
    big = {"inputs": "x" * 4000, "parameters": {"max_new_tokens": 2}}
    assert_error(client.post("/v1/generate", json=big), 413, code="too_large", contains=("2048",))

    def chunks():  # no Content-Length: the gate counts what it reads
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"y" * 300
        yield b'"}'

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, code="too_large")
    assert gen(client, "qa", n=2).status_code == 200
    assert value(families(client), REQS, "_total", status="413", reason="too_large") == 2


def test_max_input_tokens(make_client, qa):
    client = make_client(max_input_tokens=3)
    assert_error(gen(client, "qa", "one two three four five six"), 400, code="input_too_long",
                 param="inputs", contains=("limit is 3",))
    assert gen(client, "qa", "hi").status_code == 200


def test_long_inputs_are_tokenized_off_the_event_loop(make_client, qa, monkeypatch):
    import server.api.service as service

    client = make_client()
    threads = []
    real = service.make_request

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "make_request", spy)
    gen(client, "qa", "short", n=1)
    gen(client, "qa", "word " * (service.INLINE_TOKENIZE_CHARS // 5 + 10), n=1)
    assert len(threads) == 2 and threads[0] != threads[1]  # the long one ran in a worker thread


def test_separate_admin_listener(make_client, qa):
    client = make_client(admin_port=9001)
    on_admin = "http://testserver:9001"
    assert_error(client.get("/v1/admin/prompts", headers=ADMIN), 404, code="not_found", contains=("9001",))
    r = client.get(f"{on_admin}/v1/admin/prompts", headers=ADMIN)
    assert r.status_code == 200 and [p["task"] for p in r.json()["prompts"]] == ["qa"]
    assert client.get(f"{on_admin}/v1/admin/prompts").status_code == 401  # still needs the token
    assert_error(client.post(f"{on_admin}/v1/generate", json={"inputs": "hi"}), 404, code="not_found")
    assert client.get(f"{on_admin}/health").status_code == 200
    assert client.get(f"{on_admin}/metrics").status_code == 200
    assert gen(client, "qa", n=2).status_code == 200  # inference on the main listener


# ------------------------------------------------------------------------------------------------ accounting
def test_every_generation_request_is_counted_once_with_its_final_status(make_client, qa):
    client = make_client()
    sent = [
        (gen(client, "qa", n=2), ("qa", "200", "length")),
        (gen(client, None, n=2), ("_base", "200", "length")),
        (gen(client, "nope"), ("_unknown", "404", "task_not_found")),
        (client.post("/v1/tasks/qa/generate", json={"inputs": 5}), ("qa", "422", "validation_error")),
        (client.post("/v1/tasks/nope/generate", json={}), ("_unknown", "422", "validation_error")),
        (client.post("/v1/generate", json={"inputs": 5}), ("_base", "422", "validation_error")),
        (gen(client, "qa", n=0), ("qa", "422", "validation_error")),
        (gen(client, None, ""), ("_base", "422", "empty_input")),
        (gen(client, "qa", n=400), ("qa", "400", "context_length_exceeded")),
        (client.post("/v1/completions", json={"model": "gone", "prompt": "x"}), ("_unknown", "404",
                                                                                 "model_not_found")),
        (client.post("/v1/completions", json={"model": "qa", "prompt": "x", "max_tokens": 2, "stream": True}),
         ("qa", "200", "length")),
        (client.post("/v1/chat/completions", json={"model": "qa", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 2}), ("qa", "200", "length")),
    ]
    for r, (_, status, _) in sent:
        assert str(r.status_code) == status, r.text
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    fams = families(client)
    got = sorted((s.labels["task"], s.labels["status"], s.labels["reason"], s.value)
                 for s in samples(fams, REQS, "_total") if s.value)
    expected: dict = {}
    for _, key in sent:
        expected[key] = expected.get(key, 0) + 1
    err = r.json()["error"]
    expected[("_base", "400", err["code"] or err["type"])] = 1  # /v1/generate is the base model's route
    assert got == sorted((*k, float(v)) for k, v in expected.items())
    assert value(fams, "softprompt_request_latency_seconds", "_count") == 4  # the 200s


def test_fuzz_finding_top_p_below_float32_is_served_and_the_engine_lives(make_client, qa):
    client = make_client()
    for url, body in (("/v1/generate", {"inputs": "hi", "parameters": {"temperature": 1, "top_p": 5e-324,
                                                                       "max_new_tokens": 2}}),
                      ("/v1/chat/completions", {"model": "qa", "messages": [{"role": "user", "content": "hi"}],
                                                "top_p": 5e-324, "max_tokens": 2})):
        r = client.post(url, json=body)
        assert r.status_code == 200, r.text
    assert client.get("/health").json()["status"] == "ok"


def test_a_failed_generation_is_503_with_retry_after(make_client, qa):
    client = make_client()
    engine = client.app.state.sp.engine

    def broken(rows):
        raise RuntimeError("simulated device fault")

    engine.runner._forward = broken
    r = gen(client, "qa", n=3)
    assert_error(r, 503, code="engine_error", contains=("simulated device fault",))
    assert r.headers["retry-after"] == "10"
    r = gen(client, "qa", n=3)  # the loop is dead now: refused before submission
    assert_error(r, 503, code="engine_dead")
    assert r.headers["retry-after"] == "10"


def test_a_closed_engine_refuses_submissions_with_draining(make_client, qa):
    client = make_client()
    client.app.state.sp.engine.close()
    r = gen(client, "qa", n=3)  # past the route's draining check (the app is not draining): the engine refuses
    assert_error(r, 503, code="draining", contains=("shutting down",))
    assert r.headers["retry-after"] == "1"
    assert value(families(client), REQS, "_total", status="503", reason="draining") == 1
