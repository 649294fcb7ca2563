"""ASGI middleware in front of the inference routes (``/v1/...`` except ``/v1/admin``): the optional API key and the
request-body size limit, both checked before any body is parsed.

- With ``--api-key`` set, every inference route needs ``Authorization: Bearer <key>`` (as vLLM's ``--api-key``);
  a missing or wrong key is 401 with ``WWW-Authenticate: Bearer``. The comparison is constant-time
  (:func:`secrets.compare_digest`).
- A POST body over ``--max-request-bytes`` is 413: at once for a declared ``Content-Length``, else as soon as the
  bytes read pass the limit. The body (at most the limit) is read here and handed on unchanged.
"""

from __future__ import annotations

import hashlib
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, error_response

INFERENCE_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/admin"


def check_bearer(expected: str, authorization: str | None, *, what: str) -> None:
    """``authorization`` must be ``Bearer <expected>``. The comparison is constant-time in the content and, as both
    sides are hashed (SHA-256) first, does not reveal the expected length either.

    Raises:
        APIError: 401 (``invalid_api_key``) naming the expected header.
    """
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    same = secrets.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())
    if scheme.lower() != "bearer" or not given or not same:
        raise APIError(401, f"missing or wrong {what}: expected 'Authorization: Bearer <{what}>'",
                       type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], int] | None:
    """Read the request body's messages until its end, or None once more than ``limit`` bytes came."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, size  # the client went away: let the app see it
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages, size


class InferenceGate:
    """Args: app: the wrapped ASGI app. Settings are read from ``scope["app"].state.sp.settings`` per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(INFERENCE_PREFIX) or path.startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        settings = scope["app"].state.sp.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if settings.api_key is not None:
                check_bearer(settings.api_key.get_secret_value(), headers.get("authorization"), what="API key")
            if scope["method"] == "POST":
                receive = await self._bounded(receive, headers.get("content-length", ""), settings.max_request_bytes)
        except APIError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _bounded(receive: Receive, declared: str, limit: int) -> Receive:
        """A ``receive`` that replays the (already read, at most ``limit`` bytes) body, then defers to the client's.

        Raises:
            APIError: 413 when the declared or the actual body is over ``limit`` bytes.
        """
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {int(declared)} bytes is larger than the limit of {limit} bytes "
                           "(--max-request-bytes)", code="too_large")
        read = await _read_body(receive, limit)
        if read is None:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes (--max-request-bytes)",
                           code="too_large")
        pending = read[0]

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        return replay
