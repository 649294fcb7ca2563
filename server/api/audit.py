"""The admin audit log: one INFO line per admin request on logger ``softprompt.audit``.

A line reads ``admin action=upload task=qa outcome=created status=201 version=3 sha256=<12 hex> bytes=N
client=<address>``: ``action`` (``upload``, ``delete``, ``list``, ``get``), ``task``, ``outcome`` (``created`` /
``replaced`` / ``unchanged`` / ``deleted`` / ``listed`` / ``found``, or the error code of a refusal), HTTP
``status``, ``version`` and ``sha256`` (first 12 hex digits) when known, ``bytes`` uploaded and ``client`` (the peer
address). The same fields are attached to the record as ``record.audit`` (a dict). Tokens are never logged.
"""

from __future__ import annotations

import json
import logging
import re

from starlette.requests import Request
from starlette.types import Scope

#: Scope key set once a line was logged for the request (the admin gate logs the ones no route logged).
AUDITED = "softprompt_audited"

audit_log = logging.getLogger("softprompt.audit")

#: Audit values written as they are; anything else (spaces, quotes, newlines in a refused task name) is JSON-quoted.
_BARE = re.compile(r"[A-Za-z0-9_.:/+-]{1,200}")
_AUDIT_FIELDS = ("action", "task", "outcome", "status", "version", "sha256", "bytes", "client")


def audit(request: Request | Scope, action: str, *, task: str | None, outcome: str, status: int,
          version: int | None = None, sha256: str | None = None, nbytes: int | None = None) -> None:
    """Log one audit line for an admin action on ``softprompt.audit`` at INFO.

    Args:
        request: the HTTP request, or its ASGI scope (its peer address is logged as ``client``).
        action: ``upload``, ``delete``, ``list`` or ``get``.
        task: the task named in the path (as given, even if invalid), or ``None`` for the listing.
        outcome: what happened: ``created``, ``replaced``, ``unchanged``, ``deleted``, ``listed``, ``found``, or
            the error code of a refusal (e.g. ``no_prompt_dir``, ``bad_shape``, ``task_not_found``).
        status: the HTTP status answered.
        version, sha256: the prompt's, when known (``sha256`` is cut to its first 12 hex digits).
        nbytes: bytes of the uploaded file read, for uploads.
    """
    fields = {
        "action": action, "task": task, "outcome": outcome, "status": status, "version": version,
        "sha256": sha256[:12] if sha256 else None, "bytes": nbytes,
        "client": _client(request),
    }
    parts = []
    for key in _AUDIT_FIELDS:
        value = fields[key]
        if value is None:
            continue
        text = str(value)
        parts.append(f"{key}={text if _BARE.fullmatch(text) else json.dumps(text)}")
    scope = request.scope if isinstance(request, Request) else request
    scope[AUDITED] = True
    audit_log.info("admin %s", " ".join(parts), extra={"audit": fields})


def _client(request: Request | Scope) -> str | None:
    client = request.client if isinstance(request, Request) else request.get("client")
    if client is None:
        return None
    return client.host if isinstance(request, Request) else client[0]


def admin_action(method: str, path: str, prefix: str = "/v1/admin/prompts") -> tuple[str, str | None]:
    """``(action, task)`` of an admin request from its method and path (for requests no route logged): ``upload``,
    ``delete``, ``get`` or ``list`` on the prompt routes; the method in lower case for anything else."""
    task = path[len(prefix) + 1:] if path.startswith(prefix + "/") else None
    if path == prefix or path == prefix + "/":
        return {"GET": "list"}.get(method, method.lower()), None
    if task:
        return {"PUT": "upload", "DELETE": "delete", "GET": "get"}.get(method, method.lower()), task
    return method.lower(), None
