"""The shared (object-store) prompt store on ``memory://`` and ``file://``: two stores on one URL stand for two
replicas. Upload, replace, delete, versions, manifest-first reads, corrupt objects, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from prompt_store.errors import PromptError
from prompt_store.location import normalize_location, open_blobs, open_store
from prompt_store.manifest import Manifest, manifest_key, parse_manifest_key
from prompt_store.registry import PromptRegistry, tensor_sha256
from prompt_store.remote import RemoteStore
from prompt_store.store import PromptStore


class Recorder:
    def __init__(self) -> None:
        self.loads: list[tuple[str, str, int]] = []
        self.errors: list[tuple[str, str]] = []
        self.removes: list[str] = []

    def kwargs(self) -> dict:
        return {
            "on_load": lambda p, action: self.loads.append((p.task, action, p.version)),
            "on_error": lambda entry, exc: self.errors.append((entry, getattr(exc, "reason", type(exc).__name__))),
            "on_remove": self.removes.append,
        }


@pytest.fixture
def url():
    """A fresh memory:// root, wiped afterwards (the memory file system is one per process)."""
    root = f"memory://prompt-tests/{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def replica(url, limits):
    """``replica()`` -> (RemoteStore, Recorder) on the shared URL, with its own registry."""

    def make(poll_interval: float = 0.05):
        rec = Recorder()
        store = open_store(url, PromptRegistry(), limits, poll_interval=poll_interval, **rec.kwargs())
        assert isinstance(store, RemoteStore)
        return store, rec

    return make


def emb(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def keys(store: RemoteStore, prefix: str) -> list[str]:
    return sorted(store.blobs.find(prefix))


def test_location_parsing(tmp_path):
    assert normalize_location(None) is None
    assert normalize_location(str(tmp_path)) == tmp_path
    assert normalize_location(tmp_path) == tmp_path
    assert normalize_location("S3://bucket/prefix") == "s3://bucket/prefix"
    assert normalize_location("memory://x") == "memory://x"
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'gs' in 'gs://b/p'; expected a directory path "
                                         r"or an s3://bucket/prefix, file:///dir or memory://name URL"):
        normalize_location("gs://b/p")
    with pytest.raises(ValueError, match="'s3://' names no bucket"):
        normalize_location("s3://")


def test_factory_picks_the_store_by_location(tmp_path, limits):
    assert isinstance(open_store(tmp_path, PromptRegistry(), limits), PromptStore)
    assert isinstance(open_store(str(tmp_path), PromptRegistry(), limits), PromptStore)
    assert open_store(None, PromptRegistry(), limits).directory is None
    remote = open_store(f"file://{tmp_path}/shared", PromptRegistry(), limits)
    assert isinstance(remote, RemoteStore) and remote.directory == f"file://{tmp_path}/shared"
    with pytest.raises(ValueError, match="poll_interval must be above 0 seconds, got 0"):
        open_store("memory://x", PromptRegistry(), limits, poll_interval=0)


def test_upload_is_served_by_the_other_replica_with_the_same_version(replica, raw_bytes):
    a, rec_a = replica()
    b, rec_b = replica()
    assert a.scan() == {"loaded": 0, "errors": 0} and b.scan() == {"loaded": 0, "errors": 0}
    t = emb(4, 0)
    prompt, action = a.upload("qa", "qa.safetensors", raw_bytes(t))
    assert (action, prompt.version, prompt.sha256) == ("created", 1, tensor_sha256(t))
    assert a.get("qa") is prompt and b.get("qa") is None
    assert b.scan() == {"loaded": 1, "errors": 0}
    got = b.get("qa")
    assert got.version == 1 and got.sha256 == prompt.sha256 and torch.equal(got.embeddings, t)
    assert rec_b.loads == [("qa", "created", 1)] and rec_a.loads == [("qa", "created", 1)]
    # layout: one content-addressed object, one manifest at version 1
    body = raw_bytes(t)
    assert keys(a, "objects") == [f"objects/qa/{hashlib.sha256(body).hexdigest()}.safetensors"]
    assert keys(a, "manifests") == ["manifests/qa/0000000001.live.json"]
    assert b.scan() == {"loaded": 1, "errors": 0} and rec_b.loads == [("qa", "created", 1)]  # re-read: silent


def test_replace_unchanged_delete_and_versions(replica, raw_bytes, peft_files, make_zip, monkeypatch):
    a, _ = replica()
    b, rec_b = replica()
    t1, t2 = emb(4, 1), emb(6, 2)
    assert a.upload("qa", "qa.safetensors", raw_bytes(t1))[0].version == 1
    # same tensor in another file form: unchanged, version kept, nothing written
    p, action = b.upload("qa", "qa.zip", make_zip(peft_files(t1)))
    assert (action, p.version) == ("unchanged", 1)
    assert keys(a, "manifests") == ["manifests/qa/0000000001.live.json"]
    # a change through the other replica: high-water + 1; the old manifest is collected, the old object only
    # once it is older than the grace period
    p, action = b.upload("qa", "qa.zip", make_zip(peft_files(t2)))
    assert (action, p.version, p.peft_type) == ("replaced", 2, "PROMPT_TUNING")
    assert keys(a, "manifests") == ["manifests/qa/0000000002.live.json"]
    assert [k.rsplit(".", 1)[-1] for k in keys(a, "objects")] == ["safetensors", "tar"]
    monkeypatch.setattr("prompt_store.remote.GC_GRACE_SECONDS", -1.0)
    a.scan()
    assert a.get("qa").version == 2 and torch.equal(a.get("qa").embeddings, t2)
    # delete through A: a tombstone; B drops it at its next poll; the object is gone
    assert a.delete("qa") is True and a.get("qa") is None
    assert keys(a, "manifests") == ["manifests/qa/0000000002.gone.json"] and keys(a, "objects") == []
    b.scan()
    assert b.get("qa") is None and rec_b.removes == ["qa"]
    assert a.delete("qa") is False
    # re-added with the very first content: a deleted task never reuses a version
    p, action = b.upload("qa", "qa.safetensors", raw_bytes(t1))
    assert (action, p.version) == ("created", 3)
    # a fresh replica (a restart) gets the writer's versions
    c, _ = replica()
    assert c.scan() == {"loaded": 1, "errors": 0} and c.get("qa").version == 3


def test_object_without_manifest_is_invisible(replica, raw_bytes):
    a, rec = replica()
    body = raw_bytes(emb(4, 3))
    a.blobs.put(f"objects/ghost/{hashlib.sha256(body).hexdigest()}.safetensors", body)
    a.blobs.put("manifests/ghost/notes.txt", b"not a manifest key")
    assert a.scan() == {"loaded": 0, "errors": 0} and a.get("ghost") is None and rec.errors == []


def _write_manifest(store: RemoteStore, task: str, version: int, obj: str, body: bytes, sha: str) -> str:
    m = Manifest(task=task, version=version, object=obj, object_bytes=len(body),
                 object_sha256=hashlib.sha256(body).hexdigest(), sha256=sha, peft_type="RAW", written_at=0.0)
    key = manifest_key(task, version, "live")
    assert store.blobs.create(key, m.to_bytes())
    return key


def test_corrupt_objects_are_skipped_counted_once_and_keep_the_good_version(replica, raw_bytes):
    a, rec_a = replica()
    b, rec_b = replica()
    good = emb(4, 4)
    a.upload("qa", "qa.safetensors", raw_bytes(good))
    b.scan()
    # a new version whose object is not a safetensors file at all (its manifest's digests are right)
    junk = b"\x00garbage that is not safetensors"
    k2 = _write_manifest(a, "qa", 2, "objects/qa/junk.safetensors", junk, "0" * 64)
    a.blobs.put("objects/qa/junk.safetensors", junk)
    # a new task whose object was changed after its manifest was written (digest mismatch)
    body = raw_bytes(emb(4, 5))
    k3 = _write_manifest(a, "other", 1, "objects/other/x.safetensors", body, tensor_sha256(emb(4, 5)))
    a.blobs.put("objects/other/x.safetensors", body[:-8] + b"tampered")
    # a manifest that is not JSON, and one naming a missing object
    assert a.blobs.create(manifest_key("third", 1, "live"), b"{not json")
    k5 = _write_manifest(a, "fourth", 1, "objects/fourth/missing.safetensors", body, tensor_sha256(emb(4, 5)))
    expected = sorted([(k2, "bad_safetensors"), (k3, "bad_object"), ("manifests/third/0000000001.live.json",
                                                                      "bad_manifest"), (k5, "missing_object")])
    for store, rec in ((a, rec_a), (b, rec_b)):
        assert store.scan() == {"loaded": 0, "errors": 4}  # the newest manifest of every task was refused
        assert sorted(rec.errors) == expected
        assert store.get("qa").version == 1 and torch.equal(store.get("qa").embeddings, good)
        assert store.get("other") is None and store.get("third") is None
        assert store.scan() == {"loaded": 0, "errors": 0}
        assert len(rec.errors) == 4  # reported once per manifest, not once per poll
    # fixing it (a real upload) serves the new content at the next free version on both
    p, _ = a.upload("qa", "qa.safetensors", raw_bytes(emb(4, 6)))
    assert p.version == 3
    b.scan()
    assert b.get("qa").version == 3


def test_concurrent_writers_never_share_a_version(replica, raw_bytes):
    stores = [replica()[0] for _ in range(4)]
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        p, _ = stores[i].upload("race", "r.safetensors", raw_bytes(emb(4, 100 + i)))
        with lock:
            results.append((p.version, p.sha256))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    versions = sorted(v for v, _ in results)
    assert versions == [1, 2, 3, 4]  # four different contents, four different versions
    winner = dict(results)[4]
    for s in stores:
        s.scan()
        assert s.get("race").version == 4 and s.get("race").sha256 == winner


def test_delete_and_readd_between_polls_gets_the_new_version(replica, raw_bytes):
    a, _ = replica()
    b, _ = replica()
    data = raw_bytes(emb(4, 7))
    a.upload("qa", "qa.safetensors", data)
    b.scan()
    a.delete("qa")
    assert a.upload("qa", "qa.safetensors", data)[0].version == 2
    b.scan()  # same content, new version: B follows the writer's version
    assert b.get("qa").version == 2


def test_rejected_upload_writes_nothing(replica):
    a, _ = replica()
    with pytest.raises(PromptError) as info:
        a.upload("qa", "qa.safetensors", b"not safetensors")
    assert info.value.reason == "bad_safetensors"
    with pytest.raises(PromptError, match="task name must match"):
        a.upload("../x", "x.safetensors", b"x")
    assert keys(a, "objects") == [] and keys(a, "manifests") == []


def test_polling_thread_picks_up_changes(replica, raw_bytes, wait_for):
    a, _ = replica(poll_interval=0.05)
    b, _ = replica(poll_interval=0.05)
    assert b.start_watching(timeout=5) is True
    try:
        a.upload("qa", "qa.safetensors", raw_bytes(emb(4, 8)))
        wait_for(lambda: b.get("qa") is not None, timeout=2, what="B serves the upload")
        a.delete("qa")
        wait_for(lambda: b.get("qa") is None, timeout=2, what="B drops the deleted task")
    finally:
        b.stop()
    assert b._thread is None


def test_file_url_store_and_manifest_names(tmp_path, limits, raw_bytes):
    url = f"file://{tmp_path}/shared"
    a = open_store(url, PromptRegistry(), limits)
    b = open_store(url, PromptRegistry(), limits)
    a.scan()
    a.upload("qa", "qa.safetensors", raw_bytes(emb(4, 9)))
    assert b.scan() == {"loaded": 1, "errors": 0} and b.get("qa").version == 1
    manifests = sorted(p.relative_to(tmp_path / "shared").as_posix()
                       for p in Path(tmp_path / "shared").rglob("*.json"))
    assert manifests == ["manifests/qa/0000000001.live.json"]
    doc = json.loads((tmp_path / "shared" / manifests[0]).read_bytes())
    assert doc["version"] == 1 and doc["peft_type"] == "RAW" and doc["format"] == 1
    # exclusive create on a local directory: a second writer of the same key loses
    blobs = open_blobs(url)
    assert blobs.create("manifests/qa/0000000001.live.json", b"{}") is False
    assert parse_manifest_key("manifests/qa/0000000001.gone.json").kind == "gone"


def test_reuploading_the_same_content_repairs_a_corrupt_object(replica, raw_bytes):
    a, _ = replica()
    b, rec_b = replica()
    data = raw_bytes(emb(4, 7))
    p1, action = a.upload("qa", "qa.safetensors", data)
    assert (action, p1.version) == ("created", 1)
    (key,) = [k for k in a.blobs.find("objects") if k.startswith("objects/qa/")]
    a.blobs.put(key, b"corrupted in place")  # the object rots after its manifest was written
    assert b.scan() == {"loaded": 0, "errors": 1} and rec_b.errors[0][1] == "bad_object"
    p2, action = a.upload("qa", "qa.safetensors", data)  # the same file again: not "unchanged", a repair
    assert (action, p2.version) == ("replaced", 2)
    assert b.scan()["loaded"] == 1 and b.get("qa").version == 2 and torch.equal(b.get("qa").embeddings, emb(4, 7))
    _, action = a.upload("qa", "qa.safetensors", data)  # now it is intact: unchanged
    assert action == "unchanged"
