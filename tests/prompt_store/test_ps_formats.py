"""Validation and parsing of soft-prompt tensors, safetensors bytes, PEFT configs and files (cases C6, C7)."""

from __future__ import annotations

import json

import pytest
import torch

from prompt_store.errors import REASONS, PromptError
from prompt_store.formats import (
    TASK_NAME_RE,
    Limits,
    load_path,
    parse_peft_config,
    parse_peft_files,
    parse_safetensors_bytes,
    parse_upload,
    validate_embeddings,
    validate_task_name,
)


def refused(reason: str, fn, *args, **kwargs) -> str:
    """Call ``fn``; assert it raises PromptError with ``reason``; return the message."""
    with pytest.raises(PromptError) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("name", ["qa", "a", "0", "task-1.v2_x", "x" * 64])
def test_good_task_names(name):
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "Qa", ".", "..", "../x", "a/b", "/abs", ".hidden", "x" * 65, "a b", "-x", "x.safetensors"],
)
def test_bad_task_names_name_pattern_and_value(name):
    msg = refused("bad_name", validate_task_name, name)
    assert TASK_NAME_RE.pattern in msg
    assert repr(name) in msg


def test_unknown_reason_code_is_a_programming_error():
    with pytest.raises(KeyError):
        PromptError("x", reason="no_such_reason")
    assert "bad_shape" in REASONS


def test_one_dimensional_tensor(limits):
    msg = refused("bad_shape", validate_embeddings, torch.zeros(64), limits)
    assert "1-D" in msg and "[64]" in msg and "[n, 64]" in msg


def test_three_dimensional_tensor(limits):
    msg = refused("bad_shape", validate_embeddings, torch.zeros(2, 8, 64), limits)
    assert "3-D" in msg and "[2, 8, 64]" in msg and "[n, 64]" in msg


def test_wrong_width_names_both_shapes(limits):
    msg = refused("bad_shape", validate_embeddings, torch.zeros(8, 64 + 64), limits)
    assert "expected shape [n, 64], got [8, 128]" in msg


def test_nan_and_inf_are_counted(limits):
    t = torch.zeros(8, 64)
    t[0, 0] = float("nan")
    t[1, 2] = float("nan")
    t[3, 3] = float("-inf")
    msg = refused("non_finite", validate_embeddings, t, limits)
    assert "2 NaN" in msg and "1 inf" in msg and "512" in msg


def test_inf_alone(limits):
    t = torch.ones(4, 64, dtype=torch.float16)
    t[2, 5] = float("inf")
    assert "0 NaN and 1 inf" in refused("non_finite", validate_embeddings, t, limits)


def test_too_many_and_zero_tokens(limits):
    msg = refused("bad_shape", validate_embeddings, torch.zeros(129, 64), limits)
    assert "1 to 128" in msg and "got 129" in msg
    msg = refused("bad_shape", validate_embeddings, torch.zeros(0, 64), limits)
    assert "got 0" in msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8, torch.bool])
def test_bad_dtypes(limits, dtype):
    msg = refused("bad_dtype", validate_embeddings, torch.zeros(8, 64, dtype=dtype), limits)
    assert str(dtype).removeprefix("torch.") in msg and "float32" in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_good_dtypes_are_kept_and_made_contiguous(limits, dtype):
    t = torch.randn(64, 8).to(dtype).T  # [8, 64], not contiguous
    assert not t.is_contiguous()
    out = validate_embeddings(t, limits)
    assert out.dtype == dtype and out.shape == (8, 64) and out.is_contiguous() and out.device.type == "cpu"
    assert torch.equal(out, t)


def test_not_a_tensor(limits):
    assert "list" in refused("bad_kind", validate_embeddings, [[1.0] * 64], limits)


def test_safetensors_round_trip_any_key(limits, raw_bytes):
    t = torch.randn(5, 64)
    out = parse_safetensors_bytes(raw_bytes(t, key="whatever"), limits)
    assert torch.equal(out, t)


def test_safetensors_empty_and_too_large(limits, raw_bytes):
    assert "got 0" in refused("empty", parse_safetensors_bytes, b"", limits)
    data = raw_bytes(torch.randn(8, 64))
    small = Limits(hidden_size=64, max_bytes=1000)
    msg = refused("too_large", parse_safetensors_bytes, data, small)
    assert str(len(data)) in msg and "1000" in msg


def test_safetensors_garbage(limits):
    msg = refused(
        "bad_safetensors", parse_safetensors_bytes, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}xx", limits
    )
    assert msg.startswith("not a valid safetensors file:")


def test_safetensors_raw_must_hold_one_tensor(limits):
    import safetensors.torch

    data = safetensors.torch.save({"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)})
    msg = refused("bad_safetensors", parse_safetensors_bytes, data, limits)
    assert "exactly 1 tensor" in msg and "got 2" in msg and "'a', 'b'" in msg


def test_safetensors_key_must_exist(limits, raw_bytes):
    msg = refused(
        "bad_safetensors",
        parse_safetensors_bytes,
        raw_bytes(torch.zeros(2, 64), key="w"),
        limits,
        key="prompt_embeddings",
    )
    assert "'prompt_embeddings'" in msg and "['w']" in msg


def test_safetensors_shape_errors_pass_through(limits, raw_bytes):
    msg = refused("bad_shape", parse_safetensors_bytes, raw_bytes(torch.zeros(8, 128)), limits)
    assert "expected shape [n, 64], got [8, 128]" in msg


def cfg(**fields) -> bytes:
    return json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", **fields}).encode()


def test_peft_config_accepts_prompt_and_p_tuning():
    assert parse_peft_config(cfg(num_virtual_tokens=8, extra=[1]))["extra"] == [1]
    assert parse_peft_config(cfg(peft_type="P_TUNING"))["peft_type"] == "P_TUNING"
    assert parse_peft_config(cfg(task_type=None))["task_type"] is None


def test_peft_config_accepts_prefix_tuning():
    config = parse_peft_config(cfg(peft_type="PREFIX_TUNING", num_layers=2, num_attention_heads=2, token_dim=32))
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_layers"] == 2


def test_lora_lists_supported_types():
    msg = refused("unsupported_peft_type", parse_peft_config, cfg(peft_type="LORA"))
    assert "'LORA'" in msg and "PROMPT_TUNING, P_TUNING, PREFIX_TUNING" in msg


def test_peft_config_other_refusals():
    assert "'SEQ_2_SEQ_LM'" in refused(
        "unsupported_peft_type", parse_peft_config, cfg(task_type="SEQ_2_SEQ_LM")
    )
    assert "got 2" in refused("unsupported_peft_type", parse_peft_config, cfg(num_transformer_submodules=2))
    assert "'8'" in refused("bad_config", parse_peft_config, cfg(num_virtual_tokens="8"))
    refused("bad_config", parse_peft_config, b"{not json")
    refused("bad_config", parse_peft_config, b"\xff\xfe")
    assert "list" in refused("bad_config", parse_peft_config, b"[1, 2]")
    refused("empty", parse_peft_config, b"")
    refused("unsupported_peft_type", parse_peft_config, b"{}")


def test_peft_files_ok(limits, peft_files):
    t = torch.randn(8, 64)
    parsed = parse_peft_files(peft_files(t), limits)
    assert torch.equal(parsed.embeddings, t) and parsed.peft_type == "PROMPT_TUNING"
    assert parsed.num_virtual_tokens == 8 and parsed.config["token_dim"] == 64


def test_peft_files_missing_config(limits, peft_files):
    files = peft_files(torch.randn(8, 64))
    del files["adapter_config.json"]
    msg = refused("missing_file", parse_peft_files, files, limits)
    assert (
        "needs adapter_config.json and adapter_model.safetensors" in msg
        and "missing adapter_config.json" in msg
    )


def test_peft_files_bin_only_is_refused_as_pickle(limits, peft_files):
    files = peft_files(torch.randn(8, 64))
    del files["adapter_model.safetensors"]
    files["adapter_model.bin"] = b"\x80\x04not really"
    msg = refused("pickle_refused", parse_peft_files, files, limits)
    assert "adapter_model.bin is a pickle and is never loaded; save with safe_serialization=True" in msg


def test_peft_files_config_must_agree_with_tensor(limits, peft_files):
    t = torch.randn(8, 64)
    msg = refused("bad_config", parse_peft_files, peft_files(t, num_virtual_tokens=10), limits)
    assert "num_virtual_tokens=10" in msg and "8 rows" in msg
    msg = refused("bad_config", parse_peft_files, peft_files(t, token_dim=32), limits)
    assert "token_dim=32" in msg and "width 64" in msg


def test_load_path_refusals(tmp_path, limits, raw_bytes):
    for name in ("p.bin", "p.pt", "p.pth", "p.pkl"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        assert "never loaded" in refused("pickle_refused", load_path, tmp_path / name, limits)
    refused("missing_file", load_path, tmp_path / "nope.safetensors", limits)
    (tmp_path / "notes.txt").write_text("hi")
    refused("bad_kind", load_path, tmp_path / "notes.txt", limits)
    (tmp_path / "e.safetensors").write_bytes(b"")
    refused("empty", load_path, tmp_path / "e.safetensors", limits)
    (tmp_path / "big.safetensors").write_bytes(raw_bytes(torch.randn(8, 64)))
    msg = refused("too_large", load_path, tmp_path / "big.safetensors", Limits(hidden_size=64, max_bytes=100))
    assert "limit is 100 bytes" in msg
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04")
    refused("pickle_refused", load_path, adapter, limits)
    (adapter / "adapter_model.bin").unlink()
    refused("missing_file", load_path, adapter, limits)


def test_load_path_raw_and_dir(tmp_path, limits, raw_bytes, peft_files):
    t = torch.randn(3, 64, dtype=torch.bfloat16)
    (tmp_path / "r.safetensors").write_bytes(raw_bytes(t))
    parsed = load_path(tmp_path / "r.safetensors", limits)
    assert parsed.peft_type == "RAW" and parsed.config is None and torch.equal(parsed.embeddings, t)
    (tmp_path / "d").mkdir()
    for name, data in peft_files(t.float()).items():
        (tmp_path / "d" / name).write_bytes(data)
    assert torch.equal(load_path(tmp_path / "d", limits).embeddings, t.float())


def test_parse_upload_kinds(limits, raw_bytes):
    t = torch.randn(4, 64)
    assert torch.equal(parse_upload("p.SAFETENSORS", raw_bytes(t), limits).embeddings, t)
    refused("empty", parse_upload, "p.safetensors", b"", limits)
    refused("empty", parse_upload, "", b"", limits)
    for name in ("adapter_model.bin", "x.pt", "x.pth", "x.pkl"):
        assert "never loaded" in refused("pickle_refused", parse_upload, name, b"\x80\x04data", limits)
    msg = refused("bad_kind", parse_upload, "p.npy", b"\x93NUMPY", limits)
    assert ".safetensors" in msg and ".zip" in msg and ".tar.gz" in msg
