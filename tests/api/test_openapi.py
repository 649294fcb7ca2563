"""The OpenAPI document (server/api/openapi.py) and the offline Swagger UI (server/api/docs.py)."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from srv_helpers import rand_tensor, raw_bytes

from server.api.openapi import ROUTES, PromptDeleted, PromptInfo, PromptList, PromptUploaded

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
INFERENCE = ["/v1/tasks/{task}/generate", "/v1/generate", "/v1/completions", "/v1/chat/completions"]
#: The statuses the issue asks each operation to document, exactly.
EXPECTED = {  # every operation also lists 500 (a server fault)
    **{("POST", p): {200, 400, 401, 404, 413, 422, 429, 500, 503} for p in INFERENCE},
    ("GET", "/v1/tasks"): {200, 401, 404, 500},
    ("GET", "/v1/models"): {200, 401, 404, 500, 503},
    ("PUT", "/v1/admin/prompts/{task}"): {200, 201, 400, 401, 403, 404, 409, 413, 422, 500, 503},
    ("GET", "/v1/admin/prompts"): {200, 401, 403, 404, 500},
    ("GET", "/v1/admin/prompts/{task}"): {200, 401, 403, 404, 500},
    ("DELETE", "/v1/admin/prompts/{task}"): {200, 401, 403, 404, 409, 422, 500, 503},
    ("GET", "/health"): {200, 500, 503},
    ("GET", "/ready"): {200, 500, 503},
    ("GET", "/metrics"): {200, 500},
}


@pytest.fixture
def doc(client) -> dict:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def _operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def test_every_route_of_the_app_has_an_entry_and_no_entry_is_stale(client):
    # FastAPI 0.165 keeps included routers as such in app.routes; iter_route_contexts walks into them.
    routes = {(m, ctx.path_format) for ctx in iter_route_contexts(client.app.routes)
              if isinstance(ctx.original_route, APIRoute) and ctx.original_route.include_in_schema
              for m in ctx.methods}
    assert len(routes) == 13
    assert routes == set(ROUTES)


def test_each_operation_lists_exactly_its_statuses(doc):
    got = {(m, p): {int(s) for s in op["responses"]} for m, p, op in _operations(doc)}
    assert got == EXPECTED


def test_errors_use_error_response_and_fastapi_shapes_are_gone(doc):
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorResponse"]["additionalProperties"] is False  # no `detail` beside `error`
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    for method, path, op in _operations(doc):
        for status, resp in op["responses"].items():
            if int(status) >= 400 and path not in ("/health", "/ready"):
                assert resp["content"] == {"application/json": {"schema": ERROR_REF}}, (method, path, status)
    assert "HTTPValidationError" not in str(doc)


def test_retry_after_is_documented_on_429_and_503(doc):
    for method, path, op in _operations(doc):
        for status in ("429", "503"):
            if status in op["responses"] and path not in ("/health", "/ready"):
                header = op["responses"][status]["headers"]["Retry-After"]
                assert header["schema"] == {"type": "integer", "minimum": 0}, (method, path)
    assert "headers" not in doc["paths"]["/ready"]["get"]["responses"]["503"]


def test_bearer_schemes_and_security_per_operation(doc):
    schemes = doc["components"]["securitySchemes"]
    assert {k: (v["type"], v["scheme"]) for k, v in schemes.items()} == {
        "adminToken": ("http", "bearer"), "apiKey": ("http", "bearer")}
    for method, path, op in _operations(doc):
        if path.startswith("/v1/admin"):
            assert op["security"] == [{"adminToken": []}], (method, path)
        elif path.startswith("/v1/"):
            assert op["security"] == [{"apiKey": []}, {}], (method, path)  # {}: open unless --api-key is set
            assert "--api-key" in op["description"]
        else:
            assert "security" not in op, (method, path)
        names = [p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"]
        assert "authorization" not in names, (method, path)


def test_success_bodies_and_media_types(doc):
    paths = doc["paths"]
    put = paths["/v1/admin/prompts/{task}"]["put"]["responses"]
    for status in ("200", "201"):
        assert put[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PromptUploaded"}
    gen = paths["/v1/generate"]["post"]["responses"]["200"]["content"]
    assert gen["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateResponse"}
    assert gen["text/event-stream"]["schema"]["properties"]["data"]["contentMediaType"] == "application/json"
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert set(chat) == {"application/json", "text/event-stream"}
    assert paths["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    for path, name in (("/health", "HealthStatus"), ("/ready", "ReadyStatus")):
        for status in ("200", "503"):
            schema = paths[path]["get"]["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{name}"}


def test_real_admin_bodies_have_the_documented_fields(client, admin_headers):
    data = raw_bytes(rand_tensor(3))
    created = client.put("/v1/admin/prompts/doc-task", headers=admin_headers,
                         files={"file": ("p.safetensors", data)})
    assert created.status_code == 201
    assert set(created.json()) == set(PromptUploaded.model_fields) and created.json()["action"] == "created"
    again = client.put("/v1/admin/prompts/doc-task", headers=admin_headers, files={"file": ("p.safetensors", data)})
    assert again.status_code == 200 and again.json()["action"] == "unchanged"
    one = client.get("/v1/admin/prompts/doc-task", headers=admin_headers).json()
    assert set(one) == set(PromptInfo.model_fields) and one["num_virtual_tokens"] == 3
    listing = client.get("/v1/admin/prompts", headers=admin_headers).json()
    assert set(listing) == set(PromptList.model_fields) and [p["task"] for p in listing["prompts"]] == ["doc-task"]
    gone = client.delete("/v1/admin/prompts/doc-task", headers=admin_headers).json()
    assert gone == PromptDeleted(task="doc-task", deleted=True).model_dump()


def test_health_and_ready_bodies_match_their_models(client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["model"] == "tiny-llama" and ready["prompts"] == 0


def test_docs_page_is_offline_and_its_assets_are_served(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", page.text), "the page must not load anything from the network"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["/docs/static/favicon-32x32.png", "/docs/static/swagger-ui-bundle.js",
                              "/docs/static/swagger-ui.css"]
    for url in assets:
        resp = client.get(url)
        assert resp.status_code == 200 and len(resp.content) > 500, url
    assert "url: '/openapi.json'" in page.text
    assert client.get("/redoc").status_code == 404


def test_docs_off_turns_off_docs_and_the_document(make_client):
    c = make_client(docs=False)
    for url in ("/docs", "/openapi.json", "/docs/static/swagger-ui.css", "/redoc"):
        assert c.get(url).status_code == 404, url
    assert c.get("/health").status_code == 200
