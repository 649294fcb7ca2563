"""Admin routes for soft prompts (``Authorization: Bearer <token>`` on every one).

- ``PUT /v1/admin/prompts/{task}``: multipart upload in form field ``file``; its kind is told by its filename:
  ``.safetensors`` (one 2-D tensor) or ``.zip`` / ``.tar.gz`` holding a PEFT adapter directory. Validated before
  anything changes, written atomically into the prompt directory, servable when the response returns. 201 on
  create, 200 on replace (or an identical re-upload). The body's ``persisted`` says whether it is on disk.
- ``GET /v1/admin/prompts``, ``GET /v1/admin/prompts/{task}``, ``DELETE /v1/admin/prompts/{task}``.

Durability: with no prompt directory (``--prompts``) uploads and deletes answer 409 ``no_prompt_dir``, unless the
server was started with ``--memory-prompts`` (tasks kept in memory only, ``"persisted": false``, lost on restart).

Audit: every admin request logs one line on logger ``softprompt.audit`` (:mod:`server.api.audit`); the routes log
what they did, the admin gate what it refused before a route ran (401, 403, 413, wrong listener).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import JSONResponse

from prompt_store.errors import PromptError
from prompt_store.formats import validate_task_name
from server.api.admin_gate import upload_limit
from server.api.audit import audit
from server.api.deps import RETRY_AFTER_STARTING, Admin, State
from server.api.errors import APIError

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _prompt_error(exc: PromptError) -> APIError:
    status = 413 if exc.reason == "too_large" else 422
    return APIError(status, str(exc), code=exc.reason)


def _check_name(task: str) -> None:
    try:
        validate_task_name(task)
    except PromptError as exc:
        raise _prompt_error(exc) from exc


def _store(state):
    if state.store is None:
        raise APIError(503, "server is starting", type="server_error", code="not_ready",
                       headers={"Retry-After": str(RETRY_AFTER_STARTING)})
    return state.store


def _check_writable(state, action: str) -> None:
    """409 ``no_prompt_dir`` when there is no prompt directory and memory-only tasks were not asked for."""
    s = state.settings
    if s.prompts is None and not s.memory_prompts:
        raise APIError(
            409, f"cannot {action} prompts: this server has no prompt directory, so an uploaded task would be lost "
            "on restart; expected the server started with --prompts DIR (uploads are written there), or with "
            "--memory-prompts to accept memory-only tasks that are lost on restart",
            code="no_prompt_dir",
        )


def _refusal(exc: Exception) -> tuple[str, int]:
    """(outcome, status) to audit for an exception leaving a route."""
    if isinstance(exc, APIError):
        return exc.code or exc.type, exc.status
    return "error", 500


@router.put("/prompts/{task}")
async def upload_prompt(task: str, request: Request, state: State, _: Admin,
                        file: UploadFile = File(...)) -> JSONResponse:
    """Create or replace ``task``'s soft prompt from an uploaded file.

    Returns 201 (created) or 200 (replaced / unchanged) with the prompt's metadata, ``action`` and ``persisted``
    (``true``: written into the prompt directory; ``false``: memory only, ``--memory-prompts``).

    Errors: 409 ``no_prompt_dir`` (no prompt directory and no ``--memory-prompts``), 413 ``too_large``, 422 with
    the :class:`~prompt_store.errors.PromptError` reason; nothing changes on any of them.
    """
    nbytes: int | None = None
    try:
        _check_writable(state, "upload")
        _check_name(task)
        limit = upload_limit(state.settings.max_prompt_bytes)  # the store applies the exact per-kind limits
        data = await file.read(limit + 1)
        nbytes = len(data)
        if len(data) > limit:
            state.metrics.prompt_load_errors.labels("too_large").inc()
            raise APIError(413, f"upload is larger than the limit of {limit} bytes", code="too_large")
        store = _store(state)
        try:
            prompt, action = await asyncio.get_running_loop().run_in_executor(
                state.store_executor, store.upload, task, file.filename or "", data)
        except PromptError as exc:
            state.metrics.prompt_load_errors.labels(exc.reason).inc()
            raise _prompt_error(exc) from exc
    except Exception as exc:
        outcome, status = _refusal(exc)
        audit(request, "upload", task=task, outcome=outcome, status=status, nbytes=nbytes)
        raise
    status = 201 if action == "created" else 200
    audit(request, "upload", task=task, outcome=action, status=status, version=prompt.version,
          sha256=prompt.sha256, nbytes=nbytes)
    body = {**prompt.to_dict(), "action": action, "persisted": store.directory is not None}
    return JSONResponse(body, status_code=status)


@router.get("/prompts")
async def list_prompts(request: Request, state: State, _: Admin) -> dict:
    """Metadata of every loaded prompt, plus total tensor bytes."""
    prompts = state.registry.list()
    audit(request, "list", task=None, outcome="listed", status=200)
    return {"prompts": [p.to_dict() for p in prompts], "total_bytes": state.registry.total_bytes()}


@router.get("/prompts/{task}")
async def get_prompt(task: str, request: Request, state: State, _: Admin) -> dict:
    """Metadata of one prompt; 404 ``task_not_found`` if unknown."""
    prompt = state.registry.get(task)
    if prompt is None:
        audit(request, "get", task=task, outcome="task_not_found", status=404)
        raise APIError(404, f"unknown task {task!r}", type="not_found_error", code="task_not_found")
    audit(request, "get", task=task, outcome="found", status=200, version=prompt.version, sha256=prompt.sha256)
    return prompt.to_dict()


@router.delete("/prompts/{task}")
async def delete_prompt(task: str, request: Request, state: State, _: Admin) -> dict:
    """Remove a prompt and its files; requests already admitted finish with the version they hold.

    Errors: 409 ``no_prompt_dir`` (as for uploads), 422 ``bad_name``, 404 ``task_not_found``.
    """
    try:
        _check_writable(state, "delete")
        _check_name(task)
        prompt = state.registry.get(task)
        if not await asyncio.get_running_loop().run_in_executor(state.store_executor, _store(state).delete, task):
            raise APIError(404, f"unknown task {task!r}", type="not_found_error", code="task_not_found")
    except Exception as exc:
        outcome, status = _refusal(exc)
        audit(request, "delete", task=task, outcome=outcome, status=status)
        raise
    audit(request, "delete", task=task, outcome="deleted", status=200,
          version=prompt.version if prompt is not None else None, sha256=prompt.sha256 if prompt is not None else None)
    return {"task": task, "deleted": True}
