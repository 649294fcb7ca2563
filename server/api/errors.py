"""One error shape for every route, the OpenAI one: ``{"error": {"message", "type", "param", "code"}}``.

Client mistakes get a 4xx that names what was expected and what came; only server faults are 5xx. Every handler
here answers with exactly that shape (no FastAPI ``detail`` array beside it):

- :class:`APIError` raised anywhere: its own status, message, ``code`` and ``param``;
- a body that is not valid JSON: 400 ``invalid_json``, naming the line, column and character of the fault;
- a body sent without a JSON content type: 400 ``invalid_content_type``;
- a missing body: 422 ``missing_body``; a body that is not a JSON object, and any other failed validation: 422
  ``validation_error``;
- unknown path (404 ``not_found``), wrong method (405 ``method_not_allowed``, with ``Allow``) and other Starlette
  HTTP errors: their status, with a message naming the method and path;
- an unhandled exception: 500 ``internal_error`` (the traceback goes to the log, not to the client).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

#: ``code`` of the error body for Starlette's own HTTP errors, by status.
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class APIError(Exception):
    """An error with its HTTP status. ``type`` follows OpenAI's names (``invalid_request_error``, ...)."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
        param: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    """The error shape: ``{"error": {"message", "type", "param", "code"}}`` (see :class:`ErrorResponse`)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


#: How a decoded JSON value's Python type is named in messages.
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_json(value: object, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_json_error(doc: object, pos: int, reason: str) -> str:
    """``"invalid JSON in the request body at line L, column C (char P): <reason>"`` for a decode failure at
    character ``pos`` (0-based) of ``doc`` (the decoded body text; line and column are 1-based, as :mod:`json`
    counts them)."""
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes | bytearray) else doc
    if not isinstance(text, str):
        return f"invalid JSON in the request body at char {pos}: {reason}"
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"invalid JSON in the request body at line {line}, column {column} (char {pos}): {reason}"


def _json_error(exc: RequestValidationError) -> APIError | None:
    """The 400 for FastAPI's ``json_invalid`` error (loc ``("body", <char position>)``, ``ctx.error`` the reason)."""
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
            reason = str((err.get("ctx") or {}).get("error") or "malformed JSON")
            return APIError(400, describe_json_error(exc.body, pos, reason), code="invalid_json", param="body")
    return None


def _body_error(exc: RequestValidationError, request: Request) -> APIError | None:
    """A missing body (422) or one not sent as JSON (400), named as such rather than as a field error."""
    errors = exc.errors()
    if len(errors) != 1 or tuple(errors[0].get("loc", ())) != ("body",):
        return None
    err = errors[0]
    if err.get("type") == "missing":
        return APIError(422, "request body is required: a JSON object sent with Content-Type: application/json",
                        code="missing_body", param="body")
    if isinstance(err.get("input"), bytes | bytearray):  # FastAPI hands the raw bytes on when it did not parse JSON
        ctype = request.headers.get("content-type")
        got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
        return APIError(400, f"request body must be JSON sent with Content-Type: application/json; got {got}",
                        code="invalid_content_type", param="body")
    if err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        value = err.get("input")
        got = "null" if value is None else f"{_JSON_TYPES.get(type(value), 'a value')} {_short_json(value)}"
        return APIError(422, f"request body must be a JSON object; got {got}", code="validation_error",
                        param="body")
    return None


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """``(message, param)`` for pydantic errors: ``"field.path: what was wrong (got <value>)"`` for each, joined by
    ``"; "``; ``param`` is the first field's dotted path (``"body"`` for the body as a whole)."""
    parts, first = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        first = first or field
        got = err.get("input")
        got_s = "" if isinstance(got, dict) or got is None else f" (got {_short(got)})"
        parts.append(f"{field}: {err.get('msg')}{got_s}")
    return "; ".join(parts) or "invalid request", first


def error_response(exc: APIError) -> JSONResponse:
    """``exc`` as a response in the one error shape, with its status and headers (ASGI middleware use it too)."""
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                        headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so validation errors, HTTP errors, :class:`APIError` and unhandled exceptions all answer
    with the error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        special = _json_error(exc) or _body_error(exc, request)
        if special is not None:
            return error_response(special)
        message, param = describe_validation(exc)
        return JSONResponse(error_body(message, "invalid_request_error", "validation_error", param),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        where = f"{request.method} {request.url.path}"
        if status == 404:
            message = f"no route for {where}: see /docs or /openapi.json for the API"
        elif status == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or "?"
            message = f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        elif isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body" for bad UTF-8
            bad = exc.__cause__
            return error_response(APIError(400, f"invalid JSON in the request body: not UTF-8 at byte {bad.start} "
                                           f"({bad.reason})", code="invalid_json", param="body"))
        else:
            cause = f": {exc.__cause__}" if exc.__cause__ is not None and status == 400 else ""
            message = f"{exc.detail} ({where}){cause}"
        kind = "not_found_error" if status == 404 else "server_error" if status >= 500 else "invalid_request_error"
        return JSONResponse(error_body(message, kind, _HTTP_CODES.get(status)), status_code=status,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error: the server log has the details", "server_error",
                                       "internal_error"), status_code=500)
