"""Admin API: auth, uploads (raw safetensors, PEFT zip / tar.gz), list/get/delete, and refusals (C6, C7)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import (
    decode_text,
    greedy_reference,
    peft_greedy_reference,
    rand_tensor,
    raw_bytes,
    tar_gz_dir,
    zip_dir,
    zip_members,
)

from server.app import create_app

URL = "/v1/admin/prompts"


def put(client, task: str, filename: str, data: bytes, headers):
    return client.put(f"{URL}/{task}", headers=headers, files={"file": (filename, data)})


def gen(client, task: str | None, text: str = "The answer is", n: int = 5):
    url = f"/v1/tasks/{task}/generate" if task else "/v1/generate"
    return client.post(url, json={"inputs": text, "parameters": {"max_new_tokens": n}})


def ref_text(loaded, prompt: torch.Tensor | None, text: str = "The answer is", n: int = 5) -> str:
    toks, _ = greedy_reference(loaded.model, loaded.tokenizer(text)["input_ids"], prompt, n)
    return decode_text(loaded.tokenizer, toks)


def listing(client, headers) -> list[dict]:
    r = client.get(URL, headers=headers)
    assert r.status_code == 200
    return r.json()["prompts"]


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ auth
def test_admin_disabled_without_token(make_client):
    client = make_client(admin_token=None)
    for method, path in (("get", URL), ("get", f"{URL}/x"), ("delete", f"{URL}/x")):
        r = getattr(client, method)(path, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403
        assert "admin disabled" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "admin_disabled"
    r = put(client, "x", "x.safetensors", raw_bytes(rand_tensor(2)), {})
    assert r.status_code == 403


def test_wrong_or_missing_token_is_401(client, admin_headers):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="},
                    {"Authorization": admin_headers["Authorization"].split()[1]}):
        r = client.get(URL, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_token"
        assert r.headers.get("www-authenticate") == "Bearer"
        r = put(client, "x", "x.safetensors", raw_bytes(rand_tensor(2)), headers)
        assert r.status_code == 401
    assert listing(client, admin_headers) == []
    assert client.get(URL, headers={"Authorization": "bearer " + admin_headers["Authorization"][7:]}).status_code \
        == 200


# ------------------------------------------------------------------------------------------------ uploads
def test_upload_raw_create_replace_unchanged(client, admin_headers, prompts_dir, tiny_loaded):
    P1, P2 = rand_tensor(4, seed=1), rand_tensor(6, scale=3.0, seed=2)
    r = put(client, "qa", "qa.safetensors", raw_bytes(P1), admin_headers)
    assert r.status_code == 201
    body = r.json()
    assert (body["task"], body["version"], body["action"], body["num_virtual_tokens"], body["hidden_size"]) == (
        "qa", 1, "created", 4, 64)
    assert body["peft_type"] == "RAW" and body["dtype"] == "float32" and len(body["sha256"]) == 64
    assert (prompts_dir / "qa.safetensors").read_bytes() == raw_bytes(P1)
    g = gen(client, "qa")  # servable as soon as the response came back
    assert g.status_code == 200 and g.json()["prompt_version"] == 1
    assert g.json()["generated_text"] == ref_text(tiny_loaded, P1)

    r = put(client, "qa", "new.safetensors", raw_bytes(P2), admin_headers)
    assert r.status_code == 200
    assert (r.json()["version"], r.json()["action"], r.json()["num_virtual_tokens"]) == (2, "replaced", 6)
    g = gen(client, "qa").json()
    assert g["prompt_version"] == 2 and g["usage"]["virtual_tokens"] == 6
    assert g["generated_text"] == ref_text(tiny_loaded, P2)

    r = put(client, "qa", "same.safetensors", raw_bytes(P2), admin_headers)
    assert r.status_code == 200
    assert (r.json()["version"], r.json()["action"]) == (2, "unchanged")
    assert [(p["task"], p["version"]) for p in listing(client, admin_headers)] == [("qa", 2)]


@pytest.fixture(scope="module")
def peft_dirs(tiny_loaded, tmp_path_factory) -> dict:
    """Real PEFT adapters (PROMPT_TUNING, P_TUNING, PREFIX_TUNING with projection) on copies of the tiny model:
    ``{name: (model, dir)}``."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("admin-peft")
    out = {}
    for i, (name, cfg) in enumerate({
        "pt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
        "ptune": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=16),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, prefix_projection=True,
                                     encoder_hidden_size=16),
    }.items()):
        torch.manual_seed(200 + i)
        pm = get_peft_model(copy.deepcopy(tiny_loaded.model), cfg).eval()
        pm.save_pretrained(root / name)
        out[name] = (pm, root / name)
    return out


def test_upload_peft_zip_and_tar_gz_servable_at_once(client, admin_headers, prompts_dir, peft_dirs, tiny_loaded):
    ids = tiny_loaded.tokenizer("The answer is")["input_ids"]
    cases = [("pt", "adapter.zip", zip_dir(peft_dirs["pt"][1]), "PROMPT_TUNING", 5),
             ("ptune", "adapter.tar.gz", tar_gz_dir(peft_dirs["ptune"][1]), "P_TUNING", 4),
             ("prefix", "adapter.zip", zip_dir(peft_dirs["prefix"][1]), "PREFIX_TUNING", 6)]
    for name, filename, data, peft_type, n in cases:
        r = put(client, name, filename, data, admin_headers)
        assert r.status_code == 201, r.text
        assert (r.json()["peft_type"], r.json()["num_virtual_tokens"]) == (peft_type, n)
        g = gen(client, name)
        assert g.status_code == 200
        toks, _ = peft_greedy_reference(peft_dirs[name][0], ids, 5)
        assert g.json()["generated_text"] == decode_text(tiny_loaded.tokenizer, toks)
        assert (prompts_dir / name / "adapter_config.json").is_file()
        assert (prompts_dir / name / "adapter_model.safetensors").is_file()
        assert json.loads((prompts_dir / name / "adapter_config.json").read_text())["peft_type"] == peft_type


def test_list_get_delete(client, admin_headers, prompts_dir):
    put(client, "b-task", "b.safetensors", raw_bytes(rand_tensor(3, seed=3)), admin_headers)
    put(client, "a-task", "a.safetensors", raw_bytes(rand_tensor(7, seed=4)), admin_headers)
    r = client.get(URL, headers=admin_headers).json()
    assert [p["task"] for p in r["prompts"]] == ["a-task", "b-task"]
    assert r["total_bytes"] == (3 + 7) * 64 * 4 == sum(p["nbytes"] for p in r["prompts"])
    one = client.get(f"{URL}/a-task", headers=admin_headers)
    assert one.status_code == 200
    assert (one.json()["num_virtual_tokens"], one.json()["version"], one.json()["nbytes"]) == (7, 1, 7 * 64 * 4)
    assert "embeddings" not in one.json()
    assert client.get(f"{URL}/zzz", headers=admin_headers).status_code == 404

    r = client.delete(f"{URL}/a-task", headers=admin_headers)
    assert r.status_code == 200 and r.json() == {"task": "a-task", "deleted": True}
    assert not (prompts_dir / "a-task.safetensors").exists()
    assert gen(client, "a-task").status_code == 404
    assert client.get(f"{URL}/a-task", headers=admin_headers).status_code == 404
    assert client.delete(f"{URL}/a-task", headers=admin_headers).status_code == 404
    assert [p["task"] for p in listing(client, admin_headers)] == ["b-task"]
    assert gen(client, "b-task").status_code == 200


# ------------------------------------------------------------------------------------------------ C6
def test_c6_prompt_for_another_model_size_is_refused(client, admin_headers, prompts_dir, tiny_loaded):
    old, other = rand_tensor(5, seed=10), rand_tensor(3, seed=11)
    assert put(client, "qa", "qa.safetensors", raw_bytes(old), admin_headers).status_code == 201
    assert put(client, "other", "o.safetensors", raw_bytes(other), admin_headers).status_code == 201
    before_meta = {p["task"]: p for p in listing(client, admin_headers)}
    before_files = tree(prompts_dir)
    nan = torch.zeros(8, 64)
    nan[3, 5] = float("nan")
    bad = [
        (torch.randn(8, 64 + 64), ("[n, 64]", "[8, 128]")),
        (torch.randn(64), ("[n, 64]", "[64]", "1-D")),
        (torch.randn(2, 8, 64), ("[n, 64]", "[2, 8, 64]", "3-D")),
        (nan, ("NaN", "[8, 64]")),
    ]
    for t, words in bad:
        for task in ("qa", "fresh"):
            r = put(client, task, "p.safetensors", raw_bytes(t), admin_headers)
            assert 400 <= r.status_code < 500, r.text
            msg = r.json()["error"]["message"]
            for w in words:
                assert w in msg, (w, msg)
            assert r.json()["error"]["code"] in ("bad_shape", "non_finite")
        assert "fresh" not in [p["task"] for p in listing(client, admin_headers)]
        assert gen(client, "fresh").status_code == 404
        assert {p["task"]: p for p in listing(client, admin_headers)} == before_meta  # version, sha: kept
        assert tree(prompts_dir) == before_files  # the old file's bytes are untouched
        g = gen(client, "qa").json()
        assert g["prompt_version"] == 1 and g["generated_text"] == ref_text(tiny_loaded, old)
        assert gen(client, "other").json()["generated_text"] == ref_text(tiny_loaded, other)
        assert gen(client, None).status_code == 200


def test_c6_peft_archive_for_another_width_is_refused(client, admin_headers):
    t = torch.randn(6, 128)
    files = {
        "adapter_config.json": json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                           "num_virtual_tokens": 6, "token_dim": 128}).encode(),
        "adapter_model.safetensors": safetensors.torch.save({"prompt_embeddings": t}, metadata={"format": "pt"}),
    }
    r = put(client, "wide", "a.zip", zip_members(files), admin_headers)
    assert 400 <= r.status_code < 500
    assert "[n, 64]" in r.json()["error"]["message"] and "[6, 128]" in r.json()["error"]["message"]
    assert listing(client, admin_headers) == []


# ------------------------------------------------------------------------------------------------ C7
def test_c7_uploads_it_cannot_load_are_refused(client, admin_headers, prompts_dir, tmp_path):
    good = rand_tensor(4, seed=20)
    assert put(client, "keep", "k.safetensors", raw_bytes(good), admin_headers).status_code == 201
    before_list = listing(client, admin_headers)
    before_files = tree(tmp_path)
    weights = safetensors.torch.save({"prompt_embeddings": rand_tensor(4)}, metadata={"format": "pt"})
    lora_cfg = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}).encode()
    pt_cfg = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
                         "token_dim": 64}).encode()
    cases = [
        ("new", "p.safetensors", b"", "empty"),
        ("keep", "p.safetensors", b"", "empty"),
        ("new", "adapter.zip", zip_members({"adapter_model.safetensors": weights}), "missing_file"),
        ("new", "adapter.zip", zip_members({"adapter_config.json": lora_cfg,
                                            "adapter_model.safetensors": weights}), "unsupported_peft_type"),
        ("keep", "adapter.zip", zip_members({"adapter_config.json": lora_cfg,
                                             "adapter_model.safetensors": weights}), "unsupported_peft_type"),
        ("new", "adapter_model.bin", b"\x80\x04\x95 pickle bytes", "pickle_refused"),
        ("new", "adapter.zip", zip_members({"adapter_config.json": pt_cfg,
                                            "adapter_model.bin": b"\x80\x04 pickle"}), "pickle_refused"),
        ("new", "p.safetensors", b"this is not safetensors at all", "bad_safetensors"),
        ("new", "p.txt", b"hello", "bad_kind"),
        ("new", "adapter.zip", b"PK\x03\x04 truncated", "bad_archive"),
    ]
    for task, filename, data, code in cases:
        r = put(client, task, filename, data, admin_headers)
        assert 400 <= r.status_code < 500, (filename, r.text)
        err = r.json()["error"]
        assert err["code"] == code, (filename, err)
        assert len(err["message"]) > 10
        assert listing(client, admin_headers) == before_list
        assert tree(tmp_path) == before_files
    assert gen(client, "new").status_code == 404
    assert gen(client, "keep").json()["prompt_version"] == 1
    errors = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        if fam.name == "softprompt_prompt_load_errors":
            errors = {s.labels["reason"]: s.value for s in fam.samples if s.name.endswith("_total")}
    assert sum(errors.values()) == len(cases)
    assert errors["empty"] == 2 and errors["pickle_refused"] == 2 and errors["unsupported_peft_type"] == 2


def test_upload_over_the_size_limit_is_413(make_client, admin_headers, prompts_dir):
    client = make_client(max_prompt_bytes=1024)
    data = raw_bytes(rand_tensor(8))  # 2048 bytes of tensor data
    r = put(client, "big", "big.safetensors", data, admin_headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert "1024" in r.json()["error"]["message"]
    assert listing(client, admin_headers) == [] and list(prompts_dir.iterdir()) == []
    assert put(client, "small", "s.safetensors", raw_bytes(rand_tensor(2)), admin_headers).status_code == 201


@pytest.mark.parametrize("name", ["..%2Fevil", "a%2Fb", "%2E%2E%2Fevil", "..%2F..%2Fetc", "a/b", "%2E%2E", "..x",
                                  "Upper", "x.safetensors", "a" * 65])
def test_c7_bad_task_names_are_refused(client, admin_headers, tmp_path, name):
    data = raw_bytes(rand_tensor(3, seed=30))
    before_files = tree(tmp_path)
    r = client.put(f"{URL}/{name}", headers=admin_headers, files={"file": ("p.safetensors", data)})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]
    assert listing(client, admin_headers) == []
    assert tree(tmp_path) == before_files  # nothing written, inside or outside the prompt directory
    r = client.delete(f"{URL}/{name}", headers=admin_headers)
    assert 400 <= r.status_code < 500


def test_bad_task_name_reason_is_named(client, admin_headers):
    r = put(client, "..x", "p.safetensors", raw_bytes(rand_tensor(3)), admin_headers)
    err = r.json()["error"]
    assert r.status_code == 422 and err["code"] == "bad_name" and "'..x'" in err["message"]


# ------------------------------------------------------------------------------------------------ restart
def test_uploaded_prompts_survive_a_restart(tiny_loaded, prompts_dir, make_client, admin_headers, peft_dirs):
    first = make_client()
    P = rand_tensor(6, seed=40)
    assert put(first, "raw", "r.safetensors", raw_bytes(P), admin_headers).status_code == 201
    assert put(first, "pt", "a.zip", zip_dir(peft_dirs["pt"][1], root="adapter"), admin_headers).status_code \
        == 201
    expected = {"raw": gen(first, "raw").json()["generated_text"], "pt": gen(first, "pt").json()["generated_text"]}
    settings = first.app.state.sp.settings
    first.app.state.sp.stop()  # the first server goes away (its client is closed at teardown)
    with TestClient(create_app(settings, loaded=tiny_loaded)) as second:
        tasks = {t["task"]: t for t in second.get("/v1/tasks").json()["tasks"]}
        assert set(tasks) == {"raw", "pt"}
        assert (tasks["raw"]["num_virtual_tokens"], tasks["pt"]["num_virtual_tokens"]) == (6, 5)
        for task, text in expected.items():
            r = gen(second, task)
            assert r.status_code == 200 and r.json()["generated_text"] == text
        assert gen(second, "raw").json()["generated_text"] == ref_text(tiny_loaded, P)


def test_prefix_task_listed_with_its_kind_and_empty_input_refused(client, admin_headers, peft_dirs):
    """/v1/tasks, /v1/models and the admin listing say each prompt's kind and size; an empty input to a prefix-tuned
    task is a 422 empty_input (its virtual tokens have no input position), to a prompt-tuned one a 200."""
    assert put(client, "prefix", "a.zip", zip_dir(peft_dirs["prefix"][1]), admin_headers).status_code == 201
    assert put(client, "pt", "a.zip", zip_dir(peft_dirs["pt"][1]), admin_headers).status_code == 201
    width = 2 * 2 * 2 * 16  # layers x (K, V) x KV heads x head size
    tasks = {t["task"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert tasks["prefix"] == {"task": "prefix", "num_virtual_tokens": 6, "version": 1, "peft_type": "PREFIX_TUNING",
                               "nbytes": 6 * width * 4}
    assert (tasks["pt"]["peft_type"], tasks["pt"]["nbytes"]) == ("PROMPT_TUNING", 5 * 64 * 4)
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert (models["prefix"]["peft_type"], models["prefix"]["nbytes"]) == ("PREFIX_TUNING", 6 * width * 4)
    admin = {p["task"]: p for p in listing(client, admin_headers)}
    assert (admin["prefix"]["peft_type"], admin["prefix"]["hidden_size"]) == ("PREFIX_TUNING", width)
    r = gen(client, "prefix", text="")
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_input"
    assert "prefix-tuned" in r.json()["error"]["message"]
    assert gen(client, "pt", text="").status_code == 200
