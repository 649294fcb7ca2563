"""What every generation route shares: task lookup, tokenizing and checking a request, queueing it, collecting
its output (aborting it when the client goes away), and encoding Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request as HTTPRequest
from fastapi.sse import format_sse_event

from prompt_store.registry import SoftPrompt
from server.api.errors import APIError
from server.engine import Engine, EngineDeadError, EngineOverloadedError, RequestOutput, RequestRejectedError
from server.request import Request, SamplingParams
from server.request_builder import make_request


def lookup_task(state, task: str) -> SoftPrompt:
    """The servable prompt of ``task``; 404 if there is none."""
    prompt = state.registry.get(task)
    if prompt is None:
        raise APIError(404, f"unknown task {task!r}: GET /v1/tasks lists the servable tasks",
                       type="not_found_error", code="task_not_found", param="task")
    return prompt


def build_request(
    engine: Engine, prompt: SoftPrompt | None, text: str | None, params: SamplingParams, *,
    token_ids: list[int] | None = None, param: str = "inputs",
) -> Request:
    """:func:`server.request_builder.make_request`, with a rejection as an HTTP error: 422 for an empty request,
    400 when it cannot fit the context or the KV cache (``param`` names the input field)."""
    try:
        return make_request(engine, prompt, text, params, token_ids=token_ids)
    except RequestRejectedError as exc:
        status = 422 if exc.code == "empty_input" else 400
        raise APIError(status, str(exc), code=exc.code, param=param) from exc


def submit(engine: Engine, req: Request):
    """Queue ``req``; 503 when the engine is dead or the queue is full."""
    try:
        return engine.submit(req)
    except EngineOverloadedError as exc:
        raise APIError(503, str(exc), type="server_error", code="overloaded") from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_dead") from exc


async def abort_on_disconnect(http: HTTPRequest | None, engine: Engine, request_id: str,
                              interval: float = 0.1) -> None:
    """Poll the client connection every ``interval`` seconds; abort the request when the client has gone."""
    if http is None:
        return
    while not await http.is_disconnected():
        await asyncio.sleep(interval)
    engine.abort(request_id)


async def collect(engine: Engine, req: Request, stream, http: HTTPRequest | None = None) -> tuple[str, RequestOutput]:
    """Wait for all of ``req``'s text. If the client disconnects or the caller is cancelled, the request is
    aborted so its row and KV are freed at the next engine step."""
    parts: list[str] = []
    last: RequestOutput | None = None
    watcher = asyncio.create_task(abort_on_disconnect(http, engine, req.request_id))
    try:
        async for out in stream:
            parts.append(out.text)
            last = out
    finally:
        watcher.cancel()
        if last is None or not last.finished:
            engine.abort(req.request_id)
    if last is not None and last.finish_reason == "abort":
        raise APIError(499, "client closed the request", code="client_closed")
    if last is None or last.finish_reason == "error":
        raise APIError(503, f"generation failed: {last.error if last else 'no output'}", type="server_error",
                       code="engine_error")
    return "".join(parts), last


def sse(payload: dict, event: str | None = None) -> bytes:
    """One Server-Sent Event with a JSON ``data`` field (FastAPI's SSE encoder)."""
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False), event=event)


def record_outcome(state, task: str, status: int, t0: float | None = None) -> None:
    """Count a request by task (``_base`` for the base model) and HTTP status; for a success, also observe its
    latency in seconds since ``t0`` (``time.monotonic()``)."""
    state.metrics.requests.labels(task, str(status)).inc()
    if t0 is not None:
        state.metrics.request_latency.labels(task).observe(time.monotonic() - t0)
