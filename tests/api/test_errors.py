"""One error shape everywhere (server/api/errors.py): invalid JSON is a 400 that says where, bodies that are not
JSON objects are named as such, and 404/405/413/422/401/500 all answer ``{"error": {...}}`` and nothing else."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from srv_helpers import make_settings

from server.api.errors import describe_json_error
from server.app import create_app

KEYS = {"message", "type", "param", "code"}


def error_of(resp, status: int) -> dict:
    """The inner error object, after checking the status and that the body is exactly the error shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == KEYS, body
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/tasks/t/generate", "/v1/completions", "/v1/chat/completions"])
def test_invalid_json_is_400_naming_line_column_and_char(client, path):
    err = error_of(client.post(path, content='{"inputs": "a" "b"}', headers={"content-type": "application/json"}),
                   400)
    assert err == {"message": "invalid JSON in the request body at line 1, column 16 (char 15): Expecting ',' "
                   "delimiter", "type": "invalid_request_error", "param": "body", "code": "invalid_json"}


def test_invalid_json_position_on_a_later_line(client):
    doc = '{\n  "inputs": "a",\n  "stream": tru\n}'
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(doc)
    err = error_of(client.post("/v1/generate", content=doc, headers={"content-type": "application/json"}), 400)
    assert (ref.value.lineno, ref.value.colno, ref.value.pos) == (3, 13, 31)
    assert err["message"] == "invalid JSON in the request body at line 3, column 13 (char 31): Expecting value"


def test_describe_json_error_counts_like_the_json_module():
    doc = 'x\n\n  {'
    for pos in (0, 1, 2, 4, 5):
        e = json.JSONDecodeError("m", doc, pos)
        assert describe_json_error(doc, pos, "m") == (
            f"invalid JSON in the request body at line {e.lineno}, column {e.colno} (char {pos}): m")
    assert describe_json_error(b'{"a"\n:', 5, "r") == (
        "invalid JSON in the request body at line 2, column 1 (char 5): r")


def test_bytes_that_are_not_utf8_are_invalid_json(client):
    err = error_of(client.post("/v1/generate", content=b"\xff\xfe", headers={"content-type": "application/json"}),
                   400)
    assert err["code"] == "invalid_json" and err["message"].startswith("invalid JSON in the request body at line 1")


def test_invalid_utf8_inside_a_string_is_invalid_json_naming_the_byte(client):
    body = b'{"inputs": "caf\xe9"}'  # latin-1, not UTF-8
    err = error_of(client.post("/v1/generate", content=body, headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and err["param"] == "body"
    assert "not UTF-8 at byte 15" in err["message"]


@pytest.mark.parametrize(("ctype", "got"), [("text/plain", "Content-Type 'text/plain'"), (None, "no Content-Type")])
def test_body_not_sent_as_json_is_400(client, ctype, got):
    headers = {"content-type": ctype} if ctype else {}
    err = error_of(client.post("/v1/generate", content='{"inputs": "x"}', headers=headers), 400)
    assert err == {"message": f"request body must be JSON sent with Content-Type: application/json; got {got}",
                   "type": "invalid_request_error", "param": "body", "code": "invalid_content_type"}


@pytest.mark.parametrize(("body", "got"), [("[]", "an array []"), ("null", "null"), ('"x"', 'a string "x"'),
                                           ("3", "a number 3")])
def test_body_that_is_not_an_object_is_422(client, body, got):
    err = error_of(client.post("/v1/generate", content=body, headers={"content-type": "application/json"}), 422)
    assert err == {"message": f"request body must be a JSON object; got {got}", "type": "invalid_request_error",
                   "param": "body", "code": "validation_error"}


def test_missing_body_is_422(client):
    err = error_of(client.post("/v1/generate"), 422)
    assert (err["code"], err["param"]) == ("missing_body", "body")
    assert err["message"] == "request body is required: a JSON object sent with Content-Type: application/json"


def test_field_errors_name_the_field_and_carry_no_detail_array(client):
    err = error_of(client.post("/v1/generate", json={"inputs": 3, "parameters": {"top_p": 0}}), 422)
    assert err["param"] == "inputs" and err["code"] == "validation_error"
    assert err["message"].startswith("inputs: Input should be a valid string (got 3); parameters.top_p: ")


def test_unknown_path_and_wrong_method(client):
    err = error_of(client.get("/v1/nope"), 404)
    assert err == {"message": "no route for GET /v1/nope: see /docs or /openapi.json for the API",
                   "type": "not_found_error", "param": None, "code": "not_found"}
    resp = client.get("/v1/generate")
    err = error_of(resp, 405)
    assert resp.headers["allow"] == "POST"
    assert err == {"message": "method GET is not allowed on /v1/generate; allowed: POST",
                   "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}


def test_admin_errors_use_the_shape(client, admin_headers):
    assert error_of(client.get("/v1/admin/prompts"), 401)["type"] == "authentication_error"
    big = client.put("/v1/admin/prompts/x", content=b"", headers={**admin_headers, "content-length": str(10**12)})
    assert error_of(big, 413)["code"] == "too_large"
    assert error_of(client.delete("/v1/admin/prompts/Bad*Name", headers=admin_headers), 422)["code"] == "bad_name"
    assert error_of(client.get("/v1/admin/prompts/none", headers=admin_headers), 404)["code"] == "task_not_found"


def test_unhandled_exception_is_500_in_the_shape_without_internals(tiny_loaded, tmp_path):
    app = create_app(make_settings(tmp_path, watch=False), loaded=tiny_loaded)

    @app.get("/boom", include_in_schema=False)
    async def boom():
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        err = error_of(c.get("/boom"), 500)
    assert err == {"message": "internal server error: the server log has the details", "type": "server_error",
                   "param": None, "code": "internal_error"}
