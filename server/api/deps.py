"""FastAPI dependencies (``Annotated`` style): the app state, the engine, and admin authentication."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import SecretStr

from server.api.errors import APIError


def get_state(request: Request):
    """The :class:`server.app.AppState` of this app."""
    return request.app.state.sp


State = Annotated[object, Depends(get_state)]


def get_engine(request: Request):
    """The running engine; 503 while starting or after the loop died."""
    state = request.app.state.sp
    engine = state.engine
    if engine is None or not state.ready:
        raise APIError(503, "server is starting: model or prompts not loaded yet", type="server_error",
                       code="not_ready")
    if not engine.alive:
        raise APIError(503, f"engine is not running: {engine.error!r}", type="server_error", code="engine_dead")
    return engine


def check_admin(token: SecretStr | None, authorization: str | None) -> None:
    """``Authorization: Bearer <token>`` must match the configured admin token (constant-time comparison).

    Raises:
        APIError: 403 "admin disabled" when no token is configured; 401 when the header is missing or wrong.
    """
    if token is None:
        raise APIError(403, "admin disabled: start the server with --admin-token or SOFTPROMPT_ADMIN_TOKEN",
                       type="permission_error", code="admin_disabled")
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given or not secrets.compare_digest(given.encode(),
                                                                             token.get_secret_value().encode()):
        raise APIError(401, "missing or wrong admin token: expected 'Authorization: Bearer <token>'",
                       type="authentication_error", code="invalid_token",
                       headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Dependency form of :func:`check_admin` for every admin route."""
    check_admin(request.app.state.sp.settings.admin_token, authorization)


Admin = Annotated[None, Depends(require_admin)]
