"""What every generation route shares: task lookup, tokenizing and checking a request (off the event loop for long
inputs), its deadline, queueing it, collecting its output (aborting it when the client goes away), and encoding
Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request as HTTPRequest
from fastapi.sse import format_sse_event

from prompt_store.registry import SoftPrompt
from server.api.accounting import annotate
from server.api.deps import RETRY_AFTER_DEAD, RETRY_AFTER_DRAINING
from server.api.errors import APIError
from server.engine import (
    Engine,
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    RequestOutput,
    RequestRejectedError,
)
from server.request import Request, SamplingParams
from server.request_builder import make_request

#: Inputs of up to this many characters are tokenized on the event loop (tens of microseconds, less than a thread
#: hop); longer ones in a worker thread, so a large body never stalls other requests' streams.
INLINE_TOKENIZE_CHARS = 4096


def lookup_task(state, task: str) -> SoftPrompt:
    """The servable prompt of ``task``; 404 if there is none."""
    prompt = state.registry.get(task)
    if prompt is None:
        raise APIError(404, f"unknown task {task!r}: GET /v1/tasks lists the servable tasks",
                       type="not_found_error", code="task_not_found", param="task")
    return prompt


async def build_request(
    state, engine: Engine, prompt: SoftPrompt | None, text: str | None, params: SamplingParams, *,
    token_ids: list[int] | None = None, param: str = "inputs", timeout: float | None = None,
) -> Request:
    """:func:`server.request_builder.make_request` (in a worker thread when ``text`` is long), with the server's
    input-token limit and the request's deadline: ``timeout`` seconds from now, at most ``--request-timeout``.

    Raises:
        APIError: 422 for an empty request; 400 when the input passes ``--max-input-tokens`` or cannot fit the
            context or the KV cache (``param`` names the input field).
    """
    s = state.settings
    limit = s.max_input_tokens
    deadline = time.monotonic() + min(timeout or s.request_timeout, s.request_timeout)
    try:
        if text is not None and len(text) > INLINE_TOKENIZE_CHARS:
            req = await asyncio.to_thread(make_request, engine, prompt, text, params, max_text_tokens=limit)
        else:
            req = make_request(engine, prompt, text, params, token_ids=token_ids, max_text_tokens=limit)
    except RequestRejectedError as exc:
        status = 422 if exc.code == "empty_input" else 400
        raise APIError(status, str(exc), code=exc.code, param=param) from exc
    req.deadline = deadline
    return req


def submit(engine: Engine, req: Request):
    """Queue ``req``.

    Raises:
        APIError: 429 with ``Retry-After`` when the waiting queue is full (by requests or tokens); 503 with
            ``Retry-After`` when the engine is dead or a shutdown drains it.
    """
    try:
        return engine.submit(req)
    except EngineClosedError as exc:
        raise APIError(503, str(exc), type="server_error", code="draining",
                       headers={"Retry-After": str(RETRY_AFTER_DRAINING)}) from exc
    except EngineOverloadedError as exc:
        raise APIError(429, str(exc), type="server_error", code="overloaded",
                       headers={"Retry-After": str(exc.retry_after)}) from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_dead",
                       headers={"Retry-After": str(RETRY_AFTER_DEAD)}) from exc


async def abort_on_disconnect(http: HTTPRequest | None, engine: Engine, request_id: str,
                              interval: float = 0.1) -> None:
    """Poll the client connection every ``interval`` seconds; abort the request when the client has gone."""
    if http is None:
        return
    while not await http.is_disconnected():
        await asyncio.sleep(interval)
    engine.abort(request_id)


async def collect(engine: Engine, req: Request, stream, http: HTTPRequest | None = None) -> tuple[str, RequestOutput]:
    """Wait for all of ``req``'s text; returns it and the final output. If the client disconnects or the caller is
    cancelled, the request is aborted so its row and KV are freed at the next engine step.

    Raises:
        APIError: 499 when the request was aborted (its client left); 503 ``engine_error`` with ``Retry-After`` when
            generation failed (the engine loop died or stopped, or the row's logits were unusable).
    """
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
                       code="engine_error", headers={"Retry-After": str(RETRY_AFTER_DEAD)})
    return "".join(parts), last


def sse(payload: dict, event: str | None = None) -> bytes:
    """One Server-Sent Event with a JSON ``data`` field (FastAPI's SSE encoder)."""
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False), event=event)


def note_task(http: HTTPRequest, prompt: SoftPrompt | None) -> None:
    """Tell the request accounting (:mod:`server.api.accounting`) which task this request is for."""
    annotate(http.scope, task=prompt.task if prompt else "_base")


def note_finish(http: HTTPRequest, finish_reason: str | None, *, failed: bool = False) -> None:
    """Tell the request accounting how the request ended: its finish reason, or (``failed``) the error code of a
    stream that failed after its 200 was sent (counted as 503)."""
    annotate(http.scope, reason=finish_reason, status=503 if failed else None)
