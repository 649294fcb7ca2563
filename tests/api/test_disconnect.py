"""Case C14: a client that hangs up. With 2 running sequences allowed, two streaming requests of 500 new tokens
are read for one chunk and closed, and two non-streaming ones are dropped after 0.5 s. Within about 2 s the
running gauge is 0 and a new request is served at once, and no more tokens are computed for the dropped rows.

The tiny model would finish 500 tokens in a moment, so its forward pass is slowed to ``STEP_DELAY_S`` per engine
step: a dropped row that kept running would still have several seconds of work left.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

STEP_DELAY_S = 0.02  # 500 steps take >= 10 s
DEADLINE_S = 2.0  # "within about 2 s" (case C14)
MAX_NEW = 500
BODY = {"inputs": "Tell me everything you know", "parameters": {"max_new_tokens": MAX_NEW}}
RUNNING = "softprompt_running_requests"
GENERATED = "softprompt_generated_tokens_total"
REQUESTS = "softprompt_requests_total"


@pytest.fixture
def slow_srv(slow_live_server):
    return slow_live_server(STEP_DELAY_S, max_num_seqs=2, max_num_batched_tokens=64)


def _poll(pred, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while True:
        if pred():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


def _tokens(srv) -> float:
    return srv.metric(GENERATED, {"task": "_base"})


def _assert_counted_cancelled(srv, n: int) -> None:
    """The dropped requests are counted once each, as 499 "cancelled" (and as nothing else)."""
    assert _poll(lambda: srv.metric(REQUESTS, {"status": "499"}) == n, DEADLINE_S), srv.metric(REQUESTS)
    assert srv.metric(REQUESTS, {"status": "499", "reason": "cancelled", "task": "_base"}) == n
    assert srv.metric(REQUESTS) == n


def _open_two_streams_and_close(srv) -> list[dict]:
    """Start two streaming requests, read one data event from each, close both; returns the events read."""
    first, readers = [], []
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            client = stack.enter_context(httpx.Client(timeout=30))
            resp = stack.enter_context(client.stream("POST", f"{srv.url}/v1/generate", json={**BODY, "stream": True}))
            assert resp.status_code == 200
            # keep the line iterator alive: a discarded, half-read httpx iterator closes its connection at once
            lines = resp.iter_lines()
            readers.append(lines)
            line = next(ln for ln in lines if ln.startswith("data:"))
            first.append(json.loads(line[5:]))
        # both rows run (2 sequences allowed) before the clients hang up
        assert len(srv.engine.scheduler.running) == 2
    return first


def _drop_two_plain_requests(srv) -> list[BaseException]:
    """Two non-streaming requests whose clients give up after 0.5 s; returns what each client raised."""
    raised: list[BaseException] = []

    def call() -> None:
        with httpx.Client(timeout=30) as client:
            try:
                client.post(f"{srv.url}/v1/generate", json=BODY, timeout=0.5)
            except httpx.TimeoutException as exc:
                raised.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return raised


def _assert_no_more_compute(srv) -> None:
    """Rows freed, and neither engine steps nor generated tokens advance any more."""
    engine = srv.engine
    assert _poll(lambda: not engine.scheduler.running and not engine.scheduler.waiting, DEADLINE_S)
    assert engine.core.pool.num_used == engine.core.prompt_cache.num_blocks  # their KV blocks are back
    steps, tokens = engine.steps, _tokens(srv)
    time.sleep(0.5)  # a row still running would advance ~25 steps here
    assert engine.steps == steps
    assert _tokens(srv) == tokens


def _assert_served_at_once(srv, tiny_long_loaded, greedy_ref, decode) -> None:
    prompt = "A fresh request"
    ref, _ = greedy_ref(tiny_long_loaded, tiny_long_loaded.tokenizer(prompt)["input_ids"], max_new_tokens=4)
    t0 = time.monotonic()
    resp = httpx.post(f"{srv.url}/v1/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 4}},
                      timeout=30)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 200
    assert resp.json()["generated_text"] == decode(ref)
    # the dropped rows would have held both sequence slots for ~10 s more
    assert elapsed < DEADLINE_S


def test_c14_closed_streams_stop_computing(slow_srv, tiny_long_loaded, greedy_ref, decode):
    before = _tokens(slow_srv)
    first = _open_two_streams_and_close(slow_srv)
    assert all("text" in e and "token_ids" in e for e in first)
    _assert_no_more_compute(slow_srv)
    _assert_counted_cancelled(slow_srv, 2)
    assert 2 <= _tokens(slow_srv) - before < MAX_NEW / 2  # far below the 2 x 500 they asked for
    _assert_served_at_once(slow_srv, tiny_long_loaded, greedy_ref, decode)


def test_c14_dropped_plain_requests_stop_computing(slow_srv, tiny_long_loaded, greedy_ref, decode):
    before = _tokens(slow_srv)
    raised = _drop_two_plain_requests(slow_srv)
    assert len(raised) == 2  # both clients gave up: neither got a response
    _assert_no_more_compute(slow_srv)
    _assert_counted_cancelled(slow_srv, 2)
    assert 2 <= _tokens(slow_srv) - before < MAX_NEW / 2
    _assert_served_at_once(slow_srv, tiny_long_loaded, greedy_ref, decode)


def test_c14_running_gauge_is_zero_within_two_seconds(slow_srv, tiny_long_loaded, greedy_ref, decode):
    _open_two_streams_and_close(slow_srv)
    assert _poll(lambda: slow_srv.metric(RUNNING) == 0, DEADLINE_S), (
        f"{RUNNING} = {slow_srv.metric(RUNNING)} while the scheduler runs "
        f"{len(slow_srv.engine.scheduler.running)} requests"
    )
    raised = _drop_two_plain_requests(slow_srv)
    assert len(raised) == 2
    assert _poll(lambda: slow_srv.metric(RUNNING) == 0, DEADLINE_S), (
        f"{RUNNING} = {slow_srv.metric(RUNNING)} while the scheduler runs "
        f"{len(slow_srv.engine.scheduler.running)} requests"
    )
    _assert_served_at_once(slow_srv, tiny_long_loaded, greedy_ref, decode)
    assert slow_srv.metric(RUNNING) == 0


def test_c14_openai_stream_closed_early_stops_computing(slow_srv):
    """The same through the OpenAI route: a completion stream closed after its first chunk."""
    import openai

    before = _tokens(slow_srv)
    with openai.OpenAI(base_url=f"{slow_srv.url}/v1", api_key="unused", max_retries=0, timeout=30) as oai:
        stream = oai.completions.create(model=slow_srv.engine.loaded.model_id, prompt="Go on and on",
                                        max_tokens=MAX_NEW, temperature=0, stream=True)
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        stream.close()
    _assert_no_more_compute(slow_srv)
    _assert_counted_cancelled(slow_srv, 1)
    made = _tokens(slow_srv) - before
    assert made >= 1 and made < MAX_NEW / 2
