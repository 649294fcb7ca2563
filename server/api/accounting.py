"""Counting every generation request exactly once, with its final status: an ASGI middleware around the app.

It wraps ``POST /v1/generate``, ``/v1/tasks/{task}/generate``, ``/v1/completions`` and ``/v1/chat/completions``
and, when the exchange is over, increments ``softprompt_requests_total{task, status, reason}`` once:

- ``status`` is the HTTP status sent, except that a request whose client went away before its final output is
  ``499`` (nginx's "client closed request"): a stream cut short, or a reply never sent;
- ``reason`` is the finish reason of a 200 (``stop``, ``length``, ``timeout``, ``shutdown``), the error ``code`` of
  an error body (``overloaded``, ``validation_error``, ``invalid_json``, ``task_not_found``, ...), or ``cancelled``;
- ``task`` is the task served (``_base`` for the base model), else the task named in the path when it is loaded,
  else ``_unknown`` (a bounded label set: unknown names never become labels).

Routes report what only they know through :func:`annotate` (the task, the finish reason, the status of a stream
that failed after its 200 was sent); the middleware sees
statuses that no route handler sees (401/413 from the gates, 422 from validation, a cancelled stream). A 200 that
ends with a real finish reason also gets its latency observed.

It also keeps ``AppState.in_flight``, the generation requests inside the app (from arrival to the last byte sent),
which a drain waits for: a request still being tokenized is not in the engine yet.
"""

from __future__ import annotations

import json
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

GENERATION_PATH = re.compile(r"^/v1/(?:generate|completions|chat/completions|tasks/(?P<task>[^/]+)/generate)$")
#: Key in the ASGI scope where routes leave ``task`` and ``reason``.
SCOPE_KEY = "softprompt"
FINISHED = frozenset({"stop", "length", "timeout", "shutdown"})
CLIENT_CLOSED = 499
UNKNOWN_TASK = "_unknown"


def annotate(scope: Scope, **values: str | int | None) -> None:
    """Leave ``task``, ``reason`` and/or ``status`` (a stream that sent 200 and then failed in-band) for the
    accounting of this request (routes call it)."""
    scope.setdefault(SCOPE_KEY, {}).update({k: v for k, v in values.items() if v is not None})


def error_code(body: bytes) -> str | None:
    """The ``code`` (else ``type``) of an error body in the one error shape; None if the body is not one."""
    try:
        err = json.loads(body).get("error")
        return err.get("code") or err.get("type") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None


class RequestAccounting:
    """Args: app: the wrapped ASGI app. Metrics and the registry come from ``scope["app"].state.sp``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = GENERATION_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        sent: dict = {"status": None, "error_body": b"", "complete": False}
        state = scope["app"].state.sp
        state.in_flight += 1  # the event loop's thread only: no lock needed

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                if sent["status"] is not None and sent["status"] >= 400 and len(sent["error_body"]) < 65536:
                    sent["error_body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    sent["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:  # a server fault: Starlette's outer middleware answers 500
            sent.update(status=500, complete=True, error_body=b'{"error": {"code": "internal_error"}}')
            raise
        finally:  # also on cancellation (the client went away): counted as 499
            state.in_flight -= 1
            self._record(scope, match, sent, t0)

    @staticmethod
    def _record(scope: Scope, match: re.Match, sent: dict, t0: float) -> None:
        state = scope["app"].state.sp
        info = scope.get(SCOPE_KEY, {})
        task = info.get("task")
        if task is None:  # refused before the route ran: the path may still say
            named = match.group("task")
            if scope["path"] == "/v1/generate":
                task = "_base"
            else:
                task = named if named and state.registry.get(named) is not None else UNKNOWN_TASK
        status, reason = info.get("status", sent["status"]), info.get("reason")
        if (status is None or status == CLIENT_CLOSED or not sent["complete"]
                or (status == 200 and reason not in FINISHED)):
            status, reason = CLIENT_CLOSED, "cancelled"  # the client left before its final output
        elif status >= 400:
            reason = error_code(sent["error_body"]) or reason or "error"
        state.metrics.requests.labels(task, str(status), reason).inc()
        if status == 200:
            state.metrics.request_latency.labels(task).observe(time.monotonic() - t0)
