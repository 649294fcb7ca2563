"""A few object-store operations over any fsspec file system, with the atomicity the shared store needs.

:class:`Blobs` wraps one fsspec file system and a root path (``s3://bucket/prefix`` -> bucket ``bucket``, root
``bucket/prefix``). Keys are ``/``-separated paths relative to the root. What each backend guarantees:

=================  =====================================  ==============================================
operation          S3 (s3fs)                              ``memory://``, ``file://``
=================  =====================================  ==============================================
:meth:`put`        one PutObject (atomic)                 memory: one dict store; file: temp + rename
:meth:`create`     PutObject with ``If-None-Match: *``    memory: under a process lock; file: temp +
                   (412 -> ``False``)                     ``os.link`` (fails if the name exists)
:meth:`read`       ranged GET, at most ``cap + 1`` bytes  the same through fsspec
=================  =====================================  ==============================================

Readers therefore see an object whole or not at all, and of two writers creating the same key exactly one wins.
Names whose last component starts with ``.`` (the ``file://`` temporaries) are never listed.
"""

from __future__ import annotations

import datetime
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec

from prompt_store.diskio import replace_file, write_file

try:  # botocore's own errors (EndpointConnectionError, ReadTimeoutError, ...) are not OSErrors
    from botocore.exceptions import BotoCoreError

    #: What a failed object-store call may raise.
    STORE_ERRORS: tuple[type[BaseException], ...] = (OSError, BotoCoreError)
except ImportError:  # no s3fs/botocore: only fsspec's own backends, which raise OSError
    STORE_ERRORS = (OSError,)

#: Serialises :meth:`Blobs.create` on process-local file systems (``memory://`` is one store per process).
_CREATE_LOCK = threading.Lock()


def _modified(info: dict[str, Any]) -> float | None:
    """Last-modified time of a listing entry, unix seconds (``None`` when the backend gives none)."""
    for field in ("LastModified", "mtime", "created"):
        value = info.get(field)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


class Blobs:
    """Keys under one root of an fsspec file system (see the module docstring).

    Args:
        fs: the file system (``s3fs.S3FileSystem``, ``MemoryFileSystem``, ``LocalFileSystem``).
        root: the root path inside ``fs``, without a trailing ``/`` (``"bucket/prefix"``, ``"/tmp/prompts"``).
        url: the URL the root came from, for messages.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.is_local = "file" in protocols or "local" in protocols
        self.is_s3 = "s3" in protocols

    def path(self, key: str) -> str:
        """The file system path of ``key``."""
        return f"{self.root}/{key}"

    def ensure_root(self) -> None:
        """Create the root for ``file://``; for S3, check that the bucket exists (prefixes need no creating).

        Raises:
            OSError: the directory cannot be created; ``FileNotFoundError`` for a missing bucket.
        """
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
        else:
            self._check_bucket()

    def _check_bucket(self) -> None:
        """Raise ``FileNotFoundError`` when the store is S3 and its bucket does not exist (a typo in the URL, or a
        bucket removed): that must never read as an empty store, whose replicas would drop every prompt."""
        if self.is_s3:
            bucket = self.root.lstrip("/").split("/", 1)[0]
            if not self.fs.exists(bucket):
                raise FileNotFoundError(f"S3 bucket {bucket!r} of {self.url} does not exist")

    def find(self, prefix: str) -> dict[str, float | None]:
        """Every key under ``prefix`` (a folder key such as ``"manifests"``) -> its last-modified unix time.

        One recursive listing (S3: ListObjectsV2, 1,000 keys a page); an absent prefix gives ``{}``.

        Raises:
            OSError: the listing failed (network, credentials, a missing bucket).
        """
        base = self.path(prefix).rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            self._check_bucket()  # an absent prefix is empty; an absent bucket is an error
            return {}
        out: dict[str, float | None] = {}
        strip = self.root.lstrip("/") + "/"
        for name, info in found.items():
            rel = name.lstrip("/")
            if not rel.startswith(strip) or info.get("type") == "directory":
                continue
            key = rel[len(strip):]
            if key.rsplit("/", 1)[-1].startswith("."):
                continue
            out[key] = _modified(info)
        return out

    def read(self, key: str, cap: int) -> bytes | None:
        """The bytes of ``key`` (at most ``cap + 1`` are fetched, so a caller can tell "over the cap"); ``None``
        if it does not exist.

        Raises:
            OSError: the read failed.
        """
        try:
            return bytes(self.fs.cat_file(self.path(key), start=0, end=cap + 1))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists now (no listing cache)."""
        return bool(self.fs.exists(self.path(key)))

    def put(self, key: str, data: bytes) -> None:
        """Write ``key`` whole (replacing it): readers see the old bytes or the new ones, never a part.

        Raises:
            OSError: the write failed.
        """
        if self.is_local:
            final = Path(self.path(key))
            final.parent.mkdir(parents=True, exist_ok=True)
            replace_file(final.parent, final.name, data)  # temp file, fsync, rename, directory fsync
            return
        self.fs.pipe_file(self.path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet; ``True`` if this call created it, ``False`` if it existed.

        Atomic across processes on S3 (conditional PutObject) and ``file://`` (``os.link``), across threads for
        ``memory://``.

        Raises:
            OSError: the write failed for another reason.
        """
        if self.is_local:
            final = self.path(key)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = self._temp(final)
            try:
                write_file(Path(tmp), data)
                os.link(tmp, final)
            except FileExistsError:
                return False
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
            return True
        try:
            if self.is_s3:
                self.fs.pipe_file(self.path(key), data, mode="create")
            else:
                with _CREATE_LOCK:
                    self.fs.pipe_file(self.path(key), data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:  # AWS answers 409 ConditionalRequestConflict to racing conditional writes of a key
            if self.is_s3 and "ConditionalRequestConflict" in str(exc):
                return False  # another writer is claiming it: the caller looks again
            raise
        return True

    def remove(self, keys: list[str]) -> None:
        """Delete ``keys`` (absent ones are ignored).

        Raises:
            OSError: a delete failed.
        """
        for key in keys:
            try:
                self.fs.rm_file(self.path(key))
            except FileNotFoundError:
                pass

    @staticmethod
    def _temp(final: str) -> str:
        head, tail = os.path.split(final)
        return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")
