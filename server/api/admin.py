"""Admin routes for soft prompts (``Authorization: Bearer <token>`` on every one).

- ``PUT /v1/admin/prompts/{task}``: multipart upload in form field ``file``; its kind is told by its filename:
  ``.safetensors`` (one 2-D tensor) or ``.zip`` / ``.tar.gz`` holding a PEFT adapter directory. Validated before
  anything changes, written atomically into the prompt directory, servable when the response returns. 201 on
  create, 200 on replace (or an identical re-upload).
- ``GET /v1/admin/prompts``, ``GET /v1/admin/prompts/{task}``, ``DELETE /v1/admin/prompts/{task}``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse

from prompt_store.errors import PromptError
from prompt_store.formats import validate_task_name
from server.api.admin_gate import upload_limit
from server.api.deps import Admin, State
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
        raise APIError(503, "server is starting", type="server_error", code="not_ready")
    return state.store


@router.put("/prompts/{task}")
async def upload_prompt(task: str, state: State, _: Admin, file: UploadFile = File(...)) -> JSONResponse:
    """Create or replace ``task``'s soft prompt from an uploaded file."""
    _check_name(task)
    limit = upload_limit(state.settings.max_prompt_bytes)  # the store applies the exact per-kind limits
    data = await file.read(limit + 1)
    if len(data) > limit:
        state.metrics.prompt_load_errors.labels("too_large").inc()
        raise APIError(413, f"upload is larger than the limit of {limit} bytes", code="too_large")
    try:
        prompt, action = await asyncio.to_thread(_store(state).upload, task, file.filename or "", data)
    except PromptError as exc:
        state.metrics.prompt_load_errors.labels(exc.reason).inc()
        raise _prompt_error(exc) from exc
    return JSONResponse({**prompt.to_dict(), "action": action}, status_code=201 if action == "created" else 200)


@router.get("/prompts")
async def list_prompts(state: State, _: Admin) -> dict:
    """Metadata of every loaded prompt, plus total tensor bytes."""
    prompts = state.registry.list()
    return {"prompts": [p.to_dict() for p in prompts], "total_bytes": state.registry.total_bytes()}


@router.get("/prompts/{task}")
async def get_prompt(task: str, state: State, _: Admin) -> dict:
    """Metadata of one prompt; 404 if unknown."""
    prompt = state.registry.get(task)
    if prompt is None:
        raise APIError(404, f"unknown task {task!r}", type="not_found_error", code="task_not_found")
    return prompt.to_dict()


@router.delete("/prompts/{task}")
async def delete_prompt(task: str, state: State, _: Admin) -> dict:
    """Remove a prompt and its files; requests already admitted finish with the version they hold."""
    _check_name(task)
    if not await asyncio.to_thread(_store(state).delete, task):
        raise APIError(404, f"unknown task {task!r}", type="not_found_error", code="task_not_found")
    return {"task": task, "deleted": True}
