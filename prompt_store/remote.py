"""A prompt store shared by replicas through an object store (S3, MinIO; ``memory://`` and ``file://`` for tests).

Every replica holds a :class:`RemoteStore` on the same URL. Writes follow :mod:`prompt_store.manifest`: the
validated prompt object first, under its content address, then a manifest created exclusively at the next
version (S3 ``If-None-Match: *``), so no replica ever follows a manifest to a half-written object, and two
replicas writing the same task at once never both get the same version. Each replica loads the store at
:meth:`RemoteStore.scan` and polls it every ``poll_interval`` seconds (one LIST of ``manifests/``, then a GET of a
manifest and its object only for tasks whose newest manifest changed), so an upload or delete through any replica
is served, or gone, everywhere within about one interval.

Versions are the writer's: the same content as the task's newest live manifest is ``"unchanged"`` (no write);
other content gets the newest manifest's version + 1, a tombstone included, so a deleted task never reuses a
version. Concurrent writers are ordered by the version each one claimed: the highest wins everywhere (a writer that
finds a higher version right after its own returns its prompt, but does not serve it). A manifest or object that is
corrupt is reported through ``on_error`` once per manifest on every replica, and never displaces what was loaded.

Old manifests and unreferenced objects of a task are removed after each write; an object is only removed when
older than :data:`GC_GRACE_SECONDS`, so one that a concurrent writer has just (re)written is kept.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

from prompt_store.blobs import STORE_ERRORS, Blobs
from prompt_store.events import Event, StoreBase
from prompt_store.formats import ARCHIVE_SLACK_BYTES, Limits, ParsedPrompt, parse_upload, validate_task_name
from prompt_store.manifest import (
    LIVE,
    MANIFESTS,
    MAX_MANIFEST_BYTES,
    OBJECTS,
    Manifest,
    ManifestKey,
    StoreObjectError,
    encode_object,
    manifest_key,
    newest_by_task,
    object_key,
    parse_manifest,
    tombstone_bytes,
)
from prompt_store.registry import PromptRegistry, SoftPrompt, tensor_sha256

logger = logging.getLogger("prompt_store")

#: Unreferenced objects younger than this many seconds are left alone (a concurrent writer may be about to
#: reference them).
GC_GRACE_SECONDS = 60.0
#: Version claims one upload or delete tries before giving up (each lost claim means another writer won one).
MAX_CLAIMS = 16


class RemoteStore(StoreBase):
    """Loads a shared prompt store into ``registry``, polls it, and writes uploads and deletes into it.

    The interface of :class:`prompt_store.store.PromptStore` (``scan``, ``start_watching``, ``stop``, ``upload``,
    ``delete``, ``get``, ``list`` and the same callbacks).

    Args:
        blobs: the store's root (:class:`prompt_store.blobs.Blobs`).
        registry: where prompts are served from.
        limits: shape and byte limits of a prompt.
        on_load, on_error, on_remove: as for :class:`prompt_store.store.PromptStore`; ``on_error``'s entry is the
            manifest key (``"manifests/qa/0000000004.live.json"``), or ``"<poller>"`` when a poll failed. Errors
            are :class:`prompt_store.errors.PromptError` (the object failed validation) or
            :class:`prompt_store.manifest.StoreObjectError` (reasons ``bad_manifest``, ``bad_object``,
            ``missing_object``), each with a ``reason``, or an ``OSError`` from the object store.
        poll_interval: seconds between polls (> 0).

    Raises:
        ValueError: ``poll_interval`` is not above 0.
    """

    def __init__(
        self,
        blobs: Blobs,
        registry: PromptRegistry,
        limits: Limits,
        *,
        on_load: Callable[[SoftPrompt, str], None] | None = None,
        on_error: Callable[[str, Exception], None] | None = None,
        on_remove: Callable[[str], None] | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be above 0 seconds, got {poll_interval!r}")
        self.blobs, self.registry, self.limits = blobs, registry, limits
        self.poll_interval = float(poll_interval)
        self._on_load, self._on_error, self._on_remove = on_load, on_error, on_remove
        self._lock = threading.RLock()
        self._applied: dict[str, str] = {}  # task -> key of the newest manifest already acted on
        self._reported: dict[str, str] = {}  # task -> key of the last manifest reported through on_error
        self._init_background()

    @property
    def directory(self) -> str:
        """The store's URL: where uploads persist (the admin API's ``persisted`` is ``directory is not None``)."""
        return self.blobs.url

    # ------------------------------------------------------------------------------------------- reading
    def _object_cap(self) -> int:
        return self.limits.max_bytes + ARCHIVE_SLACK_BYTES

    def _load_object(self, mkey: ManifestKey, m: Manifest) -> ParsedPrompt | None:
        """The validated prompt ``m`` points at; ``None`` when the manifest vanished meanwhile (superseded).

        Raises:
            StoreObjectError, PromptError: the object is missing, does not match ``m``, or fails validation.
            OSError: the object store failed.
        """
        cap = self._object_cap()
        if m.object_bytes > cap:
            raise StoreObjectError(f"object {m.object} is {m.object_bytes} bytes; expected at most {cap}",
                                   reason="bad_object")
        body = self.blobs.read(m.object, cap)
        if body is None:
            if not self.blobs.exists(mkey.key):
                return None  # removed by a newer write between our listing and this read
            raise StoreObjectError(f"manifest {mkey.key} names {m.object}, which does not exist",
                                   reason="missing_object")
        digest = hashlib.sha256(body).hexdigest()
        if len(body) != m.object_bytes or digest != m.object_sha256:
            raise StoreObjectError(
                f"object {m.object}: expected {m.object_bytes} bytes with sha256 {m.object_sha256}, got "
                f"{len(body)} bytes with sha256 {digest}", reason="bad_object")
        parsed = parse_upload(m.object, body, self.limits)
        content = tensor_sha256(parsed.embeddings, prefix=parsed.is_prefix)
        if content != m.sha256 or parsed.peft_type != m.peft_type:
            raise StoreObjectError(
                f"object {m.object}: expected a {m.peft_type} prompt with tensor sha256 {m.sha256}, got "
                f"{parsed.peft_type} {content}", reason="bad_object")
        return parsed

    def _register(self, task: str, parsed: ParsedPrompt, version: int, source: str,
                  events: list[Event]) -> SoftPrompt:
        """Serve ``parsed`` as ``version`` (the writer's); the same content under another version (deleted and
        re-added between two polls) is re-registered with the new one. Caller holds the lock.

        Raises:
            ValueError: ``version`` is not above the task's highest version served by this process.
        """
        digest = tensor_sha256(parsed.embeddings, prefix=parsed.is_prefix)
        current = self.registry.get(task)
        if current is not None and current.sha256 == digest and current.version == version:
            return current
        if current is not None and current.sha256 == digest:
            self.registry.remove(task)
        prompt, action = self.registry.put(task, parsed, source, digest=digest, version=lambda _d, _h: version)
        events.append(("load", prompt, action))
        return prompt

    def _apply(self, mkey: ManifestKey, events: list[Event]) -> str:
        """Act on a task's newest manifest; returns ``"loaded"``, ``"removed"``, ``"skipped"`` or ``"error"``."""
        task = mkey.task
        if mkey.kind != LIVE:
            self._applied[task] = mkey.key
            if self.registry.remove(task) is not None:
                events.append(("remove", task))
            return "removed"
        try:
            data = self.blobs.read(mkey.key, MAX_MANIFEST_BYTES)
            if data is None:
                return "skipped"  # replaced and collected since the listing: the next poll sees the newer one
            m = parse_manifest(mkey, data)
            current = self.registry.get(task)
            if current is None or current.sha256 != m.sha256 or current.version != m.version:
                parsed = self._load_object(mkey, m)
                if parsed is None:
                    return "skipped"
                self._register(task, parsed, m.version, self.blobs.path(m.object), events)
        except (ValueError, *STORE_ERRORS) as exc:  # PromptError and StoreObjectError are ValueErrors
            if self._reported.get(task) != mkey.key:  # once per manifest
                self._reported[task] = mkey.key
                events.append(("error", mkey.key, exc))
            if isinstance(exc, ValueError):
                self._applied[task] = mkey.key  # refused for good; a failed read (OSError) is retried next poll
            return "error"
        self._applied[task] = mkey.key
        return "loaded"

    def _poll_locked(self, events: list[Event]) -> dict[str, int]:
        newest = newest_by_task(self.blobs.find(MANIFESTS))
        counts = {"loaded": 0, "errors": 0}
        for task in sorted(newest):
            mkey = newest[task]
            if self._applied.get(task) == mkey.key:
                counts["loaded"] += mkey.kind == LIVE and self._reported.get(task) != mkey.key
                continue
            outcome = self._apply(mkey, events)
            counts["loaded"] += outcome == "loaded"
            counts["errors"] += outcome == "error"
        for prompt in self.registry.list():
            if prompt.task not in newest:  # every manifest gone (the store was emptied)
                self.registry.remove(prompt.task)
                self._applied.pop(prompt.task, None)
                events.append(("remove", prompt.task))
        return counts

    def scan(self) -> dict[str, int]:
        """Bring the registry in line with the store now; return ``{"loaded": n, "errors": m}`` (``loaded``: tasks
        whose newest manifest is live and was accepted; ``errors``: manifests newly refused in this pass, each
        reported once through ``on_error``; one already refused is counted in neither).

        Raises:
            OSError: the store cannot be listed (network, credentials, a missing bucket).
        """
        self.blobs.ensure_root()
        events: list[Event] = []
        with self._lock:
            counts = self._poll_locked(events)
        self._fire(events)
        return counts

    def _poll_loop(self) -> None:
        backoff = self.poll_interval
        while not self._stop_event.is_set():
            try:
                self.scan()
                backoff = self.poll_interval
            except Exception as exc:  # the poller must never die
                logger.exception("polling the prompt store %s failed; retrying in %.1f s", self.blobs.url, backoff)
                self._fire([("error", "<poller>", exc)])
                backoff = min(backoff * 2, max(30.0, self.poll_interval))
            self._ready.set()
            self._stop_event.wait(backoff)

    def start_watching(self, timeout: float = 5.0) -> bool:
        """Start the daemon thread that polls the store every ``poll_interval`` seconds.

        Waits up to ``timeout`` seconds for its first poll and returns whether it finished. A second call returns
        the first one's state.
        """
        return self._start_background(self._poll_loop, "prompt-store-poll", timeout)

    # ------------------------------------------------------------------------------------------- writing
    def _task_newest(self, task: str) -> tuple[ManifestKey | None, list[str]]:
        keys = list(self.blobs.find(f"{MANIFESTS}/{task}"))
        return newest_by_task(keys).get(task), keys

    def _collect(self, task: str) -> None:
        """Remove ``task``'s manifests older than its newest and its objects the newest does not name (objects
        younger than :data:`GC_GRACE_SECONDS` are kept). Failures are logged, never raised."""
        try:
            newest, keys = self._task_newest(task)
            if newest is None:
                return
            self.blobs.remove([k for k in keys if k != newest.key])
            keep = None
            if newest.kind == LIVE:
                data = self.blobs.read(newest.key, MAX_MANIFEST_BYTES)
                keep = parse_manifest(newest, data).object if data is not None else None
                if keep is None:
                    return  # cannot tell what is referenced: leave the objects
            cutoff = time.time() - GC_GRACE_SECONDS
            objects = self.blobs.find(f"{OBJECTS}/{task}")
            self.blobs.remove([k for k, mtime in objects.items()
                               if k != keep and mtime is not None and mtime < cutoff])
        except (ValueError, *STORE_ERRORS):
            logger.warning("prompt store %s: collecting old entries of task %s failed", self.blobs.url, task,
                           exc_info=True)

    def upload(self, task: str, filename: str, data: bytes) -> tuple[SoftPrompt, str]:
        """Validate an upload, write its object and then a manifest at the next version, and serve it here.

        Validation is :func:`prompt_store.formats.validate_task_name` and
        :func:`prompt_store.formats.parse_upload`, before anything is written. Other replicas serve the new
        version at their next poll.

        Returns:
            ``(prompt, action)``: ``"created"`` (the task had no live manifest), ``"replaced"`` or ``"unchanged"``
            (its newest manifest already holds this content: nothing is written, the version is kept).

        Raises:
            PromptError: any refusal; nothing is written.
            OSError: the object store failed, or :data:`MAX_CLAIMS` versions were taken by concurrent writers.
        """
        validate_task_name(task)
        parsed = parse_upload(filename, data, self.limits)
        digest = tensor_sha256(parsed.embeddings, prefix=parsed.is_prefix)
        suffix, body = encode_object(parsed, data)
        okey, osha = object_key(task, suffix, body)
        events: list[Event] = []
        try:  # events of a committed write are fired even if cleaning up after it fails
            with self._lock:
                written = False
                for _ in range(MAX_CLAIMS):
                    newest, _keys = self._task_newest(task)
                    if newest is not None and newest.kind == LIVE:
                        raw = self.blobs.read(newest.key, MAX_MANIFEST_BYTES)
                        try:  # the same content, and its object intact: a corrupt or missing one gets a new version
                            m = parse_manifest(newest, raw) if raw is not None else None
                            same = m is not None and m.sha256 == digest and self._load_object(newest, m) is not None
                        except ValueError:
                            same = False  # a corrupt newest manifest or object is replaced by this upload
                        if same:
                            prompt = self._register(task, parsed, newest.version, self.blobs.path(okey), events)
                            self._applied[task] = newest.key
                            action = "unchanged"
                            break
                    if not written:  # first the object; every writer re-puts it, which refreshes its age for GC
                        self.blobs.put(okey, body)
                        written = True
                    version = newest.version + 1 if newest is not None else 1
                    m = Manifest(task=task, version=version, object=okey, object_bytes=len(body), object_sha256=osha,
                                 sha256=digest, peft_type=parsed.peft_type, written_at=time.time())
                    mkey = manifest_key(task, version, LIVE)
                    if not self.blobs.create(mkey, m.to_bytes()):
                        continue  # another writer claimed this version: look again
                    action = "created" if newest is None or newest.kind != LIVE else "replaced"
                    latest, _keys = self._task_newest(task)
                    if latest is not None and latest.key != mkey:  # a concurrent, higher version wins everywhere
                        prompt = PromptRegistry().put(task, parsed, self.blobs.path(okey), digest=digest,
                                                      version=lambda _d, _h, v=version: v)[0]
                    else:
                        prompt = self._register(task, parsed, version, self.blobs.path(okey), events)
                        self._applied[task] = mkey
                    self._collect(task)
                    break
                else:
                    raise OSError(f"upload of task {task!r} to {self.blobs.url}: {MAX_CLAIMS} versions in a row were "
                                  "claimed by concurrent writers; expected one to be free")
        finally:
            self._fire(events)
        return prompt, action

    def delete(self, task: str) -> bool:
        """Write a tombstone over ``task``'s newest live manifest (every replica drops the task at its next poll),
        then remove its old manifests and object, and stop serving it here.

        Returns:
            ``False`` if the task had no live manifest and was not served here.

        Raises:
            PromptError: reason ``"bad_name"`` for an invalid task name.
            OSError: the object store failed, or :data:`MAX_CLAIMS` tries lost to concurrent writers.
        """
        validate_task_name(task)
        events: list[Event] = []
        with self._lock:
            existed = False
            for _ in range(MAX_CLAIMS):
                newest, _keys = self._task_newest(task)
                if newest is None or newest.kind != LIVE:
                    break
                if self.blobs.create(manifest_key(task, newest.version, "gone"),
                                     tombstone_bytes(task, newest.version)):
                    existed = True
                    self._applied[task] = manifest_key(task, newest.version, "gone")
                    break
            else:
                raise OSError(f"delete of task {task!r} in {self.blobs.url}: {MAX_CLAIMS} tries lost to concurrent "
                              "writers")
            if existed:
                self._collect(task)
            removed = self.registry.remove(task)
        if removed is not None:
            events.append(("remove", task))
        self._fire(events)
        return existed or removed is not None

