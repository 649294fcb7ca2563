"""Streaming on the native routes: ``"stream": true`` on ``POST /v1/tasks/{task}/generate`` and ``/v1/generate``.

Events are SSE ``data:`` JSON, one per text delta, then a final one with ``finish_reason`` and ``usage``; the
deltas joined equal the non-streamed text of the same request; an error after the stream started arrives as an
``event: error``.
"""

from __future__ import annotations

import pytest


def _upload(client, admin_headers, task: str, data: bytes) -> dict:
    resp = client.put(f"/v1/admin/prompts/{task}", headers=admin_headers,
                      files={"file": (f"{task}.safetensors", data)})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _stream(client, path: str, body: dict, parse_sse) -> list[dict]:
    resp = client.post(path, json={**body, "stream": True})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert all(ev is None for ev, _ in events), events  # no error event
    return [d for _, d in events]


def _check_events(events: list[dict]) -> str:
    """Shape of a successful stream; returns the joined text."""
    *deltas, final = events
    for d in deltas:
        assert set(d) == {"text", "token_ids"}
        assert d["text"] != ""  # one event per text delta: no empty ones
        assert d["token_ids"]
    assert {"text", "token_ids", "finish_reason", "usage", "task", "prompt_version"} <= set(final)
    assert final["finish_reason"] in ("stop", "length")
    return "".join(d["text"] for d in events)


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 20},
    {"max_new_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 1234},
    {"max_new_tokens": 20, "temperature": 1.5, "top_k": 50, "seed": 7},
])
def test_base_stream_joins_to_the_plain_response(client, params, parse_sse):
    body = {"inputs": "The meaning of life is", "parameters": params}
    plain = client.post("/v1/generate", json=body).json()
    events = _stream(client, "/v1/generate", body, parse_sse)
    assert _check_events(events) == plain["generated_text"]
    final = events[-1]
    assert final["finish_reason"] == plain["finish_reason"]
    assert final["usage"] == plain["usage"]
    assert final["task"] is None and final["prompt_version"] is None
    # every generated token is accounted for, and no event carries more than one step's tokens
    assert sum(len(e["token_ids"]) for e in events) <= plain["usage"]["completion_tokens"]
    assert len(events) <= plain["usage"]["completion_tokens"]


def test_sampling_really_samples_and_the_seed_fixes_it(client):
    greedy = client.post("/v1/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 16}}).json()
    sampled = [client.post("/v1/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 16, "temperature": 1.0, "seed": s}}).json()["generated_text"] for s in (5, 5, 6)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]
    assert sampled[0] != greedy["generated_text"]


def test_task_stream_joins_to_the_plain_response(client, admin_headers, rand_embeddings, safetensors_bytes,
                                                 parse_sse):
    meta = _upload(client, admin_headers, "poet", safetensors_bytes(rand_embeddings(6, scale=2.0, seed=3)))
    body = {"inputs": "Roses are red", "parameters": {"max_new_tokens": 16}}
    plain = client.post("/v1/tasks/poet/generate", json=body).json()
    base = client.post("/v1/generate", json=body).json()
    assert plain["generated_text"] != base["generated_text"]  # the soft prompt steers
    events = _stream(client, "/v1/tasks/poet/generate", body, parse_sse)
    assert _check_events(events) == plain["generated_text"]
    final = events[-1]
    assert final["task"] == "poet" and final["prompt_version"] == meta["version"] == plain["prompt_version"]
    assert final["usage"] == plain["usage"]
    assert final["usage"]["virtual_tokens"] == 6
    assert final["usage"]["prompt_tokens"] == len(client.app.state.sp.loaded.tokenizer("Roses are red")["input_ids"])


def test_task_stream_with_empty_input_uses_the_virtual_tokens_alone(client, admin_headers, rand_embeddings,
                                                                    safetensors_bytes, parse_sse):
    _upload(client, admin_headers, "solo", safetensors_bytes(rand_embeddings(4, seed=9)))
    body = {"inputs": "", "parameters": {"max_new_tokens": 8}}
    plain = client.post("/v1/tasks/solo/generate", json=body).json()
    events = _stream(client, "/v1/tasks/solo/generate", body, parse_sse)
    assert _check_events(events) == plain["generated_text"]
    assert events[-1]["usage"] == {"prompt_tokens": 0, "virtual_tokens": 4, "completion_tokens": 8}


def test_stream_errors_before_the_stream_are_plain_json(client):
    resp = client.post("/v1/tasks/nope/generate", json={"inputs": "x", "stream": True})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "task_not_found"
    resp = client.post("/v1/generate", json={"inputs": "x", "stream": True, "parameters": {"max_new_tokens": 0}})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"
    resp = client.post("/v1/generate", json={"inputs": "x", "stream": True, "parameters": {"max_new_tokens": 10**6}})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def _fail_after(monkeypatch, engine, n_ok: int) -> list[int]:
    """Make the engine's forward pass raise from its ``n_ok + 1``-th call on; returns the call counter."""
    real = engine.runner._forward
    calls = [0]

    def forward(rows):
        calls[0] += 1
        if calls[0] > n_ok:
            raise RuntimeError("injected forward failure")
        return real(rows)

    monkeypatch.setattr(engine.runner, "_forward", forward)
    return calls


def test_error_after_the_stream_started_is_an_error_event(client, monkeypatch, parse_sse):
    body = {"inputs": "The meaning of life is", "parameters": {"max_new_tokens": 30}}
    plain = client.post("/v1/generate", json=body).json()["generated_text"]
    engine = client.app.state.sp.engine
    calls = _fail_after(monkeypatch, engine, 6)
    resp = client.post("/v1/generate", json={**body, "stream": True})
    assert resp.status_code == 200  # the stream had started
    events = parse_sse(resp.text)
    *data, (kind, err) = events
    assert kind == "error"
    assert len(data) >= 1 and all(ev is None for ev, _ in data)
    streamed = "".join(d["text"] for _, d in data)
    assert streamed and plain.startswith(streamed)  # what came before the failure was the right text
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "server_error" and err["error"]["code"] == "engine_error"
    assert "injected forward failure" in err["error"]["message"]
    assert calls[0] == 7
    # the engine is dead now: health says so and new requests are refused with 503
    assert client.get("/health").status_code == 503
    again = client.post("/v1/generate", json=body)
    assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"


def test_error_without_streaming_is_a_503(client, monkeypatch):
    _fail_after(monkeypatch, client.app.state.sp.engine, 2)
    resp = client.post("/v1/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 10}})
    assert resp.status_code == 503
    err = resp.json()["error"]
    assert err["code"] == "engine_error" and "injected forward failure" in err["message"]
