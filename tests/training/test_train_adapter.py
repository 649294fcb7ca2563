"""Adapters made by ``train``: what the server loads equals what PEFT saved, the engine serves them (and their
output differs from the base model's), and ``--upload`` pushes them through the admin API."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from train_helpers import greedy

from prompt_store.formats import Limits, load_path
from prompt_store.registry import PromptRegistry
from server.client import SoftpromptClient
from training.adapter import META_FILE
from training.cli import train_main
from training.train import TrainConfig, train

# PeftModel.from_pretrained (PEFT 0.21) calls an API transformers 5 deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_saved_adapter_round_trips(fresh_tiny, km_data, tmp_path, method):
    out = tmp_path / method
    res = train(fresh_tiny, TrainConfig(task="km", data=km_data, out=out, method=method, steps=3, progress=False),
                log=lambda *_: None)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.metadata() == {"format": "pt"}
        saved = f.get_tensor("prompt_embeddings")
    # PEFT's own view of the trained prompt (for p-tuning: the encoder's output, computed now)
    with torch.no_grad():
        peft_view = res.peft_model.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(saved, peft_view, rtol=0, atol=0)
    parsed = load_path(out, Limits(hidden_size=64))  # exactly what the server's prompt store does
    assert parsed.peft_type == method.upper() and parsed.embeddings.shape == (20, 64)
    assert torch.equal(parsed.embeddings, saved)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["task_type"] == "CAUSAL_LM"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["trainable_params"] == res.trainable_params and meta["steps"] == 3 and meta["template"] == "plain"
    card = (out / "README.md").read_text()  # our card, not PEFT's boilerplate naming a local cache path
    assert card.startswith("# Soft prompt `km` for tiny-llama") and "[More Information Needed]" not in card
    # PEFT itself loads it back (inference mode: the table holds the saved, for p-tuning encoded, prompt)
    from peft import PeftModel

    again = PeftModel.from_pretrained(fresh_tiny.model, str(out))
    assert torch.equal(again.prompt_encoder["default"].embedding.weight.detach(), saved)


@torch.no_grad()
def _peft_greedy(peft_model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference through PEFT's forward (never its generate): PEFT prepends the prompt itself."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids + out])
        tok = int(peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
        out.append(tok)
        if tok == 2:
            break
    return out


def test_trained_adapter_is_served_by_the_engine(fresh_tiny, km_data, tmp_path):
    from peft import PeftModel

    from server.engine import Engine, EngineConfig
    from server.request import Request, SamplingParams

    out = tmp_path / "km"
    train(fresh_tiny, TrainConfig(task="km", data=km_data, out=out, steps=10, lr=0.1, progress=False),
          log=lambda *_: None)
    prompt, _ = PromptRegistry().put("km", load_path(out, Limits(64)), str(out))
    engine = Engine(fresh_tiny, EngineConfig(kv_cache_bytes=16 * 1024**2, prompt_kv_cache_bytes=4 * 1024**2))
    engine.start()
    tok = fresh_tiny.tokenizer
    inputs = ["7 km", "64 km", "123 km"]
    try:
        streams = [engine.submit(Request(f"{i}{p is None}", tok(t)["input_ids"], SamplingParams(6), p, "km"))
                   for t in inputs for i, p in [(t, prompt), (t, None)]]
        got = [[x for o in s.iter_sync(timeout=60) for x in o.new_token_ids] for s in streams]
    finally:
        engine.stop()
    peft_model = PeftModel.from_pretrained(fresh_tiny.model, str(out))
    for k, text in enumerate(inputs):
        ids = tok(text)["input_ids"]
        with_prompt, base = got[2 * k], got[2 * k + 1]
        assert with_prompt == _peft_greedy(peft_model, ids, 6)
        assert base == greedy(fresh_tiny.model, ids, None, 6)
    assert any(got[2 * k] != got[2 * k + 1] for k in range(len(inputs))), "the prompt changed nothing"


def test_train_upload_pushes_through_the_admin_api(fresh_tiny, km_data, tmp_path, client, admin_headers, capsys):
    """``train --upload``: the adapter directory goes through PUT /v1/admin/prompts/{task}; the task is then
    served. ``client`` is the app's TestClient (same tiny weights as ``fresh_tiny``), used as the HTTP transport."""
    token = admin_headers["Authorization"].split()[1]
    out = tmp_path / "km"
    argv = ["--task", "km", "--data", str(km_data), "--out", str(out), "--steps", "2", "--no-progress",
            "--upload", "http://testserver", "--admin-token", token]

    sp = SoftpromptClient("http://testserver", admin_token=token)
    sp._http = client  # the TestClient speaks httpx's Client API
    assert train_main(argv, loaded=fresh_tiny, upload_client=sp) == 0
    assert "uploaded km: created, version 1" in capsys.readouterr().out
    assert client.get("/v1/tasks").json()["tasks"] == [{"task": "km", "num_virtual_tokens": 20, "version": 1,
                                                        "peft_type": "PROMPT_TUNING", "nbytes": 20 * 64 * 4}]
    resp = client.post("/v1/tasks/km/generate", json={"inputs": "7 km", "parameters": {"max_new_tokens": 4}})
    assert resp.status_code == 200 and resp.json()["usage"]["virtual_tokens"] == 20

    bad = SoftpromptClient("http://testserver", admin_token="wrong")
    bad._http = client
    assert train_main([*argv[:-1], "wrong"], loaded=fresh_tiny, upload_client=bad) == 1
    assert "upload failed: HTTP 401" in capsys.readouterr().err
