"""ASGI middleware that guards ``/v1/admin`` before any request body is read, and splits the listeners.

With ``--admin-port`` set, admin routes are served only on the listener of that port, which serves the operations
routes (``/health``, ``/ready``, ``/metrics``) too and nothing else; the main listener answers 404 for admin paths.

FastAPI parses a multipart body before it runs a route's dependencies, so without this gate anyone could make the
server spool a large upload before being told 401. The gate answers 401/403 (same rules as
:func:`server.api.deps.check_admin`) and 413 for a declared ``Content-Length`` over the upload limit, without
reading the body, and logs each such refusal of an admin request to the audit log (:mod:`server.api.audit`). The
route still checks auth and the size of what it reads.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_store.formats import ARCHIVE_SLACK_BYTES
from server.api.accounting import error_code
from server.api.audit import AUDITED, admin_action, audit
from server.api.deps import check_admin
from server.api.errors import APIError, error_response

#: Room for multipart framing around the file, bytes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def upload_limit(max_prompt_bytes: int) -> int:
    """Largest upload body accepted, bytes: a prompt file, or an archive of one plus its config and README."""
    return max_prompt_bytes + ARCHIVE_SLACK_BYTES


#: Paths the admin listener serves besides the admin routes.
OPS_PATHS = frozenset({"/health", "/ready", "/metrics"})


def _listener_error(scope: Scope, admin_port: int | None, is_admin: bool) -> APIError | None:
    """404 when a path is asked on the wrong listener (only with a separate admin listener), else None."""
    if admin_port is None:
        return None
    on_admin = (scope.get("server") or (None, None))[1] == admin_port
    if is_admin and not on_admin:
        return APIError(404, f"admin routes are served on the admin listener (port {admin_port}), not here",
                        type="not_found_error", code="not_found")
    if on_admin and not is_admin and scope["path"] not in OPS_PATHS:
        return APIError(404, "the admin listener serves /v1/admin, /health, /ready and /metrics only",
                        type="not_found_error", code="not_found")
    return None


class AdminGate:
    """Args: app: the wrapped ASGI app; prefix: the guarded path prefix."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1/admin") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = scope["app"].state.sp.settings
        is_admin = scope["path"].startswith(self.prefix)
        wrong = _listener_error(scope, settings.admin_port, is_admin)
        if wrong is None and not is_admin:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if wrong is not None:
                raise wrong
            check_admin(settings.admin_token, headers.get("authorization"))
            declared = headers.get("content-length", "")
            limit = upload_limit(settings.max_prompt_bytes) + MULTIPART_OVERHEAD_BYTES
            if declared.isdigit() and int(declared) > limit:
                raise APIError(413, f"request body of {int(declared)} bytes is larger than the limit of {limit} "
                               "bytes", code="too_large")
        except APIError as exc:
            if is_admin:
                action, task = admin_action(scope["method"], scope["path"])
                audit(scope, action, task=task, outcome=exc.code or exc.type, status=exc.status)
            await error_response(exc)(scope, receive, send)
            return
        await self._audited(scope, receive, send)

    async def _audited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; if no route logged an audit line (a 404/405/422/400 before any route code ran, a crash),
        log one from the status and error code sent."""
        sent: dict = {"status": None, "body": b""}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and len(sent["body"]) < 65536:
                sent["body"] += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not scope.get(AUDITED):
                action, task = admin_action(scope["method"], scope["path"])
                status = sent["status"] or 499
                outcome = error_code(sent["body"]) if status >= 400 else "ok"
                audit(scope, action, task=task, outcome=outcome or "error", status=status)
