"""FastAPI dependencies (``Annotated`` style): the app state, the engine, and admin authentication."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import SecretStr

from server.api.errors import APIError
from server.api.inference_gate import check_bearer

#: ``Retry-After`` seconds on 503s: while starting, while draining for shutdown (another replica, or this one
#: restarted, will answer), and once the engine died (the process is about to be restarted).
RETRY_AFTER_STARTING, RETRY_AFTER_DRAINING, RETRY_AFTER_DEAD = 5, 1, 10


def get_state(request: Request):
    """The :class:`server.app.AppState` of this app."""
    return request.app.state.sp


State = Annotated[object, Depends(get_state)]


def get_engine(request: Request):
    """The running engine; 503 with ``Retry-After`` while starting, while draining for shutdown, or after the loop
    died."""
    state = request.app.state.sp
    engine = state.engine
    if state.draining:
        raise APIError(503, "server is shutting down: retry on another replica or after the restart",
                       type="server_error", code="draining", headers={"Retry-After": str(RETRY_AFTER_DRAINING)})
    if engine is None or not state.ready:
        raise APIError(503, "server is starting: model or prompts not loaded yet", type="server_error",
                       code="not_ready", headers={"Retry-After": str(RETRY_AFTER_STARTING)})
    if not engine.alive:
        raise APIError(503, f"engine is not running: {engine.error!r}", type="server_error", code="engine_dead",
                       headers={"Retry-After": str(RETRY_AFTER_DEAD)})
    return engine


def check_admin(token: SecretStr | None, authorization: str | None) -> None:
    """``Authorization: Bearer <token>`` must match the configured admin token (constant-time comparison).

    Raises:
        APIError: 403 "admin disabled" when no token is configured; 401 when the header is missing or wrong.
    """
    if token is None:
        raise APIError(403, "admin disabled: start the server with --admin-token or SOFTPROMPT_ADMIN_TOKEN",
                       type="permission_error", code="admin_disabled")
    try:
        check_bearer(token.get_secret_value(), authorization, what="admin token")
    except APIError as exc:
        exc.code = "invalid_token"
        raise


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Dependency form of :func:`check_admin` for every admin route."""
    check_admin(request.app.state.sp.settings.admin_token, authorization)


Admin = Annotated[None, Depends(require_admin)]
