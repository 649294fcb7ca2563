"""Acceptance: real PEFT 0.21 save_pretrained output of a tiny Llama loads to exactly what it saved."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from prompt_store.errors import PromptError
from prompt_store.formats import Limits, load_path, parse_upload
from prompt_store.registry import PromptRegistry
from prompt_store.store import PromptStore


def saved(adapter: Path) -> torch.Tensor:
    return safetensors.torch.load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"]


def zip_dir(adapter: Path, folder: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(adapter.iterdir()):
            zf.write(f, f"{folder}/{f.name}" if folder else f.name)
    return buf.getvalue()


def tgz_dir(adapter: Path, folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(adapter, arcname=folder or ".")
    return buf.getvalue()


@pytest.mark.parametrize("peft_type, n", [("PROMPT_TUNING", 8), ("P_TUNING", 6)])
def test_load_path_equals_what_peft_saved(peft_adapters, limits, peft_type, n):
    adapter = peft_adapters[peft_type]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    parsed = load_path(adapter, limits)
    expected = saved(adapter)
    assert expected.shape == (n, 64)
    assert parsed.peft_type == peft_type and parsed.num_virtual_tokens == n
    assert parsed.embeddings.dtype == expected.dtype and torch.equal(parsed.embeddings, expected)
    assert parsed.config == json.loads((adapter / "adapter_config.json").read_text())


@pytest.mark.parametrize("name, n", [("PREFIX_TUNING", 5), ("PREFIX_PROJECTION", 7)])
def test_real_prefix_tuning_adapter_loads_what_peft_saved(peft_adapters, limits, name, n):
    """PEFT saves the prefix (projected, when prefix_projection is on) as [n, layers * 2 * kv_heads * head_dim]."""
    parsed = load_path(peft_adapters[name], limits)
    assert parsed.peft_type == "PREFIX_TUNING" and parsed.is_prefix and parsed.num_virtual_tokens == n
    assert parsed.embeddings.shape == (n, 2 * 2 * 2 * 16) and torch.equal(parsed.embeddings, saved(peft_adapters[name]))
    config = json.loads((peft_adapters[name] / "adapter_config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 2, 32)  # KV heads


def test_prefix_adapter_refused_without_the_model_kv_shape(peft_adapters):
    with pytest.raises(PromptError) as info:
        load_path(peft_adapters["PREFIX_TUNING"], Limits(hidden_size=64))
    assert info.value.reason == "unsupported_peft_type" and "KV shape" in str(info.value)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("kind", ["zip-root", "zip-folder", "tgz-root", "tgz-folder"])
def test_archive_uploads_round_trip(peft_adapters, limits, peft_type, kind):
    adapter = peft_adapters[peft_type]
    folder = "" if kind.endswith("root") else "my_adapter"
    if kind.startswith("zip"):
        name, data = "adapter.zip", zip_dir(adapter, folder)
    else:
        name, data = "adapter.tar.gz", tgz_dir(adapter, folder)
    parsed = parse_upload(name, data, limits)
    assert parsed.peft_type == peft_type and torch.equal(parsed.embeddings, saved(adapter))


def test_store_upload_of_peft_zip_is_reloaded_by_a_fresh_store(peft_adapters, limits, tmp_path):
    adapter = peft_adapters["P_TUNING"]
    store = PromptStore(tmp_path, PromptRegistry(), limits)
    prompt, action = store.upload("ptune", "a.zip", zip_dir(adapter, "x"))
    assert action == "created" and prompt.peft_type == "P_TUNING" and prompt.source == str(tmp_path / "ptune")
    written = tmp_path / "ptune" / "adapter_model.safetensors"
    with safetensors.safe_open(str(written), "pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == ["prompt_embeddings"]
    assert torch.equal(saved(tmp_path / "ptune"), saved(adapter))
    fresh = PromptRegistry()
    assert PromptStore(tmp_path, fresh, limits).scan() == {"loaded": 1, "errors": 0}
    reloaded = fresh.get("ptune")
    assert torch.equal(reloaded.embeddings, saved(adapter)) and reloaded.sha256 == prompt.sha256
    assert reloaded.peft_type == "P_TUNING"


def test_peft_dir_copied_into_store_directory_scans(peft_adapters, limits, tmp_path):
    import shutil

    shutil.copytree(peft_adapters["PROMPT_TUNING"], tmp_path / "pt-task")
    shutil.copytree(peft_adapters["PREFIX_TUNING"], tmp_path / "prefix-task")
    errors: list[tuple[str, str]] = []
    reg = PromptRegistry()
    shutil.copytree(peft_adapters["PREFIX_TUNING"], tmp_path / "other-model-prefix")
    config = json.loads((tmp_path / "other-model-prefix" / "adapter_config.json").read_text())
    (tmp_path / "other-model-prefix" / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 3}))
    counts = PromptStore(tmp_path, reg, limits, on_error=lambda e, x: errors.append((e, x.reason))).scan()
    assert counts == {"loaded": 2, "errors": 1}
    assert errors == [("other-model-prefix", "bad_shape")]
    assert reg.get("prefix-task").peft_type == "PREFIX_TUNING"
    assert torch.equal(reg.get("pt-task").embeddings, saved(peft_adapters["PROMPT_TUNING"]))
