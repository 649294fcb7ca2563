"""The version book (prompt_store.versions): versions survive restarts, are never reused; a bad book is not fatal."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch

from prompt_store.registry import PromptRegistry, tensor_sha256
from prompt_store.store import PromptStore
from prompt_store.versions import BOOK_NAME, VersionBook


def restart(directory, limits, **kw) -> tuple[PromptStore, PromptRegistry]:
    """A fresh store and registry on ``directory``, scanned: what a restarted server sees."""
    reg = PromptRegistry()
    store = PromptStore(directory, reg, limits, **kw)
    store.scan()
    return store, reg


def book(directory) -> dict:
    return json.loads((directory / BOOK_NAME).read_text())


def tensors(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(4, 64, generator=g) for _ in range(n)]


def test_same_content_keeps_its_version_across_a_restart(tmp_path, limits, raw_bytes):
    a, b, c = tensors(3)
    store = PromptStore(tmp_path, PromptRegistry(), limits)
    assert [store.upload("qa", "p.safetensors", raw_bytes(t))[0].version for t in (a, b, c)] == [1, 2, 3]
    assert store.upload("other", "p.safetensors", raw_bytes(a))[0].version == 1
    assert book(tmp_path) == {"format": 1, "tasks": {
        "other": {"sha256": tensor_sha256(a), "version": 1, "high_water": 1},
        "qa": {"sha256": tensor_sha256(c), "version": 3, "high_water": 3},
    }}
    _, reg = restart(tmp_path, limits)
    assert (reg.get("qa").version, reg.get("qa").sha256, reg.get("other").version) == (3, tensor_sha256(c), 1)
    _, reg = restart(tmp_path, limits)  # and again: nothing drifts
    assert (reg.get("qa").version, reg.get("other").version) == (3, 1)


def test_content_changed_while_down_gets_high_water_plus_one(tmp_path, limits, raw_bytes):
    a, b, c = tensors(3)
    store = PromptStore(tmp_path, PromptRegistry(), limits)
    store.upload("qa", "p.safetensors", raw_bytes(a))
    store.upload("qa", "p.safetensors", raw_bytes(b))  # v2
    store.upload("qa", "p.safetensors", raw_bytes(a))  # v3: back to a's bytes, still a new version
    (tmp_path / "qa.safetensors").write_bytes(raw_bytes(c))  # edited while the server is down
    store, reg = restart(tmp_path, limits)
    assert reg.get("qa").version == 4
    assert book(tmp_path)["tasks"]["qa"] == {"sha256": tensor_sha256(c), "version": 4, "high_water": 4}
    (tmp_path / "qa.safetensors").write_bytes(raw_bytes(b))  # b was v2 once: it still gets a new version
    assert store.reconcile("qa") == "replaced" and reg.get("qa").version == 5


def test_deleted_then_re_added_task_never_reuses_a_version(tmp_path, limits, raw_bytes):
    (a,) = tensors(1)
    store = PromptStore(tmp_path, PromptRegistry(), limits)
    store.upload("qa", "p.safetensors", raw_bytes(a))
    assert store.delete("qa") is True
    assert book(tmp_path)["tasks"]["qa"] == {"sha256": None, "version": None, "high_water": 1}
    assert store.upload("qa", "p.safetensors", raw_bytes(a))[0].version == 2  # same bytes, new version
    _, reg = restart(tmp_path, limits)
    assert reg.get("qa").version == 2
    # deleted while the server was down: the next scan spends the version, the re-add gets a new one
    (tmp_path / "qa.safetensors").unlink()
    store, reg = restart(tmp_path, limits)
    assert "qa" not in reg and book(tmp_path)["tasks"]["qa"] == {"sha256": None, "version": None, "high_water": 2}
    (tmp_path / "qa.safetensors").write_bytes(raw_bytes(a))
    assert store.reconcile("qa") == "created" and reg.get("qa").version == 3
    # a file removed while running (the watcher's path) is forgotten too
    (tmp_path / "qa.safetensors").unlink()
    assert store.reconcile("qa") == "removed" and book(tmp_path)["tasks"]["qa"]["sha256"] is None
    (tmp_path / "qa.safetensors").write_bytes(raw_bytes(a))
    assert store.reconcile("qa") == "created" and reg.get("qa").version == 4


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"format": 99, "tasks": {}}', b"\xff\xfe"])
def test_corrupt_book_is_reported_counted_and_rewritten(tmp_path, limits, raw_bytes, caplog, content):
    a, b = tensors(2)
    store = PromptStore(tmp_path, PromptRegistry(), limits)
    store.upload("qa", "p.safetensors", raw_bytes(a))
    store.upload("qa", "p.safetensors", raw_bytes(b))  # v2
    (tmp_path / BOOK_NAME).write_bytes(content)
    errors: list[tuple[str, str]] = []
    with caplog.at_level(logging.WARNING, logger="prompt_store"):
        store, reg = restart(tmp_path, limits, on_error=lambda e, exc: errors.append((e, exc.reason)))
    assert reg.get("qa").version == 1  # versions restart from the files
    assert errors == [(BOOK_NAME, "bad_version_book")]
    assert any("version book" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert book(tmp_path)["tasks"]["qa"] == {"sha256": tensor_sha256(b), "version": 1, "high_water": 1}
    store.reconcile("qa")
    assert errors == [(BOOK_NAME, "bad_version_book")]  # reported once


def test_malformed_entries_are_dropped_alone(tmp_path, limits, raw_bytes):
    a, b = tensors(2)
    for name, t in (("qa", a), ("zz", b)):
        (tmp_path / f"{name}.safetensors").write_bytes(raw_bytes(t))
    good = {"sha256": tensor_sha256(a), "version": 5, "high_water": 7}
    bad = {"sha256": tensor_sha256(b), "version": 9, "high_water": 3}  # version above high_water
    (tmp_path / BOOK_NAME).write_text(json.dumps({"format": 1, "tasks": {"qa": good, "zz": bad, "../x": good}}))
    errors: list[str] = []
    _, reg = restart(tmp_path, limits, on_error=lambda e, exc: errors.append(str(exc)))
    assert (reg.get("qa").version, reg.get("zz").version) == (5, 1)
    assert errors == ["2 malformed entries dropped"]
    assert sorted(book(tmp_path)["tasks"]) == ["qa", "zz"]


def test_missing_book_is_logged_only_when_prompts_exist(tmp_path, limits, raw_bytes, caplog):
    (a,) = tensors(1)
    with caplog.at_level(logging.INFO, logger="prompt_store"):
        store, _ = restart(tmp_path, limits)
        store.upload("qa", "p.safetensors", raw_bytes(a))
    assert [r for r in caplog.records if r.getMessage().startswith("version book")] == []
    (tmp_path / BOOK_NAME).unlink()
    with caplog.at_level(logging.INFO, logger="prompt_store"):
        _, reg = restart(tmp_path, limits)
    assert reg.get("qa").version == 1
    missing = [r for r in caplog.records if r.getMessage().startswith("version book")]
    # INFO, not a warning: a first start on a directory of prompts (e.g. make serve's examples) has no book yet
    assert [(r.levelno, r.getMessage().split(";")[0]) for r in missing] == [
        (logging.INFO, f"version book {tmp_path / BOOK_NAME} is missing (a first start?)")]


def test_failed_book_write_keeps_the_upload_and_is_reported(tmp_path, limits, raw_bytes, monkeypatch):
    a, b, c = tensors(3)
    errors: list[tuple[str, str]] = []
    store = PromptStore(tmp_path, PromptRegistry(), limits, on_error=lambda e, exc: errors.append((e, repr(exc))))
    store.upload("qa", "p.safetensors", raw_bytes(a))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("prompt_store.versions.replace_file", full)
    prompt, action = store.upload("qa", "p.safetensors", raw_bytes(b))
    assert (action, prompt.version) == ("replaced", 2) and store.get("qa") is prompt
    assert errors == [(BOOK_NAME, "OSError(28, 'No space left on device')")]
    assert book(tmp_path)["tasks"]["qa"]["version"] == 1  # the old book is intact
    store.reconcile("qa")
    store.scan()
    assert len(errors) == 1  # no retry (and no new error) until something changes
    monkeypatch.undo()
    store.reconcile("qa")
    assert book(tmp_path)["tasks"]["qa"]["version"] == 1
    store.upload("other", "p.safetensors", raw_bytes(c))  # the next change writes everything pending
    assert book(tmp_path)["tasks"] == {
        "other": {"sha256": tensor_sha256(c), "version": 1, "high_water": 1},
        "qa": {"sha256": tensor_sha256(b), "version": 2, "high_water": 2},
    }


def test_leftover_book_temp_file_is_removed_by_scan(tmp_path, limits):
    leftover = tmp_path / ".versions.json.tmp-0123456789abcdef"
    leftover.write_bytes(b"{")
    restart(tmp_path, limits)
    assert not leftover.exists()


def test_memory_only_store_has_no_book(limits, raw_bytes):
    a, b = tensors(2)
    store = PromptStore(None, PromptRegistry(), limits)
    assert [store.upload("qa", "p.safetensors", raw_bytes(t))[0].version for t in (a, b)] == [1, 2]
    store.delete("qa")
    assert store.upload("qa", "p.safetensors", raw_bytes(a))[0].version == 3


def test_version_book_unit(tmp_path):
    vb = VersionBook(tmp_path)
    vb.load()
    sha_a, sha_b = "a" * 64, "b" * 64
    assert vb.version_for("qa", sha_a) == 1 and vb.flush() is False  # asking records nothing
    vb.record("qa", sha_a, 1)
    assert vb.version_for("qa", sha_a) == 1 and vb.version_for("qa", sha_b) == 2
    assert vb.version_for("qa", sha_a, floor=1) == 2  # already issued in this process: a new version
    with pytest.raises(ValueError, match="expected a version >= 1"):
        vb.record("qa", sha_a, 0)
    assert vb.flush() is True and vb.flush() is False
    again = VersionBook(tmp_path)
    again.load()
    assert again.get("qa").to_json() == {"sha256": sha_a, "version": 1, "high_water": 1}


def test_upload_and_book_are_plain_mode_under_umask_022(tmp_path, limits, raw_bytes, peft_files, make_zip):
    a, b = tensors(2)
    old = os.umask(0o022)
    try:
        store = PromptStore(tmp_path, PromptRegistry(), limits)
        store.upload("raw", "p.safetensors", raw_bytes(a))
        store.upload("peft", "a.zip", make_zip(peft_files(b)))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {BOOK_NAME: 0o644, "raw.safetensors": 0o644, "peft": 0o755,
                     "peft/adapter_config.json": 0o644, "peft/adapter_model.safetensors": 0o644}
