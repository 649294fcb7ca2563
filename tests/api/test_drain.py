"""Graceful shutdown (issue 10): :meth:`server.app.AppState.drain`, which ``softprompt serve`` runs on SIGTERM,
on a live server whose steps are slowed down. The signal handling itself is tested on a real process in
tests/test_serve_process.py."""

from __future__ import annotations

import json
import threading
import time

import httpx

STEP_DELAY_S = 0.02
BODY = {"inputs": "Keep talking", "parameters": {"max_new_tokens": 30}}


def _stream_events(url: str, body: dict, out: list) -> None:
    with httpx.Client(timeout=60) as c, c.stream("POST", url, json={**body, "stream": True}) as r:
        out.append(r.status_code)
        out.extend(json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:"))


def _post(url: str, body: dict, out: list) -> None:
    out.append(httpx.post(url, json=body, timeout=60))


def _start(srv, body: dict) -> tuple[list[threading.Thread], list[list]]:
    """Two streaming and two plain requests, running once this returns."""
    outs: list[list] = [[], [], [], []]
    url = f"{srv.url}/v1/generate"
    threads = [threading.Thread(target=_stream_events, args=(url, body, outs[0])),
               threading.Thread(target=_stream_events, args=(url, body, outs[1])),
               threading.Thread(target=_post, args=(url, body, outs[2])),
               threading.Thread(target=_post, args=(url, body, outs[3]))]
    for t in threads:
        t.start()
    end = time.monotonic() + 10
    while len(srv.engine.scheduler.running) < 4:
        assert time.monotonic() < end, "the four requests did not start"
        time.sleep(0.01)
    return threads, outs


def _finish_reasons(outs: list[list]) -> list[str]:
    reasons = []
    for events in outs[:2]:
        assert events[0] == 200
        assert sum("finish_reason" in e for e in events[1:]) == 1  # one final event, and it is the last
        reasons.append(events[-1]["finish_reason"])
    for (resp,) in outs[2:]:
        assert resp.status_code == 200
        reasons.append(resp.json()["finish_reason"])
    return reasons


def test_drain_refuses_new_work_and_lets_running_requests_finish(slow_live_server):
    srv = slow_live_server(STEP_DELAY_S, max_num_seqs=4)
    threads, outs = _start(srv, BODY)
    result: list[int] = []
    drainer = threading.Thread(target=lambda: result.append(srv.state.drain(30)))
    drainer.start()
    end = time.monotonic() + 5
    while not srv.state.draining:  # set by drain() on its thread
        assert time.monotonic() < end
        time.sleep(0.005)
    r = srv.http.get(f"{srv.url}/ready")
    assert r.status_code == 503 and r.json()["draining"] is True
    r = srv.http.post(f"{srv.url}/v1/generate", json=BODY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and int(r.headers["retry-after"]) >= 1
    assert srv.http.get(f"{srv.url}/health").status_code == 200  # alive, just not taking work
    drainer.join(30)
    for t in threads:
        t.join(30)
    assert result == [0]  # nobody was cut
    assert _finish_reasons(outs) == ["length"] * 4
    assert srv.metric("softprompt_requests_total", {"status": "200", "reason": "length"}) == 4
    assert srv.metric("softprompt_requests_total", {"status": "503", "reason": "draining"}) == 1


def test_drain_timeout_ends_the_rest_with_finish_reason_shutdown(slow_live_server):
    srv = slow_live_server(STEP_DELAY_S, max_num_seqs=4)
    long = {"inputs": "Keep talking", "parameters": {"max_new_tokens": 500}}
    threads, outs = _start(srv, long)
    t0 = time.monotonic()
    assert srv.state.drain(0.3) == 4
    took = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert _finish_reasons(outs) == ["shutdown"] * 4
    for (resp,) in outs[2:]:
        assert 0 < resp.json()["usage"]["completion_tokens"] < 500 and resp.json()["generated_text"]
    assert took < 5
    assert not srv.engine.scheduler.has_work() and srv.engine.core.pool.num_used == 0
    assert srv.metric("softprompt_requests_total", {"reason": "shutdown"}) == 4


def test_drain_waits_for_a_request_still_being_tokenized_and_refuses_it(slow_live_server, monkeypatch):
    import server.api.openai_compat as oc

    srv = slow_live_server(STEP_DELAY_S)
    real = oc._render_chat
    rendering = threading.Event()

    def slow_render(tok, messages):  # chat templates render in a worker thread: make that take 1 s
        rendering.set()
        time.sleep(1.0)
        return real(tok, messages)

    monkeypatch.setattr(oc, "_render_chat", slow_render)
    out: list = []
    body = {"model": srv.engine.loaded.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    t = threading.Thread(target=lambda: out.append(httpx.post(f"{srv.url}/v1/chat/completions", json=body,
                                                               timeout=30)))
    t.start()
    assert rendering.wait(10)  # past the route's draining check, not in the engine yet
    assert srv.state.in_flight == 1 and srv.engine.num_open == 0
    t0 = time.monotonic()
    assert srv.state.drain(30) == 0
    waited = time.monotonic() - t0
    t.join(30)
    assert out[0].status_code == 503 and out[0].json()["error"]["code"] == "draining"
    assert out[0].headers["retry-after"] == "1"
    assert 0.5 < waited < 5  # the drain waited for the request's answer, not for nothing
    assert srv.engine.num_open == 0
