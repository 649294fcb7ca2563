"""One error shape for every route, the OpenAI one: ``{"error": {"message", "type", "param", "code"}}``.

Client mistakes get a 4xx that names what was expected and what came; only server faults are 5xx.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        first = first or field
        got = err.get("input")
        got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        parts.append(f"{field}: {err.get('msg')}{got_s}")
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so validation errors, HTTP errors and :class:`APIError` all use the error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        body = error_body(message, "invalid_request_error", "validation_error", param)
        body["detail"] = jsonable_errors(exc)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind, None), status_code=exc.status_code, headers=exc.headers
        )


def jsonable_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for e in exc.errors():
        out.append({"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")})
    return out
