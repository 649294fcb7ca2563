"""The prompt directory store without the watcher: scan, reconcile, upload, delete (cases C6, C7)."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from prompt_store.errors import PromptError
from prompt_store.registry import PromptRegistry
from prompt_store.store import PromptStore, task_for_entry


class Recorder:
    """Collects the store's callbacks."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str, int]] = []
        self.errors: list[tuple[str, str]] = []
        self.removes: list[str] = []

    def kwargs(self) -> dict:
        return {
            "on_load": lambda p, action: self.loads.append((p.task, action, p.version)),
            "on_error": lambda entry, exc: self.errors.append(
                (entry, getattr(exc, "reason", type(exc).__name__))
            ),
            "on_remove": self.removes.append,
        }


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


def test_task_for_entry():
    assert task_for_entry("qa.safetensors") == "qa"
    assert task_for_entry("qa") == "qa"
    assert task_for_entry(".qa.tmp-0123456789abcdef") is None
    assert task_for_entry("") is None


def test_scan_loads_good_and_reports_bad(tmp_path, limits, raw_bytes, peft_files):
    good_raw, good_peft = torch.randn(8, 64), torch.randn(4, 64, dtype=torch.float16)
    (tmp_path / "good.safetensors").write_bytes(raw_bytes(good_raw))
    (tmp_path / "peft-task").mkdir()
    for name, data in peft_files(good_peft).items():
        (tmp_path / "peft-task" / name).write_bytes(data)
    (tmp_path / "wide.safetensors").write_bytes(raw_bytes(torch.randn(8, 128)))
    nan = torch.randn(2, 64)
    nan[0, 0] = float("nan")
    (tmp_path / "nan.safetensors").write_bytes(raw_bytes(nan))
    (tmp_path / "Bad.safetensors").write_bytes(raw_bytes(good_raw))
    (tmp_path / "model.bin").write_bytes(b"\x80\x04")
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "both.safetensors").write_bytes(raw_bytes(good_raw))
    (tmp_path / "both").mkdir()
    (tmp_path / ".partial.safetensors").write_bytes(b"junk")  # dot-entries are ignored
    (tmp_path / ".old-upload.tmp-0123456789abcdef").write_bytes(b"junk")  # own leftover: removed
    rec, reg = Recorder(), PromptRegistry()
    counts = PromptStore(tmp_path, reg, limits, **rec.kwargs()).scan()
    assert counts == {"loaded": 2, "errors": 7}
    assert sorted(rec.errors) == [
        ("Bad.safetensors", "bad_name"),
        ("README.md", "bad_name"),
        ("both", "ambiguous"),
        ("model.bin", "pickle_refused"),
        ("nan.safetensors", "non_finite"),
        ("no-config", "missing_file"),
        ("wide.safetensors", "bad_shape"),
    ]
    assert [p.task for p in reg.list()] == ["good", "peft-task"]
    assert torch.equal(reg.get("good").embeddings, good_raw) and reg.get("good").peft_type == "RAW"
    assert torch.equal(reg.get("peft-task").embeddings, good_peft) and reg.get("peft-task").dtype == "float16"
    assert sorted(rec.loads) == [("good", "created", 1), ("peft-task", "created", 1)]
    assert (tmp_path / ".partial.safetensors").exists()
    assert not (tmp_path / ".old-upload.tmp-0123456789abcdef").exists()


def test_reconcile_keeps_good_on_bad_and_removes_when_gone(tmp_path, limits, raw_bytes):
    rec, reg = Recorder(), PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, **rec.kwargs())
    good = torch.randn(8, 64)
    path = tmp_path / "qa.safetensors"
    path.write_bytes(raw_bytes(good))
    assert store.reconcile("qa") == "created"
    assert store.reconcile("qa.safetensors") == "unchanged"
    held = reg.get("qa")
    path.write_bytes(raw_bytes(torch.randn(8, 65)))
    assert store.reconcile("qa.safetensors") == "error"
    assert reg.get("qa") is held and rec.errors == [("qa.safetensors", "bad_shape")]
    path.write_bytes(b"")
    assert store.reconcile("qa") == "error" and reg.get("qa") is held
    path.unlink()
    assert store.reconcile("qa") == "removed" and "qa" not in reg and rec.removes == ["qa"]
    assert store.reconcile("qa") == "absent" and rec.removes == ["qa"]
    assert store.reconcile(".qa.tmp-1") == "ignored"


def test_upload_raw_is_servable_and_reloadable(tmp_path, limits, raw_bytes):
    rec, reg = Recorder(), PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, **rec.kwargs())
    t = torch.randn(12, 64, dtype=torch.bfloat16)
    prompt, action = store.upload("qa", "mine.safetensors", raw_bytes(t))
    assert (
        action == "created" and reg.get("qa") is prompt and prompt.source == str(tmp_path / "qa.safetensors")
    )
    assert rec.loads == [("qa", "created", 1)]
    assert sorted(os.listdir(tmp_path)) == [".versions.json", "qa.safetensors"]  # no temp file left behind
    assert store.upload("qa", "again.safetensors", raw_bytes(t)) == (prompt, "unchanged")
    fresh = PromptRegistry()
    assert PromptStore(tmp_path, fresh, limits).scan() == {"loaded": 1, "errors": 0}
    assert torch.equal(fresh.get("qa").embeddings, t) and fresh.get("qa").sha256 == prompt.sha256


def test_upload_switches_form_and_removes_the_other(
    tmp_path, limits, raw_bytes, peft_files, make_zip, make_tar
):
    reg = PromptRegistry()
    store = PromptStore(tmp_path, reg, limits)
    a, b = torch.randn(3, 64), torch.randn(5, 64)
    store.upload("qa", "a.zip", make_zip(peft_files(a)))
    assert sorted(os.listdir(tmp_path)) == [".versions.json", "qa"]
    assert sorted(os.listdir(tmp_path / "qa")) == ["adapter_config.json", "adapter_model.safetensors"]
    prompt, action = store.upload("qa", "b.safetensors", raw_bytes(b))
    assert action == "replaced" and prompt.version == 2
    assert sorted(os.listdir(tmp_path)) == [".versions.json", "qa.safetensors"]
    prompt, action = store.upload("qa", "a.tgz", make_tar({"d/" + k: v for k, v in peft_files(a).items()}))
    assert action == "replaced" and prompt.version == 3 and sorted(os.listdir(tmp_path)) == [".versions.json", "qa"]
    got = safetensors.torch.load_file(str(tmp_path / "qa" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(got, a)


@pytest.mark.parametrize(
    "task, filename, make, reason",
    [
        ("qa", "p.safetensors", lambda rb, pf, mz: rb(torch.randn(8, 128)), "bad_shape"),
        ("qa", "p.safetensors", lambda rb, pf, mz: rb(torch.randn(64)), "bad_shape"),
        ("qa", "p.safetensors", lambda rb, pf, mz: rb(torch.randn(2, 8, 64)), "bad_shape"),
        ("qa", "p.safetensors", lambda rb, pf, mz: rb(torch.full((8, 64), float("nan"))), "non_finite"),
        ("qa", "p.safetensors", lambda rb, pf, mz: b"", "empty"),
        ("qa", "p.bin", lambda rb, pf, mz: b"\x80\x04junk", "pickle_refused"),
        ("qa", "a.zip", lambda rb, pf, mz: mz({"adapter_model.safetensors": b"x"}), "missing_file"),
        (
            "qa",
            "a.zip",
            lambda rb, pf, mz: mz(pf(torch.randn(2, 64), peft_type="LORA")),
            "unsupported_peft_type",
        ),
        ("../qa", "p.safetensors", lambda rb, pf, mz: rb(torch.randn(8, 64)), "bad_name"),
        ("a/b", "p.safetensors", lambda rb, pf, mz: rb(torch.randn(8, 64)), "bad_name"),
    ],
)
def test_rejected_upload_changes_nothing(
    tmp_path, limits, raw_bytes, peft_files, make_zip, task, filename, make, reason
):
    directory = tmp_path / "prompts"
    rec, reg = Recorder(), PromptRegistry()
    store = PromptStore(directory, reg, limits, **rec.kwargs())
    before_prompt, _ = store.upload("qa", "p.safetensors", raw_bytes(torch.randn(6, 64)))
    other, _ = store.upload("other", "o.zip", make_zip(peft_files(torch.randn(2, 64))))
    files_before = snapshot(tmp_path)
    with pytest.raises(PromptError) as info:
        store.upload(task, filename, make(raw_bytes, peft_files, make_zip))
    assert info.value.reason == reason
    assert snapshot(tmp_path) == files_before
    assert reg.get("qa") is before_prompt and reg.get("other") is other
    assert [p.task for p in reg.list()] == ["other", "qa"]
    assert rec.errors == [] and len(rec.loads) == 2


def test_delete(tmp_path, limits, raw_bytes):
    rec, reg = Recorder(), PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, **rec.kwargs())
    store.upload("qa", "p.safetensors", raw_bytes(torch.randn(6, 64)))
    assert store.delete("qa") is True
    assert os.listdir(tmp_path) == [".versions.json"] and "qa" not in reg and rec.removes == ["qa"]
    assert store.delete("qa") is False and rec.removes == ["qa"]
    with pytest.raises(PromptError) as info:
        store.delete("../qa")
    assert info.value.reason == "bad_name"


def test_memory_only_store(limits, raw_bytes):
    reg = PromptRegistry()
    store = PromptStore(None, reg, limits)
    assert store.scan() == {"loaded": 0, "errors": 0}
    assert store.start_watching() is False
    prompt, action = store.upload("qa", "p.safetensors", raw_bytes(torch.randn(6, 64)))
    assert action == "created" and prompt.source == "upload" and store.get("qa") is prompt
    assert store.list() == [prompt]
    assert store.reconcile("qa") == "ignored"
    assert store.delete("qa") is True and store.delete("qa") is False


def test_callback_exceptions_do_not_break_the_store(tmp_path, limits, raw_bytes):
    def boom(*args):
        raise RuntimeError("callback failure")

    reg = PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, on_load=boom, on_error=boom, on_remove=boom)
    store.upload("qa", "p.safetensors", raw_bytes(torch.randn(6, 64)))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert store.scan() == {"loaded": 1, "errors": 1}
    assert store.delete("qa") is True and len(reg) == 0
