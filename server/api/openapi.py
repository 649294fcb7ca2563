"""The OpenAPI document: every status each route returns, one error schema, and the bearer schemes.

FastAPI's generated document lists only 200 and 422 (with its own ``HTTPValidationError`` shape) for each route.
:func:`build_openapi` rewrites it from :data:`ROUTES`, the one table of what every route returns, so that

- each operation lists exactly the statuses in its entry; every 4xx/5xx refers to :class:`ErrorResponse` (the
  ``{"error": {...}}`` shape of :mod:`server.api.errors`); 429 and 503 document ``Retry-After``;
- success bodies have a schema (admin uploads, health/readiness, the OpenAI-compatible bodies), and the generation
  routes also offer ``text/event-stream`` for ``"stream": true``;
- ``components.securitySchemes`` holds ``adminToken`` (HTTP bearer, every ``/v1/admin`` operation) and ``apiKey``
  (HTTP bearer, the inference operations; enforced only when the server runs with ``--api-key``, so those
  operations also accept no credentials); the ``Authorization`` header parameters FastAPI derives from the
  dependencies are dropped, since the schemes describe them.

:func:`install_openapi` puts it on an app (and, with ``settings.docs``, the offline Swagger UI of
:mod:`server.api.docs`). ``tests/api/test_openapi.py`` checks that every route has an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from server.api.docs import install_swagger_ui
from server.api.schemas import TaskList


# ----------------------------------------------------------------------------------------------------- bodies
class ErrorDetail(BaseModel):
    """What went wrong: ``type`` is OpenAI's kind (``invalid_request_error``, ``authentication_error``,
    ``permission_error``, ``not_found_error``, ``server_error``), ``code`` a stable machine-readable reason,
    ``param`` the request field at fault (or null)."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(description="What was expected and what came.")
    type: str
    param: str | None = Field(description="The request field at fault, dotted (e.g. 'parameters.top_p'), or null.")
    code: str | None = Field(description="Stable reason, e.g. 'invalid_json', 'validation_error', 'overloaded'.")


class ErrorResponse(BaseModel):
    """The one error shape of every route (OpenAI's): ``{"error": {"message", "type", "param", "code"}}``."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class PromptInfo(BaseModel):
    """A loaded soft prompt's metadata (``SoftPrompt.to_dict``)."""

    task: str
    num_virtual_tokens: int
    hidden_size: int = Field(description="Row width: the model's hidden size (per-layer KV width for prefix tuning).")
    dtype: str
    sha256: str
    version: int = Field(description="1 for a task's first content, +1 on every change.")
    source: str = Field(description="File or directory it was loaded from, or 'upload' for in-memory uploads.")
    peft_type: str = Field(description="PROMPT_TUNING, P_TUNING, PREFIX_TUNING or RAW.")
    loaded_at: float = Field(description="When this content was registered, unix seconds.")
    nbytes: int = Field(description="Bytes of the prompt tensor.")


class PromptUploaded(PromptInfo):
    """The stored prompt after an upload."""

    action: str = Field(description="'created' (201), 'replaced' or 'unchanged' (an identical re-upload; 200).")
    persisted: bool = Field(description="Written to the prompt directory (false: --memory-prompts, lost on restart).")


class PromptList(BaseModel):
    prompts: list[PromptInfo]
    total_bytes: int = Field(description="Sum of the prompts' tensor bytes.")


class PromptDeleted(BaseModel):
    task: str
    deleted: bool


class HealthStatus(BaseModel):
    """Liveness."""

    status: str = Field(description="'ok', 'starting', or 'dead' (503) once the engine loop has died.")
    error: str | None = Field(None, description="Why the engine loop died (503 only).")


class ReadyStatus(BaseModel):
    """Readiness: 200 once the model is loaded, the engine runs and the first prompt scan is done."""

    ready: bool
    draining: bool = Field(description="True from the moment a shutdown starts draining (then 503).")
    model: str | None = Field(description="The base model's id (null while starting).")
    prompts: int = Field(description="Soft prompts loaded.")


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="Text (or chat-template) tokens; virtual tokens are not counted here.")
    completion_tokens: int
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")
    virtual_tokens: int = Field(description="The task's soft-prompt virtual tokens (0 for the base model).")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    """``POST /v1/completions`` without streaming."""

    id: str
    object: str = Field(description="'text_completion'.")
    created: int = Field(description="Unix seconds.")
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class ChatMessageOut(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions`` without streaming."""

    id: str
    object: str = Field(description="'chat.completion'.")
    created: int = Field(description="Unix seconds.")
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class GenerateStreamEvent(BaseModel):
    """The ``data`` of one Server-Sent Event of ``/v1/generate`` and ``/v1/tasks/{task}/generate``: a text delta
    (``text``, ``token_ids``), then a final event that also has ``finish_reason``, ``usage``, ``task`` and
    ``prompt_version``. An error after the stream started is an ``event: error`` whose data is the error shape."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    task: str | None = None
    prompt_version: int | None = None


class ModelCard(BaseModel):
    """The base model, or a task (then with its prompt's ``num_virtual_tokens``, ``version``, ...)."""

    id: str
    object: str
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = Field(description="'list'.")
    data: list[ModelCard]


# ----------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class RouteDoc:
    """What one operation returns.

    Attributes:
        statuses: every HTTP status it answers with, and when.
        bodies: success status -> pydantic model of its JSON body (None: keep FastAPI's response_model schema).
        security: "adminToken", "apiKey" (optional: enforced only with --api-key) or None.
        stream: 200 may also be ``text/event-stream`` (``"stream": true``): "native" (JSON events, see
            :class:`GenerateStreamEvent`) or "openai" (OpenAI chunks, then ``data: [DONE]``).
        media_type: the media type of the 200 body.
        retry_after: its 429 and 503 answers carry ``Retry-After`` (not /health and /ready, which are polled).
    """

    statuses: dict[int, str]
    bodies: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    security: str | None = None
    stream: str | None = None
    media_type: str = "application/json"
    retry_after: bool = True


_RETRY = {429, 503}
_BAD_BODY = "Invalid JSON (the message names line, column and character), or a body not sent as application/json"
_WRONG_LISTENER = "asked on the admin listener (--admin-port), which serves only admin and operations routes"
_GEN = {
    200: "Generated text (application/json), or Server-Sent Events (text/event-stream) when \"stream\": true.",
    400: f"{_BAD_BODY}; an input too long for the context, the KV cache or --max-input-tokens.",
    401: "--api-key is set and 'Authorization: Bearer <key>' is missing or wrong.",
    404: f"Unknown task or model; or {_WRONG_LISTENER}.",
    413: "Request body larger than --max-request-bytes.",
    422: "Validation failed: a field's type or range, an unknown field, or an empty input.",
    429: "The waiting queue is full (--max-waiting / --max-waiting-tokens); retry after Retry-After seconds.",
    503: "Starting, draining for shutdown, or the engine loop died; retry after Retry-After seconds.",
}
_CHAT = {**_GEN, 400: _GEN[400].rstrip(".") + "; or messages the chat template refuses."}
_ADMIN_AUTH = {
    401: "'Authorization: Bearer <admin token>' missing or wrong.",
    403: "Admin is disabled: no --admin-token configured.",
    404: "Unknown task; or admin is served on a separate --admin-port and was asked on the main port.",
}
_ADMIN_503 = "Starting (the prompt store is not up yet); retry after Retry-After seconds."

#: Every operation of the app: (METHOD, path template) -> what it returns. A route missing here fails
#: tests/api/test_openapi.py.
ROUTES: dict[tuple[str, str], RouteDoc] = {
    ("POST", "/v1/tasks/{task}/generate"): RouteDoc(_GEN, {200: None}, "apiKey", stream="native"),
    ("POST", "/v1/generate"): RouteDoc(_GEN, {200: None}, "apiKey", stream="native"),
    ("POST", "/v1/completions"): RouteDoc(_GEN, {200: Completion}, "apiKey", stream="openai"),
    ("POST", "/v1/chat/completions"): RouteDoc(_CHAT, {200: ChatCompletion}, "apiKey", stream="openai"),
    ("GET", "/v1/tasks"): RouteDoc({200: "The servable tasks, sorted by name.", 401: _GEN[401],
                                    404: f"Only when {_WRONG_LISTENER}."}, {200: TaskList}, "apiKey"),
    ("GET", "/v1/models"): RouteDoc({200: "The base model, then every servable task.", 401: _GEN[401],
                                     404: f"Only when {_WRONG_LISTENER}.", 503: _GEN[503]}, {200: ModelList},
                                    "apiKey"),
    ("PUT", "/v1/admin/prompts/{task}"): RouteDoc({
        200: "Replaced (or an identical re-upload): the stored prompt.",
        201: "Created: the stored prompt.",
        400: "A malformed multipart/form-data body.",
        **_ADMIN_AUTH,
        409: "No prompt directory (--prompts) to store uploads in, and --memory-prompts is off.",
        413: "Upload larger than the limit (--max-prompt-bytes plus archive slack).",
        422: "Invalid task name, missing 'file' field, or a file that is not a valid soft prompt for this model.",
        503: _ADMIN_503,
    }, {200: PromptUploaded, 201: PromptUploaded}, "adminToken"),
    ("GET", "/v1/admin/prompts"): RouteDoc({200: "Every loaded prompt's metadata.", **_ADMIN_AUTH},
                                           {200: PromptList}, "adminToken"),
    ("GET", "/v1/admin/prompts/{task}"): RouteDoc({200: "The prompt's metadata.", **_ADMIN_AUTH},
                                                  {200: PromptInfo}, "adminToken"),
    ("DELETE", "/v1/admin/prompts/{task}"): RouteDoc({
        200: "Deleted (requests already admitted finish on the version they hold).",
        **_ADMIN_AUTH,
        409: "No prompt directory to delete from.",
        422: "Invalid task name.",
        503: _ADMIN_503,
    }, {200: PromptDeleted}, "adminToken"),
    ("GET", "/health"): RouteDoc({200: "Alive (or still starting).", 503: "The engine loop has died."},
                                 {200: HealthStatus, 503: HealthStatus}, retry_after=False),
    ("GET", "/ready"): RouteDoc({200: "Ready to serve.", 503: "Starting, draining for shutdown, or the engine died."},
                                {200: ReadyStatus, 503: ReadyStatus}, retry_after=False),
    ("GET", "/metrics"): RouteDoc({200: "Prometheus text exposition."}, media_type="text/plain"),
}

_MODELS: list[type[BaseModel]] = [ErrorResponse, PromptInfo, PromptUploaded, PromptList, PromptDeleted, HealthStatus,
                                  ReadyStatus, Completion, ChatCompletion, ModelList, GenerateStreamEvent]

SECURITY_SCHEMES = {
    "adminToken": {
        "type": "http", "scheme": "bearer",
        "description": "The admin token (--admin-token / SOFTPROMPT_ADMIN_TOKEN); admin is off (403) without one.",
    },
    "apiKey": {
        "type": "http", "scheme": "bearer",
        "description": "The inference API key (--api-key / SOFTPROMPT_API_KEY), as vLLM's --api-key. Enforced "
        "only when the server is started with one; otherwise the inference routes are open.",
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _sse_event(kind: str) -> dict[str, Any]:
    """The schema of one Server-Sent Event (``{"event", "data", "id", "retry"}``, OpenAPI 3.1 style: ``schema``
    describes each event)."""
    if kind == "native":
        data = {"type": "string", "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_ref(GenerateStreamEvent), _ref(ErrorResponse)]},
                "description": "JSON: a GenerateStreamEvent, or the error shape for 'event: error'."}
    else:
        data = {"type": "string", "description": "JSON: an OpenAI chunk (or the error shape), then '[DONE]'."}
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "data": data, "id": {"type": "string"}, "retry": {"type": "integer"}}}


#: Every operation may also answer this (a server fault; the traceback stays in the server log).
_INTERNAL = {500: "A server fault (code internal_error); the details are in the server log."}


def _responses(doc: RouteDoc, generated: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, description in sorted({**doc.statuses, **_INTERNAL}.items()):
        resp: dict[str, Any] = {"description": description}
        if status < 400:
            if doc.media_type != "application/json":
                content = {doc.media_type: {"schema": {"type": "string"}}}
            else:
                model = doc.bodies.get(status)
                schema = _ref(model) if model is not None else (
                    generated.get(str(status), {}).get("content", {}).get("application/json", {}).get("schema", {}))
                content = {"application/json": {"schema": schema}}
            if doc.stream and status == 200:
                content["text/event-stream"] = {"schema": _sse_event(doc.stream)}
        else:
            model = doc.bodies.get(status, ErrorResponse)
            content = {"application/json": {"schema": _ref(model)}}
            if status in _RETRY and doc.retry_after:
                resp["headers"] = {"Retry-After": {
                    "description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 0}}}
        resp["content"] = content
        out[str(status)] = resp
    return out


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, rewritten from :data:`ROUTES` (see the module docstring).

    Raises:
        KeyError: an operation of the app has no entry in :data:`ROUTES` (a new route must be documented).
    """
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                         openapi_version=app.openapi_version)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas.update(defs.get("$defs", {}))
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            doc = ROUTES.get((method.upper(), path))
            if doc is None:
                raise KeyError(f"{method.upper()} {path} has no entry in server.api.openapi.ROUTES")
            op["responses"] = _responses(doc, op.get("responses", {}))
            params = [p for p in op.get("parameters", [])
                      if not (p.get("in") == "header" and p.get("name", "").lower() == "authorization")]
            if params:
                op["parameters"] = params
            else:
                op.pop("parameters", None)
            if doc.security == "adminToken":
                op["security"] = [{"adminToken": []}]
            elif doc.security == "apiKey":
                op["security"] = [{"apiKey": []}, {}]
                op["description"] = (op.get("description", "") + "\n\nThe API key is enforced only when the "
                                     "server runs with --api-key.").strip()
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`build_openapi`'s document at the app's ``openapi_url`` (built once, on first use) and, when the
    settings (``app.state.sp.settings``) have ``docs`` on, the offline Swagger UI at ``/docs``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if app.state.sp.settings.docs and app.openapi_url:
        install_swagger_ui(app)
