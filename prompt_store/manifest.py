"""Key layout and manifest format of the shared (object-store) prompt store, :mod:`prompt_store.remote`.

Under the store's root (``s3://bucket/prefix``)::

    objects/<task>/<sha256 of the object's bytes>.safetensors   RAW prompt: the uploaded bytes as they were
    objects/<task>/<sha256 of the object's bytes>.tar           PEFT prompt: adapter_config.json +
                                                                adapter_model.safetensors (re-serialized)
    manifests/<task>/<version:010d>.live.json                   "task serves this object as <version>"
    manifests/<task>/<version:010d>.gone.json                   tombstone: "task deleted after <version>"

Objects are content-addressed and written first; a manifest is written after its object, with an exclusive
create (S3 ``If-None-Match: *``), so exactly one writer gets each ``(task, version, kind)``. A task's state is
its *newest* manifest, ordered by ``(version, kind)`` with ``gone`` after ``live``: a tombstone for version 3
hides ``3.live``, and a re-upload after it becomes version 4. Readers only ever follow manifests, so an object
without a manifest is invisible. Older manifests are removed after each write; the newest always stays (a
tombstone keeps the task's high-water version, so a deleted task never reuses a version).

A live manifest (UTF-8 JSON object, at most :data:`MAX_MANIFEST_BYTES`)::

    {"format": 1, "task": "qa", "version": 4, "object": "objects/qa/<64 hex>.tar", "object_bytes": 12800,
     "object_sha256": "<64 hex>", "sha256": "<tensor_sha256>", "peft_type": "PROMPT_TUNING",
     "written_at": 1764892800.5}

A tombstone: ``{"format": 1, "task": "qa", "version": 4, "deleted": true, "written_at": ...}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import asdict, dataclass

import safetensors.torch

from prompt_store.formats import PEFT_CONFIG, PEFT_KEY, PEFT_WEIGHTS, TASK_NAME_RE, ParsedPrompt

#: ``format`` of the manifests this module writes and reads.
MANIFEST_FORMAT = 1
#: Largest manifest read, bytes (a manifest is about 400).
MAX_MANIFEST_BYTES = 64 * 1024
MANIFESTS, OBJECTS = "manifests", "objects"
LIVE, GONE = "live", "gone"
_KIND_RANK = {LIVE: 0, GONE: 1}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEY_RE = re.compile(rf"{MANIFESTS}/(?P<task>[^/]+)/(?P<version>\d{{10}})\.(?P<kind>live|gone)\.json")

#: Reasons :class:`StoreObjectError` is raised with (reported through ``on_error`` and counted by the server).
REMOTE_REASONS: dict[str, str] = {
    "bad_manifest": "a manifest of the shared prompt store is not valid JSON, lacks a field, or disagrees with "
    "its key",
    "bad_object": "a prompt object of the shared store does not match its manifest (size, sha256 or content)",
    "missing_object": "a manifest of the shared store names an object that does not exist",
}


class StoreObjectError(ValueError):
    """A manifest or object of the shared prompt store was refused; ``reason`` is a key of :data:`REMOTE_REASONS`.

    Raises:
        KeyError: (from the constructor) an unknown reason, a programming error.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        if reason not in REMOTE_REASONS:
            raise KeyError(f"unknown StoreObjectError reason {reason!r}; expected one of {sorted(REMOTE_REASONS)}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, order=True)
class ManifestKey:
    """A manifest's key, parsed. Sorts in the order that decides a task's state (newest last)."""

    task: str
    version: int
    rank: int  # 0 live, 1 gone

    @property
    def kind(self) -> str:
        """``"live"`` or ``"gone"``."""
        return GONE if self.rank else LIVE

    @property
    def key(self) -> str:
        """The key relative to the store's root."""
        return manifest_key(self.task, self.version, self.kind)


def manifest_key(task: str, version: int, kind: str) -> str:
    """``manifests/<task>/<version:010d>.<kind>.json`` (``kind`` ``"live"`` or ``"gone"``)."""
    return f"{MANIFESTS}/{task}/{version:010d}.{kind}.json"


def parse_manifest_key(key: str) -> ManifestKey | None:
    """The parsed key, or ``None`` when ``key`` is not a manifest key of a valid task name and version >= 1."""
    m = _MANIFEST_KEY_RE.fullmatch(key)
    if m is None or not TASK_NAME_RE.fullmatch(m["task"]) or int(m["version"]) < 1:
        return None
    return ManifestKey(m["task"], int(m["version"]), _KIND_RANK[m["kind"]])


def newest_by_task(keys) -> dict[str, ManifestKey]:
    """Each task's newest manifest among ``keys`` (strings; non-manifest keys are skipped)."""
    out: dict[str, ManifestKey] = {}
    for key in keys:
        parsed = parse_manifest_key(key)
        if parsed is not None and (parsed.task not in out or parsed > out[parsed.task]):
            out[parsed.task] = parsed
    return out


@dataclass(frozen=True)
class Manifest:
    """A live manifest (see the module docstring for each field)."""

    task: str
    version: int
    object: str
    object_bytes: int
    object_sha256: str
    sha256: str
    peft_type: str
    written_at: float

    def to_bytes(self) -> bytes:
        """The manifest as stored (UTF-8 JSON)."""
        return json.dumps({"format": MANIFEST_FORMAT, **asdict(self)}, sort_keys=True).encode()


def tombstone_bytes(task: str, version: int) -> bytes:
    """The body of the tombstone ``manifests/<task>/<version>.gone.json``."""
    doc = {"format": MANIFEST_FORMAT, "task": task, "version": version, "deleted": True, "written_at": time.time()}
    return json.dumps(doc, sort_keys=True).encode()


def _bad(key: str, why: str) -> StoreObjectError:
    return StoreObjectError(f"manifest {key} {why}", reason="bad_manifest")


def parse_manifest(mkey: ManifestKey, data: bytes) -> Manifest:
    """Parse and check the live manifest stored at ``mkey``.

    Raises:
        StoreObjectError: reason ``"bad_manifest"``: over :data:`MAX_MANIFEST_BYTES`, not a JSON object of format
            :data:`MANIFEST_FORMAT`, a field missing or of the wrong type, ``task``/``version`` not those of the
            key, or ``object`` not under ``objects/<task>/``.
    """
    key = mkey.key
    if len(data) > MAX_MANIFEST_BYTES:
        raise _bad(key, f"is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(key, f"is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _bad(key, f"expected a JSON object with format {MANIFEST_FORMAT}, got {got!r}")
    types = {"task": str, "version": int, "object": str, "object_bytes": int, "object_sha256": str, "sha256": str,
             "peft_type": str, "written_at": (int, float)}
    for name, typ in types.items():
        value = doc.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise _bad(key, f"field {name!r}: expected {getattr(typ, '__name__', 'a number')}, got {value!r}")
    if doc["task"] != mkey.task or doc["version"] != mkey.version:
        raise _bad(key, f"names task {doc['task']!r} version {doc['version']}; expected {mkey.task!r} "
                        f"version {mkey.version} as in its key")
    prefix = f"{OBJECTS}/{mkey.task}/"
    if not doc["object"].startswith(prefix) or "/" in doc["object"][len(prefix):]:
        raise _bad(key, f"object {doc['object']!r}: expected a key directly under {prefix}")
    for name in ("object_sha256", "sha256"):
        if not _HEX64.fullmatch(doc[name]):
            raise _bad(key, f"field {name!r}: expected 64 lowercase hex digits, got {doc[name]!r}")
    return Manifest(**{name: doc[name] for name in types})


def encode_object(parsed: ParsedPrompt, data: bytes) -> tuple[str, bytes]:
    """The object a validated upload is stored as: ``(file name suffix, bytes)``.

    RAW: ``(".safetensors", data)``, the uploaded bytes unchanged. PEFT: ``(".tar", tar)``, an uncompressed tar
    holding ``adapter_config.json`` (``parsed.config``) and ``adapter_model.safetensors`` re-serialized from the
    validated tensor, as :func:`prompt_store.diskio.write_peft` writes a directory; it reads back through
    :func:`prompt_store.formats.parse_upload` like an uploaded archive.
    """
    if parsed.peft_type == "RAW":
        return ".safetensors", data
    files = {
        PEFT_CONFIG: json.dumps(parsed.config, indent=2, sort_keys=True).encode() + b"\n",
        PEFT_WEIGHTS: safetensors.torch.save({PEFT_KEY: parsed.embeddings}, metadata={"format": "pt"}),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o644, 0
            tar.addfile(info, io.BytesIO(body))
    return ".tar", buf.getvalue()


def object_key(task: str, suffix: str, body: bytes) -> tuple[str, str]:
    """``(key, sha256 hex of body)``: the content address of an object of ``task``."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{OBJECTS}/{task}/{digest}{suffix}", digest
