"""``/docs``: Swagger UI served from the ``swagger-ui-bundle`` package, so it works with no network.

FastAPI's own ``/docs`` and ``/redoc`` load their JavaScript and CSS from a CDN (blank offline); the app turns
both off and :func:`install_swagger_ui` serves Swagger UI with the package's files under ``/docs/static``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

#: URL prefix of the Swagger UI files.
STATIC_PREFIX = "/docs/static"
#: The files of the swagger-ui-bundle package the page loads.
ASSETS = {"js": "swagger-ui-bundle.js", "css": "swagger-ui.css", "favicon": "favicon-32x32.png"}


def install_swagger_ui(app: FastAPI, path: str = "/docs") -> None:
    """Serve Swagger UI for ``app.openapi_url`` at ``path``, with its assets mounted under :data:`STATIC_PREFIX`
    from the installed ``swagger_ui_bundle`` package (no URL outside the server is referenced).

    Raises:
        ValueError: the app has no ``openapi_url`` (the page would have no document to show).
    """
    from swagger_ui_bundle import swagger_ui_path

    if not app.openapi_url:
        raise ValueError("Swagger UI needs the OpenAPI document: the app has openapi_url=None")
    app.mount(STATIC_PREFIX, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-static")
    openapi_url = app.openapi_url

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_PREFIX}/{ASSETS['js']}",
            swagger_css_url=f"{root}{STATIC_PREFIX}/{ASSETS['css']}",
            swagger_favicon_url=f"{root}{STATIC_PREFIX}/{ASSETS['favicon']}",
        )

    app.add_api_route(path, swagger_ui, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
