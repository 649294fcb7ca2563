"""Prefix-tuning files: parsing and validation against the model's KV shape (layers, KV heads, head size)."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prompt_store.errors import PromptError
from prompt_store.formats import ParsedPrompt, load_path, parse_peft_files, parse_upload
from prompt_store.registry import PromptRegistry, tensor_sha256
from prompt_store.store import PromptStore

WIDTH = 2 * 2 * 2 * 16  # the tiny model: 2 layers x (K, V) x 2 KV heads x head size 16


def prefix_files(n: int = 5, width: int = WIDTH, **config) -> dict[str, bytes]:
    """The two files of a PEFT prefix-tuning adapter for the tiny model (config fields overridable)."""
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n, "num_layers": 2,
           "num_attention_heads": 2, "token_dim": 32, "num_transformer_submodules": 1, **config}
    t = torch.randn(n, width, generator=torch.Generator().manual_seed(n))
    return {"adapter_config.json": json.dumps(cfg).encode(),
            "adapter_model.safetensors": safetensors.torch.save({"prompt_embeddings": t}, metadata={"format": "pt"})}


def refused(reason: str, files: dict, limits) -> str:
    with pytest.raises(PromptError) as info:
        parse_peft_files(files, limits)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


def test_good_prefix_files_parse(limits):
    parsed = parse_peft_files(prefix_files(5), limits)
    assert parsed.peft_type == "PREFIX_TUNING" and parsed.embeddings.shape == (5, WIDTH)


def test_wrong_layer_count_in_config_names_both(limits):
    msg = refused("bad_shape", prefix_files(num_layers=3), limits)
    assert "num_layers=3" in msg and "num_layers=2" in msg


def test_wrong_layer_count_in_tensor_names_the_width_and_its_factors(limits):
    msg = refused("bad_shape", prefix_files(width=3 * 2 * 2 * 16), limits)
    assert "expected shape [n, 128 = num_layers 2 x 2 x num_key_value_heads 2 x head_dim 16], got [5, 192]" in msg


@pytest.mark.parametrize("drop", ["num_layers", "num_attention_heads", "token_dim"])
def test_prefix_config_must_give_the_model_shape(limits, drop):
    """4 layers x 1 KV head x 16 has the same width as 2 x 2 x 16: without the config's shape it cannot be told."""
    files = prefix_files()
    cfg = json.loads(files["adapter_config.json"])
    del cfg[drop]
    files["adapter_config.json"] = json.dumps(cfg).encode()
    msg = refused("bad_config", files, limits)
    assert drop in msg and "num_layers=2, num_attention_heads=2, token_dim=32" in msg


@pytest.mark.parametrize("field, value, want", [("num_attention_heads", 4, 2), ("token_dim", 64, 32)])
def test_wrong_kv_width_in_config(limits, field, value, want):
    msg = refused("bad_shape", prefix_files(**{field: value}), limits)
    assert f"says {field}={value}" in msg and f"needs {field}={want}" in msg


def test_wrong_kv_width_in_tensor(limits):
    files = prefix_files(width=2 * 2 * 4 * 16)
    assert "got [5, 256]" in refused("bad_shape", files, limits)


def test_non_finite_prefix_refused(limits):
    files = prefix_files(4)
    t = safetensors.torch.load(files["adapter_model.safetensors"])["prompt_embeddings"]
    t[1, 7] = float("nan")
    t[2, 0] = float("inf")
    files["adapter_model.safetensors"] = safetensors.torch.save({"prompt_embeddings": t})
    assert "1 NaN and 1 inf" in refused("non_finite", files, limits)


def test_too_many_virtual_tokens_refused(limits):
    assert "expected 1 to 128 virtual tokens, got 129" in refused("bad_shape", prefix_files(129), limits)


def test_config_num_virtual_tokens_must_match(limits):
    files = prefix_files(5)
    files["adapter_config.json"] = prefix_files(6)["adapter_config.json"]
    assert "num_virtual_tokens=6" in refused("bad_config", files, limits)


@pytest.mark.parametrize("config", [b"[" * 100_000 + b"]" * 100_000, b'{"num_layers": ' + b"9" * 5000 + b"}"])
def test_hostile_config_json_is_a_bad_config_not_a_crash(limits, config):
    """Deep nesting (RecursionError) and a 5000-digit integer (ValueError in Python 3.11+) are refused cleanly."""
    files = prefix_files()
    files["adapter_config.json"] = config
    assert "not valid UTF-8 JSON" in refused("bad_config", files, limits)


def test_same_bytes_as_embeddings_and_as_prefix_are_different_prompts():
    """When hidden_size == layers x 2 x KV heads x head size, one tensor can be either kind: the content hash (the
    prompt-KV cache key) tells them apart, and switching the kind is a replacement, not "unchanged"."""
    t = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    reg = PromptRegistry()
    raw, action = reg.put("x", ParsedPrompt(t, "RAW"), "test")
    assert action == "created"
    prefix, action = reg.put("x", ParsedPrompt(t, "PREFIX_TUNING"), "test")
    assert action == "replaced" and prefix.version == 2 and prefix.peft_type == "PREFIX_TUNING"
    assert prefix.sha256 != raw.sha256 and prefix.sha256 == tensor_sha256(t, prefix=True)


def test_prefix_pickle_refused_unopened(limits, tmp_path: Path):
    d = tmp_path / "pfx"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(prefix_files()["adapter_config.json"])
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 not a real pickle, never read")
    with pytest.raises(PromptError) as info:
        load_path(d, limits)
    assert info.value.reason == "pickle_refused"


def test_raw_file_of_prefix_width_is_refused_with_a_hint(limits, raw_bytes):
    with pytest.raises(PromptError) as info:
        parse_upload("p.safetensors", raw_bytes(torch.zeros(5, WIDTH)), limits)
    assert info.value.reason == "bad_shape" and "PEFT adapter directory" in str(info.value)


def test_prefix_zip_upload_is_written_and_reloaded_as_prefix(peft_adapters, limits, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(peft_adapters["PREFIX_PROJECTION"].iterdir()):
            zf.write(f, f"adapter/{f.name}")
    store = PromptStore(tmp_path, PromptRegistry(), limits)
    prompt, action = store.upload("pfx", "a.zip", buf.getvalue())
    assert action == "created" and prompt.peft_type == "PREFIX_TUNING" and prompt.num_virtual_tokens == 7
    reg = PromptRegistry()
    assert PromptStore(tmp_path, reg, limits).scan() == {"loaded": 1, "errors": 0}
    again = reg.get("pfx")
    assert again.peft_type == "PREFIX_TUNING" and again.sha256 == prompt.sha256


def test_prefix_directory_hot_reloads(peft_adapters, limits, tmp_path, wait_for):
    reg = PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, debounce_ms=50)
    store.scan()
    store.start_watching()
    try:
        shutil.copytree(peft_adapters["PREFIX_TUNING"], tmp_path / "pfx")
        wait_for(lambda: reg.get("pfx") is not None, what="prefix task loaded")
        assert reg.get("pfx").peft_type == "PREFIX_TUNING" and reg.get("pfx").num_virtual_tokens == 5
        shutil.rmtree(tmp_path / "pfx")
        wait_for(lambda: reg.get("pfx") is None, what="prefix task removed")
    finally:
        store.stop()
