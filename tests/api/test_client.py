"""``server.client.SoftpromptClient`` and the ``softprompt upload`` command against a live server."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from server.client import SoftpromptClient, SoftpromptError
from softprompt_cli import main as cli_main


@pytest.fixture
def srv(live_server):
    return live_server()


@pytest.fixture
def sp(srv):
    with SoftpromptClient(srv.url, admin_token=srv.admin_token, timeout=120) as c:
        yield c


def _save(path: Path, t: torch.Tensor) -> Path:
    safetensors.torch.save_file({"prompt": t.contiguous()}, str(path))
    return path


@pytest.fixture
def peft_adapter(tmp_path, fresh_tiny_model) -> tuple[Path, torch.Tensor]:
    """A PROMPT_TUNING adapter made with peft on a tiny model of the server's shape: (directory, embeddings)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh_tiny_model(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                      num_virtual_tokens=5))
        out = tmp_path / "adapter"
        model.save_pretrained(str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    emb = safetensors.torch.load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert tuple(emb.shape) == (5, 64)
    return out, emb


def _reference_text(tiny_loaded, greedy_ref, decode, inputs: str, prompt: torch.Tensor | None, n: int) -> str:
    ids, _ = greedy_ref(tiny_loaded, tiny_loaded.tokenizer(inputs)["input_ids"], prompt, max_new_tokens=n)
    return decode(ids)


# ----------------------------------------------------------------------------------------------------- generation
def test_generate_and_generate_stream(sp, tiny_loaded, greedy_ref, decode):
    out = sp.generate(None, "Hello world", max_new_tokens=10)
    assert out["generated_text"] == _reference_text(tiny_loaded, greedy_ref, decode, "Hello world", None, 10)
    assert out["task"] is None and out["finish_reason"] == "length"
    events = list(sp.generate_stream(None, "Hello world", max_new_tokens=10))
    assert "".join(e["text"] for e in events) == out["generated_text"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"] == out["usage"]
    assert all("finish_reason" not in e for e in events[:-1])

    sampled = sp.generate(None, "Hello world", max_new_tokens=10, temperature=0.8, top_k=40, seed=3)
    streamed = list(sp.generate_stream(None, "Hello world", max_new_tokens=10, temperature=0.8, top_k=40, seed=3))
    assert "".join(e["text"] for e in streamed) == sampled["generated_text"]


def test_upload_safetensors_serve_list_get_replace_delete(sp, tmp_path, tiny_loaded, greedy_ref, decode,
                                                          rand_embeddings):
    emb = rand_embeddings(4, scale=2.0, seed=21)
    path = _save(tmp_path / "summarize.safetensors", emb)
    meta = sp.upload("summarize", path)
    assert meta["action"] == "created" and meta["version"] == 1
    assert meta["num_virtual_tokens"] == 4 and meta["task"] == "summarize"
    assert sp.tasks() == [{"task": "summarize", "num_virtual_tokens": 4, "version": 1, "peft_type": "RAW",
                          "nbytes": 4 * 64 * 4}]

    out = sp.generate("summarize", "Some text", max_new_tokens=8)
    assert out["generated_text"] == _reference_text(tiny_loaded, greedy_ref, decode, "Some text", emb, 8)
    assert out["usage"]["virtual_tokens"] == 4 and out["task"] == "summarize" and out["prompt_version"] == 1
    events = list(sp.generate_stream("summarize", "Some text", max_new_tokens=8))
    assert "".join(e["text"] for e in events) == out["generated_text"]

    listed = sp.list_prompts()
    assert [p["task"] for p in listed] == ["summarize"]
    got = sp.get_prompt("summarize")
    assert got == listed[0]
    assert got["sha256"] == meta["sha256"] and got["hidden_size"] == 64 and got["peft_type"] == "RAW"

    assert sp.upload("summarize", path)["action"] == "unchanged"
    emb2 = rand_embeddings(7, seed=22)
    replaced = sp.upload("summarize", _save(tmp_path / "v2.safetensors", emb2))
    assert (replaced["action"], replaced["version"], replaced["num_virtual_tokens"]) == ("replaced", 2, 7)
    out2 = sp.generate("summarize", "Some text", max_new_tokens=8)
    assert out2["generated_text"] == _reference_text(tiny_loaded, greedy_ref, decode, "Some text", emb2, 8)
    assert out2["prompt_version"] == 2

    assert sp.delete_prompt("summarize") == {"task": "summarize", "deleted": True}
    assert sp.tasks() == [] and sp.list_prompts() == []
    for call in (lambda: sp.generate("summarize", "x"), lambda: sp.get_prompt("summarize"),
                 lambda: sp.delete_prompt("summarize"), lambda: list(sp.generate_stream("summarize", "x"))):
        with pytest.raises(SoftpromptError) as exc:
            call()
        assert exc.value.status == 404 and exc.value.code == "task_not_found"


def test_upload_peft_adapter_directory(sp, peft_adapter, tiny_loaded, greedy_ref, decode):
    directory, emb = peft_adapter
    meta = sp.upload("peft-task", directory)
    assert meta["action"] == "created"
    assert meta["num_virtual_tokens"] == 5 and meta["peft_type"] == "PROMPT_TUNING"
    assert sp.tasks() == [{"task": "peft-task", "num_virtual_tokens": 5, "version": 1,
                          "peft_type": "PROMPT_TUNING", "nbytes": 5 * 64 * 4}]
    out = sp.generate("peft-task", "Translate this", max_new_tokens=8)
    assert out["generated_text"] == _reference_text(tiny_loaded, greedy_ref, decode, "Translate this", emb, 8)
    assert sp.upload("peft-task", directory)["action"] == "unchanged"


# ----------------------------------------------------------------------------------------------------- errors
def test_errors_raise_softprompt_error_with_status_and_code(srv, sp, tmp_path, rand_embeddings):
    good = _save(tmp_path / "good.safetensors", rand_embeddings(3))
    with SoftpromptClient(srv.url, admin_token="wrong-token") as bad, SoftpromptClient(srv.url) as anon:
        for call in (lambda: bad.upload("t", good), lambda: bad.list_prompts(), lambda: anon.get_prompt("t"),
                     lambda: anon.delete_prompt("t")):
            with pytest.raises(SoftpromptError) as exc:
                call()
            assert exc.value.status == 401 and exc.value.code == "invalid_token"
    assert sp.tasks() == []  # nothing was uploaded

    with pytest.raises(SoftpromptError) as exc:
        sp.generate(None, "x", max_new_tokens=0)
    assert exc.value.status == 422 and exc.value.code == "validation_error"
    with pytest.raises(SoftpromptError) as exc:
        list(sp.generate_stream(None, "x", max_new_tokens=0))
    assert exc.value.status == 422 and exc.value.code == "validation_error"
    with pytest.raises(SoftpromptError) as exc:
        sp.generate(None, "x", stop=[f"s{i}" for i in range(9)])
    assert exc.value.status == 422
    with pytest.raises(SoftpromptError) as exc:
        sp.upload("wide", _save(tmp_path / "wide.safetensors", rand_embeddings(3, hidden=65)))
    assert exc.value.status == 422 and exc.value.code and "65" in exc.value.message
    with pytest.raises(SoftpromptError) as exc:
        sp.upload("bad name!", good)
    assert exc.value.status == 422 and exc.value.code == "bad_name"
    with pytest.raises(SoftpromptError) as exc:
        sp.generate("missing", "x")
    assert (exc.value.status, exc.value.code) == (404, "task_not_found")
    assert "HTTP 404" in str(exc.value)


def test_admin_disabled_is_a_403(live_server, tmp_path, rand_embeddings):
    srv = live_server(admin_token=None)
    with SoftpromptClient(srv.url, admin_token="anything") as c, pytest.raises(SoftpromptError) as exc:
        c.list_prompts()
    assert (exc.value.status, exc.value.code) == (403, "admin_disabled")


def test_stream_error_event_raises(sp, srv, monkeypatch):
    engine = srv.engine
    real = engine.runner._forward
    calls = [0]

    def forward(rows):
        calls[0] += 1
        if calls[0] > 4:
            raise RuntimeError("injected failure for the client")
        return real(rows)

    monkeypatch.setattr(engine.runner, "_forward", forward)
    got = []
    with pytest.raises(SoftpromptError) as exc:
        for event in sp.generate_stream(None, "Stream until it breaks", max_new_tokens=30):
            got.append(event)
    assert exc.value.code == "engine_error"
    assert "injected failure for the client" in exc.value.message
    assert got and all("finish_reason" not in e for e in got)  # some text came before the error


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_upload_then_servable(srv, sp, tmp_path, capsys, rand_embeddings, tiny_loaded, greedy_ref, decode):
    emb = rand_embeddings(4, scale=2.0, seed=31)
    path = _save(tmp_path / "prompt.safetensors", emb)
    rc = cli_main(["upload", str(path), "--task", "x", "--server", srv.url, "--admin-token", srv.admin_token])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "x: created, version 1, 4 virtual tokens"
    out = sp.generate("x", "Servable?", max_new_tokens=6)
    assert out["usage"]["virtual_tokens"] == 4
    assert out["generated_text"] == _reference_text(tiny_loaded, greedy_ref, decode, "Servable?", emb, 6)


def test_cli_upload_peft_directory_and_token_from_env(srv, sp, peft_adapter, capsys, monkeypatch):
    directory, _ = peft_adapter
    monkeypatch.setenv("SOFTPROMPT_ADMIN_TOKEN", srv.admin_token)
    assert cli_main(["upload", str(directory), "--task", "adapter-task", "--server", srv.url]) == 0
    assert capsys.readouterr().out.strip() == "adapter-task: created, version 1, 5 virtual tokens"
    assert sp.tasks() == [{"task": "adapter-task", "num_virtual_tokens": 5, "version": 1,
                          "peft_type": "PROMPT_TUNING", "nbytes": 5 * 64 * 4}]


def test_cli_upload_failures_return_nonzero(srv, sp, tmp_path, capsys, rand_embeddings, monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_ADMIN_TOKEN", raising=False)
    path = _save(tmp_path / "p.safetensors", rand_embeddings(2))
    rc = cli_main(["upload", str(path), "--task", "x", "--server", srv.url, "--admin-token", "wrong"])
    assert rc != 0
    assert "401" in capsys.readouterr().err
    rc = cli_main(["upload", str(path), "--task", "x", "--server", srv.url])  # no token at all
    assert rc != 0
    assert "401" in capsys.readouterr().err
    rc = cli_main(["upload", str(tmp_path / "missing.safetensors"), "--task", "x", "--server", srv.url,
                   "--admin-token", srv.admin_token])
    assert rc != 0
    assert "missing.safetensors" in capsys.readouterr().err
    assert sp.tasks() == []


def test_cli_upload_to_an_unreachable_server_fails_cleanly(tmp_path, capsys, rand_embeddings):
    """No server listening: a one-line error and a non-zero status, not a traceback."""
    path = _save(tmp_path / "p.safetensors", rand_embeddings(2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        rc = cli_main(["upload", str(path), "--task", "x", "--server", f"http://127.0.0.1:{port}",
                       "--admin-token", "t"])
    assert rc != 0
    err = capsys.readouterr().err
    assert err.startswith("softprompt upload:") and len(err.strip().splitlines()) == 1
