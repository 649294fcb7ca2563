"""Durability (issue 10): uploads refused without a prompt directory (409) unless memory-only is asked for, prompt
versions kept across restarts, plain file modes for what the server and tools write, and the admin audit log."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from srv_helpers import rand_tensor, raw_bytes

from server.app import create_app

URL = "/v1/admin/prompts"


def put(client, task: str, data: bytes, headers, filename: str = "p.safetensors"):
    return client.put(f"{URL}/{task}", headers=headers, files={"file": (filename, data)})


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in sorted(directory.rglob("*"))}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------------------------------- no prompt directory
def test_uploads_and_deletes_without_a_prompt_dir_are_409_and_change_nothing(make_client, admin_headers):
    client = make_client(prompts=None)
    r = put(client, "qa", raw_bytes(rand_tensor(3)), admin_headers)
    assert r.status_code == 409
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "no_prompt_dir", None)
    assert "--prompts DIR" in err["message"] and "--memory-prompts" in err["message"]
    assert "lost on restart" in err["message"]
    assert set(r.json()) == {"error"}
    r = client.delete(f"{URL}/qa", headers=admin_headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_prompt_dir"
    assert client.get("/v1/tasks").json() == {"tasks": []}
    assert client.get(URL, headers=admin_headers).json() == {"prompts": [], "total_bytes": 0}
    assert client.post("/v1/tasks/qa/generate", json={"inputs": "hi"}).status_code == 404


def test_memory_prompts_accepts_uploads_and_says_they_are_not_persisted(make_client, admin_headers):
    client = make_client(prompts=None, memory_prompts=True)
    r = put(client, "qa", raw_bytes(rand_tensor(3)), admin_headers)
    assert r.status_code == 201
    body = r.json()
    assert (body["action"], body["persisted"], body["version"], body["source"]) == ("created", False, 1, "upload")
    gen = client.post("/v1/tasks/qa/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert gen.status_code == 200 and gen.json()["prompt_version"] == 1
    assert client.delete(f"{URL}/qa", headers=admin_headers).json() == {"task": "qa", "deleted": True}


def test_uploads_with_a_prompt_dir_are_persisted(client, admin_headers, prompts_dir):
    r = put(client, "qa", raw_bytes(rand_tensor(3)), admin_headers)
    assert r.status_code == 201 and r.json()["persisted"] is True
    assert r.json()["source"] == str(prompts_dir.resolve() / "qa.safetensors")
    r = put(client, "qa", raw_bytes(rand_tensor(3)), admin_headers)
    assert (r.status_code, r.json()["action"], r.json()["persisted"]) == (200, "unchanged", True)


# ------------------------------------------------------------------------------------------- versions
def test_versions_survive_a_restart(tiny_loaded, make_client, admin_headers, prompts_dir):
    first = make_client()
    for seed in (1, 2, 3):
        r = put(first, "qa", raw_bytes(rand_tensor(3, seed=seed)), admin_headers)
        assert r.json()["version"] == seed
    assert put(first, "gone", raw_bytes(rand_tensor(2, seed=9)), admin_headers).json()["version"] == 1
    assert first.delete(f"{URL}/gone", headers=admin_headers).status_code == 200
    settings = first.app.state.sp.settings
    first.app.state.sp.stop()
    with TestClient(create_app(settings, loaded=tiny_loaded)) as second:
        assert second.get("/v1/tasks").json()["tasks"] == [
            {"task": "qa", "num_virtual_tokens": 3, "version": 3, "peft_type": "RAW", "nbytes": 3 * 64 * 4}]
        gen = second.post("/v1/tasks/qa/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert gen.json()["prompt_version"] == 3
        # the deleted task comes back with a new version, even with the same bytes
        assert put(second, "gone", raw_bytes(rand_tensor(2, seed=9)), admin_headers).json()["version"] == 2
        assert put(second, "qa", raw_bytes(rand_tensor(3, seed=4)), admin_headers).json()["version"] == 4


def test_corrupt_version_book_is_counted_and_the_server_starts(make_client, prompts_dir):
    from prometheus_client.parser import text_string_to_metric_families

    (prompts_dir / "qa.safetensors").write_bytes(raw_bytes(rand_tensor(3)))
    (prompts_dir / ".versions.json").write_text("{oops")
    client = make_client()
    assert client.get("/ready").json()["ready"] is True
    assert client.get("/v1/tasks").json()["tasks"][0]["version"] == 1
    samples = {s.labels.get("reason"): s.value for fam in text_string_to_metric_families(client.get("/metrics").text)
               if fam.name == "softprompt_prompt_load_errors" for s in fam.samples if s.name.endswith("_total")}
    assert samples == {"bad_version_book": 1.0}
    assert json.loads((prompts_dir / ".versions.json").read_text())["tasks"]["qa"]["version"] == 1  # rewritten


# ------------------------------------------------------------------------------------------- file modes
def test_upload_and_version_book_are_0644(make_client, admin_headers, prompts_dir, umask_022):
    client = make_client()
    assert put(client, "qa", raw_bytes(rand_tensor(3)), admin_headers).status_code == 201
    assert modes(prompts_dir) == {".versions.json": 0o644, "qa.safetensors": 0o644}


def test_model_cache_is_0644(tmp_path, tiny_loaded, monkeypatch, umask_022):
    """convert_gguf's cache, with transformers' GGUF loading replaced by the tiny model (the conversion of the
    real GGUF takes about 40 s; its writing is what this checks)."""
    import transformers

    from server.model_loader import convert_gguf

    gguf = tmp_path / "src" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_loaded.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_loaded.model)
    out = convert_gguf(gguf, tmp_path / "cache")
    got = modes(tmp_path / "cache")
    assert got.pop("models") == 0o755 and got.pop(f"models/{out.name}") == 0o755
    assert "model.safetensors" in {Path(k).name for k in got} and "config.json" in {Path(k).name for k in got}
    assert set(got.values()) == {0o644}, got
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64


def test_plain_modes_follow_the_umask(tmp_path):
    from prompt_store.diskio import apply_plain_modes, current_umask, plain_dir_mode, plain_file_mode

    old = os.umask(0o027)
    try:
        assert (current_umask(), plain_file_mode(), plain_dir_mode()) == (0o027, 0o640, 0o750)
        d = tmp_path / "d"
        d.mkdir(mode=0o700)
        (d / "f").write_bytes(b"x")
        os.chmod(d / "f", 0o600)
        apply_plain_modes(d)
        assert modes(tmp_path) == {"d": 0o750, "d/f": 0o640}
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------- audit log
def audit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "softprompt.audit"]


def test_every_admin_action_is_audited_without_the_token(client, admin_headers, caplog):
    data = raw_bytes(rand_tensor(3, seed=5))
    with caplog.at_level(logging.INFO, logger="softprompt.audit"):
        created = put(client, "qa", data, admin_headers).json()
        put(client, "qa", data, admin_headers)
        put(client, "..x", data, admin_headers)
        put(client, "qa", raw_bytes(torch.randn(3, 65)), admin_headers)
        client.get(URL, headers=admin_headers)
        client.get(f"{URL}/qa", headers=admin_headers)
        client.get(f"{URL}/nope", headers=admin_headers)
        client.delete(f"{URL}/qa", headers=admin_headers)
        client.delete(f"{URL}/qa", headers=admin_headers)
    sha = created["sha256"][:12]
    n = len(data)
    assert audit_lines(caplog) == [
        f"admin action=upload task=qa outcome=created status=201 version=1 sha256={sha} bytes={n} client=testclient",
        f"admin action=upload task=qa outcome=unchanged status=200 version=1 sha256={sha} bytes={n} "
        "client=testclient",
        "admin action=upload task=..x outcome=bad_name status=422 client=testclient",
        f"admin action=upload task=qa outcome=bad_shape status=422 bytes={len(raw_bytes(torch.randn(3, 65)))} "
        "client=testclient",
        "admin action=list outcome=listed status=200 client=testclient",
        f"admin action=get task=qa outcome=found status=200 version=1 sha256={sha} client=testclient",
        "admin action=get task=nope outcome=task_not_found status=404 client=testclient",
        f"admin action=delete task=qa outcome=deleted status=200 version=1 sha256={sha} client=testclient",
        "admin action=delete task=qa outcome=task_not_found status=404 client=testclient",
    ]
    token = admin_headers["Authorization"].split()[1]
    records = [r for r in caplog.records if r.name == "softprompt.audit"]
    assert all(r.levelno == logging.INFO for r in records)
    assert records[0].audit == {"action": "upload", "task": "qa", "outcome": "created", "status": 201, "version": 1,
                                "sha256": sha, "bytes": n, "client": "testclient"}
    assert not any(token in r.getMessage() or token in str(r.__dict__) for r in records)


def test_refused_upload_without_prompt_dir_is_audited_and_odd_names_are_quoted(make_client, admin_headers, caplog):
    client = make_client(prompts=None)
    with caplog.at_level(logging.INFO, logger="softprompt.audit"):
        put(client, "qa", raw_bytes(rand_tensor(3)), admin_headers)
        client.delete(f"{URL}/a%20b%0Aforged", headers=admin_headers)
    assert audit_lines(caplog) == [
        "admin action=upload task=qa outcome=no_prompt_dir status=409 client=testclient",
        'admin action=delete task="a b\\nforged" outcome=no_prompt_dir status=409 client=testclient',
    ]


def test_refusals_by_the_admin_gate_are_audited(make_client, caplog):
    client = make_client()
    closed = make_client(admin_token=None)
    with caplog.at_level(logging.INFO, logger="softprompt.audit"):
        put(client, "qa", raw_bytes(rand_tensor(3)), {"Authorization": "Bearer wrong-token"})
        client.get(URL)
        closed.delete(f"{URL}/qa", headers={"Authorization": "Bearer x"})
    assert audit_lines(caplog) == [
        "admin action=upload task=qa outcome=invalid_token status=401 client=testclient",
        "admin action=list outcome=invalid_token status=401 client=testclient",
        "admin action=delete task=qa outcome=admin_disabled status=403 client=testclient",
    ]
    assert not any("wrong-token" in r.getMessage() for r in caplog.records)


def test_admin_requests_no_route_handled_are_audited_too(client, admin_headers, caplog):
    with caplog.at_level(logging.INFO, logger="softprompt.audit"):
        client.put(f"{URL}/qa", headers=admin_headers, files={"other": ("x.safetensors", b"1")})  # no "file" field
        client.post(f"{URL}/qa", headers=admin_headers)
        client.get("/v1/admin/whatever", headers=admin_headers)
    assert audit_lines(caplog) == [
        "admin action=upload task=qa outcome=validation_error status=422 client=testclient",
        "admin action=post task=qa outcome=method_not_allowed status=405 client=testclient",
        "admin action=get outcome=not_found status=404 client=testclient",
    ]
