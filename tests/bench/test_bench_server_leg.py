"""The HTTP driver and the server leg against a fake server (httpx.MockTransport; no live server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from bench.driver import drive, sse_events
from bench.server_leg import ServerTarget
from bench.stats import RequestRecord
from bench.workload import PromptBank, Workload


def _workload(n=6, tasks=3, concurrency=2, arrivals=None):
    return Workload("t", [f"text {j}" for j in range(n)], [j % tasks for j in range(n)], tasks, 4, 2,
                    max_new_tokens=5, concurrency=concurrency, arrivals=arrivals)


def test_drive_caps_in_flight_and_keeps_request_order():
    state = {"now": 0, "max": 0}

    async def send(j: int) -> RequestRecord:
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.001 * (6 - j))
        state["now"] -= 1
        if j == 4:
            raise httpx.ReadError("dropped")
        return RequestRecord(200, 0.0, text=str(j))

    records, wall = asyncio.run(drive(_workload(concurrency=2), send))
    assert state["max"] == 2 and wall > 0
    assert [r.text for r in records if r.ok] == ["0", "1", "2", "3", "5"]
    assert records[4].status == 599 and "dropped" in records[4].error


def test_drive_open_loop_starts_in_arrival_order():
    started = []

    async def send(j: int) -> RequestRecord:
        started.append(j)
        return RequestRecord(200, 0.0)

    asyncio.run(drive(_workload(n=3, concurrency=3, arrivals=[0.02, 0.0, 0.01]), send))
    assert started == [1, 2, 0]


def test_sse_events_reads_event_names():
    body = b'data: {"a": 1}\n\nevent: error\ndata: {"b": 2}\n\ndata: {"c": 3}\n\n'

    async def read():
        resp = httpx.Response(200, content=body)
        return [e async for e in sse_events(resp)]

    assert asyncio.run(read()) == [("message", '{"a": 1}'), ("error", '{"b": 2}'), ("message", '{"c": 3}')]


class FakeServer:
    """Admin uploads/deletes, /metrics, /v1/generate and streamed /v1/tasks/{task}/generate."""

    def __init__(self) -> None:
        self.uploads: list[str] = []
        self.deletes: list[str] = []
        self.in_flight = self.max_uploads_in_flight = 0
        self.metrics_calls = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method in ("PUT", "DELETE"):
            assert request.headers["authorization"] == "Bearer tok"
            self.in_flight += 1
            self.max_uploads_in_flight = max(self.max_uploads_in_flight, self.in_flight)
            await asyncio.sleep(0.001)
            self.in_flight -= 1
            (self.uploads if request.method == "PUT" else self.deletes).append(path.rsplit("/", 1)[1])
            if request.method == "PUT":
                assert b"prompt_embeddings" in request.content
            return httpx.Response(201 if request.method == "PUT" else 200, json={})
        if path == "/metrics":
            self.metrics_calls += 1
            k = self.metrics_calls
            return httpx.Response(200, text=f"softprompt_batch_size_count {k * 2}.0\nsoftprompt_batch_size_sum "
                                            f"{k * 10}.0\n")
        if path == "/v1/generate":
            return httpx.Response(200, json={"generated_text": "warm"})
        task = path.split("/")[3]
        body = json.loads(request.content)
        assert body["stream"] is True and body["parameters"] == {"max_new_tokens": 5, "temperature": 0.0}
        if task == "bench-00002":
            return httpx.Response(200, content=b'event: error\ndata: {"error": {"message": "engine died"}}\n\n')
        n = 5 if body["inputs"] != "text 1" else 2
        events = [{"text": task[-1]}, {"text": "-x", "finish_reason": "length", "usage": {"completion_tokens": n}}]
        return httpx.Response(200, content=b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))


def test_server_leg_uploads_bounded_streams_and_deletes():
    fake = FakeServer()
    bank = PromptBank(torch.randn(50, 8), 4, seed=0)
    target = ServerTarget("http://srv", "tok", bank, timeout=10, upload_concurrency=2,
                          transport=httpx.MockTransport(fake))
    assert asyncio.run(target.ensure_tasks(3)) == 3
    assert asyncio.run(target.ensure_tasks(2)) == 0
    assert sorted(fake.uploads) == ["bench-00000", "bench-00001", "bench-00002"]
    leg = asyncio.run(target.run(_workload(), "test"))
    assert fake.max_uploads_in_flight <= 2
    texts = [r.text if r.ok else None for r in leg.records]
    assert texts == ["0-x", "1-x", None, "0-x", "1-x", None]
    assert leg.records[2].status == 599 and "engine died" in leg.records[2].error
    assert [r.tokens for r in leg.records if r.ok] == [5, 2, 5, 5]
    assert leg.extra["engine"]["engine_steps"] == 2 and leg.extra["engine"]["mean_rows_per_step"] == 5
    asyncio.run(target.delete_all())
    assert sorted(fake.deletes) == sorted(fake.uploads) and target.uploaded == set()


def test_upload_failure_is_a_bench_error():
    async def handler(request):
        return httpx.Response(400, json={"error": {"message": "bad width"}})

    from bench.server_leg import BenchError

    target = ServerTarget("http://srv", "tok", PromptBank(torch.randn(5, 4), 2, 0), timeout=5,
                          transport=httpx.MockTransport(handler))
    with pytest.raises(BenchError, match="bad width"):
        asyncio.run(target.ensure_tasks(1))
