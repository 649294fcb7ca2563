"""Hot reload: files added, replaced, broken and removed while the store watches are served within 2 s."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from prompt_store.registry import PromptRegistry
from prompt_store.store import PromptStore

DEADLINE_S = 2.0


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loads: list[tuple[str, str, int]] = []
        self.errors: list[tuple[str, str]] = []
        self.removes: list[str] = []

    def kwargs(self) -> dict:
        def on_load(p, action):
            with self.lock:
                self.loads.append((p.task, action, p.version))

        def on_error(entry, exc):
            with self.lock:
                self.errors.append((entry, getattr(exc, "reason", type(exc).__name__)))

        def on_remove(task):
            with self.lock:
                self.removes.append(task)

        return {"on_load": on_load, "on_error": on_error, "on_remove": on_remove}


def atomic_write(path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def watched(request, tmp_path, limits):
    events, reg = Events(), PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, poll=request.param, **events.kwargs())
    store.scan()
    assert store.start_watching(timeout=5.0) is True
    yield store, reg, events, tmp_path
    store.stop()
    assert store._thread is None


def same(reg, task, t) -> bool:
    p = reg.get(task)
    return p is not None and p.embeddings.shape == t.shape and torch.equal(p.embeddings, t)


def test_add_replace_break_remove(watched, wait_for, raw_bytes):
    store, reg, events, d = watched
    a, b = torch.randn(8, 64), torch.randn(4, 64)
    atomic_write(d / "qa.safetensors", raw_bytes(a))
    wait_for(lambda: same(reg, "qa", a), DEADLINE_S, "add")
    assert reg.get("qa").version == 1
    (d / "qa.safetensors").write_bytes(raw_bytes(b))  # in-place, non-atomic rewrite
    wait_for(lambda: same(reg, "qa", b), DEADLINE_S, "replace")
    good = reg.get("qa")
    assert good.version == 2
    atomic_write(d / "qa.safetensors", raw_bytes(torch.randn(8, 640)))  # another model's prompt
    wait_for(lambda: ("qa.safetensors", "bad_shape") in events.errors, DEADLINE_S, "bad file reported")
    assert reg.get("qa") is good  # the good version keeps serving
    os.unlink(d / "qa.safetensors")
    wait_for(lambda: "qa" not in reg, DEADLINE_S, "remove")
    # callbacks run after the store lock is released (and after the version book is written): wait for them too
    wait_for(lambda: events.removes == ["qa"], DEADLINE_S, "remove callback")
    atomic_write(d / "qa.safetensors", raw_bytes(a))
    wait_for(lambda: same(reg, "qa", a), DEADLINE_S, "re-add")
    assert reg.get("qa").version == 3  # versions never go backwards


def test_peft_directory_add_and_remove(watched, wait_for, peft_files):
    store, reg, events, d = watched
    t = torch.randn(5, 64)
    staging = d / ".staging"
    staging.mkdir()
    for name, data in peft_files(t).items():
        (staging / name).write_bytes(data)
    os.rename(staging, d / "ptask")
    wait_for(lambda: same(reg, "ptask", t), DEADLINE_S, "peft dir add")
    assert reg.get("ptask").peft_type == "PROMPT_TUNING"
    shutil.rmtree(d / "ptask")
    wait_for(lambda: "ptask" not in reg, DEADLINE_S, "peft dir remove")


def test_upload_while_watching_is_not_disturbed_by_its_own_echo(watched, raw_bytes):
    store, reg, events, d = watched
    t = torch.randn(8, 64)
    prompt, action = store.upload("up", "p.safetensors", raw_bytes(t))
    assert action == "created" and reg.get("up") is prompt  # servable when upload returns
    time.sleep(0.6)  # let the watcher see the upload's own writes
    assert reg.get("up") is prompt and prompt.version == 1
    assert events.loads == [("up", "created", 1)] and events.errors == []
    assert store.delete("up") is True
    time.sleep(0.6)
    assert "up" not in reg and events.removes == ["up"]


def test_changes_between_scan_and_watch_are_picked_up(tmp_path, limits, raw_bytes, wait_for):
    reg = PromptRegistry()
    a, b = torch.randn(8, 64), torch.randn(8, 64)
    (tmp_path / "early.safetensors").write_bytes(raw_bytes(a))
    (tmp_path / "gone.safetensors").write_bytes(raw_bytes(a))
    store = PromptStore(tmp_path, reg, limits)
    assert store.scan() == {"loaded": 2, "errors": 0}
    (tmp_path / "late.safetensors").write_bytes(raw_bytes(b))  # after scan, before the watch is live
    (tmp_path / "gone.safetensors").unlink()
    try:
        assert store.start_watching() is True
        wait_for(lambda: same(reg, "late", b) and "gone" not in reg, DEADLINE_S, "resync")
        assert same(reg, "early", a) and reg.get("early").version == 1
    finally:
        store.stop()


def test_watcher_survives_failing_callbacks(tmp_path, limits, raw_bytes, wait_for):
    calls: list[str] = []

    def on_load(prompt, action):
        calls.append(prompt.task)
        raise RuntimeError("metrics backend down")

    reg = PromptRegistry()
    store = PromptStore(tmp_path, reg, limits, on_load=on_load)
    assert store.start_watching() is True
    try:
        atomic_write(tmp_path / "one.safetensors", raw_bytes(torch.randn(2, 64)))
        wait_for(lambda: "one" in reg, DEADLINE_S, "first load")
        atomic_write(tmp_path / "two.safetensors", raw_bytes(torch.randn(2, 64)))
        wait_for(lambda: "two" in reg, DEADLINE_S, "load after a callback raised")
        wait_for(lambda: calls == ["one", "two"], DEADLINE_S, "callback after a callback raised")
        assert store._thread.is_alive()
    finally:
        store.stop()


def test_watcher_survives_its_directory_being_deleted(tmp_path, limits, raw_bytes, wait_for):
    directory = tmp_path / "prompts"
    directory.mkdir()
    (directory / "a.safetensors").write_bytes(raw_bytes(torch.randn(2, 64)))
    events, reg = Events(), PromptRegistry()
    store = PromptStore(directory, reg, limits, **events.kwargs())
    assert store.scan() == {"loaded": 1, "errors": 0}
    assert store.start_watching() is True
    try:
        shutil.rmtree(directory)
        wait_for(lambda: "a" not in reg, DEADLINE_S, "tasks of the deleted directory removed")
        wait_for(directory.is_dir, DEADLINE_S, "directory re-created by the watcher")
        time.sleep(0.3)  # let the new watch settle, then use the new directory
        b = torch.randn(3, 64)
        atomic_write(directory / "b.safetensors", raw_bytes(b))
        wait_for(lambda: same(reg, "b", b), DEADLINE_S, "load in the re-created directory")
        assert store._thread.is_alive() and events.removes == ["a"]
    finally:
        store.stop()
