"""A directory of soft prompts, loaded into a :class:`PromptRegistry` and kept in sync while it changes.

Directory layout (one entry per task)::

    <dir>/<task>.safetensors     RAW: one tensor [num_virtual_tokens, hidden_size]
    <dir>/<task>/                PEFT 0.21 save_pretrained output (adapter_config.json,
                                 adapter_model.safetensors; README.md ignored)
    <dir>/.versions.json         the version book (prompt_store.versions): versions kept across restarts
    <dir>/.<anything>            ignored (temporary files; this store's own are .<task>.tmp-<hex>
                                 and .<task>.old-<hex>, removed by scan())

Any other entry (a bad task name, a ``.bin`` pickle, a stray README) is reported through ``on_error`` and
skipped. A task present in both forms is "ambiguous": reported, and whatever was loaded keeps serving.

A file that turns bad never takes a good prompt down: the old version keeps serving until the entry is fixed
or removed. One re-entrant lock serialises :meth:`PromptStore.reconcile`, :meth:`PromptStore.upload` and
:meth:`PromptStore.delete`, so the watcher never sees an upload half-done. Callbacks run outside that lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_store.diskio import (
    OWN_TEMP_RE,
    RAW_SUFFIX,
    fsync_dir,
    remove_entry,
    signature,
    write_peft,
    write_raw,
)
from prompt_store.errors import PromptError
from prompt_store.events import Event, StoreBase
from prompt_store.formats import Limits, ParsedPrompt, load_path, parse_upload, validate_task_name
from prompt_store.registry import PromptRegistry, SoftPrompt
from prompt_store.versions import BOOK_NAME, VersionBook
from prompt_store.watching import WatchingMixin

logger = logging.getLogger("prompt_store")

_Event = Event


def task_for_entry(name: str) -> str | None:
    """Map a top-level directory entry name to its task name; ``None`` for ignored dot-entries.

    ``"qa.safetensors"`` -> ``"qa"``; ``"qa"`` -> ``"qa"``; ``".qa.tmp-1f..."`` -> ``None``. The result is not
    validated (``"README.md"`` maps to itself and is refused later).
    """
    if not name or name.startswith("."):
        return None
    return name[: -len(RAW_SUFFIX)] if name.endswith(RAW_SUFFIX) else name


class PromptStore(StoreBase, WatchingMixin):
    """Loads a prompt directory into ``registry``, watches it, and writes uploads into it atomically.

    Args:
        directory: the prompt directory (created if missing), or ``None`` for a memory-only store where
            uploads only register (source ``"upload"``) and scan/watch do nothing.
        registry: where prompts are served from.
        limits: shape and byte limits (see :class:`prompt_store.formats.Limits`).
        on_load: ``on_load(prompt, action)`` after an upload (any action) and after a scan/reconcile that
            ``"created"`` or ``"replaced"`` a prompt (re-reads that find the same content stay silent).
        on_error: ``on_error(entry, error)`` for every refused directory entry, ambiguous task and watcher
            failure; ``entry`` is the entry name (or ``"<watcher>"``). Not called for refused uploads, which
            raise instead. Also called with entry ``".versions.json"`` when the version book is unreadable or
            malformed (a :class:`PromptError` with reason ``"bad_version_book"``, once) or cannot be written
            (the ``OSError``); the prompts themselves are unaffected.
        on_remove: ``on_remove(task)`` when a task leaves the registry (file deleted or :meth:`delete`).
        poll: force polling in watchfiles (for network or container file systems without inotify). The store
            then also compares (mtime ns, size, inode) of every entry every 0.25 s, since watchfiles' poller
            misses changes within the same second; without polling that safety net runs every 10 s.
        debounce_ms: longest time, in milliseconds, watchfiles groups changes before yielding a batch.

    Everything is also logged to ``logging.getLogger("prompt_store")``; a callback that raises is logged and
    otherwise ignored.

    With a directory, versions are kept across restarts in its version book (:mod:`prompt_store.versions`):
    scanning the same content after a restart gives it the version it had; a memory-only store numbers versions
    per process.
    """

    def __init__(
        self,
        directory: Path | None,
        registry: PromptRegistry,
        limits: Limits,
        *,
        on_load: Callable[[SoftPrompt, str], None] | None = None,
        on_error: Callable[[str, Exception], None] | None = None,
        on_remove: Callable[[str], None] | None = None,
        poll: bool = False,
        debounce_ms: int = 200,
    ) -> None:
        self.directory = Path(directory).resolve() if directory is not None else None
        self.registry = registry
        self.limits = limits
        self._on_load, self._on_error, self._on_remove = on_load, on_error, on_remove
        self._poll = poll
        self._resync_s = 0.25 if poll else 10.0
        self._debounce_ms = debounce_ms
        self._lock = threading.RLock()
        self._seen: dict[str, tuple | None] = {}  # entry name -> signature when last reconciled
        self._init_background()
        self._book = VersionBook(self.directory) if self.directory is not None else None
        self._book_reported = False

    def _dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("this PromptStore has no directory (memory-only); expected a directory")
        return self.directory

    # ------------------------------------------------------------------------------------------- versions
    def _put_locked(self, task: str, parsed: ParsedPrompt, source: str) -> tuple[SoftPrompt, str]:
        """Register ``parsed``, issuing its version from the book when there is one (caller holds the lock)."""
        book = self._book
        if book is None:
            return self.registry.put(task, parsed, source)
        book.load()
        prompt, action = self.registry.put(task, parsed, source,
                                           version=lambda digest, high: book.version_for(task, digest, high))
        book.record(task, prompt.sha256, prompt.version)
        return prompt, action

    def _forget_locked(self, task: str) -> None:
        if self._book is not None:
            self._book.load()
            self._book.forget(task)

    def _sync_book_locked(self, events: list[_Event]) -> None:
        """Write pending version-book changes; report a bad book (once) or a failed write as events."""
        book = self._book
        if book is None:
            return
        if book.problem is not None and not self._book_reported:
            self._book_reported = True
            events.append(("error", BOOK_NAME, PromptError(book.problem, reason="bad_version_book")))
        try:
            book.flush()
        except OSError as exc:
            events.append(("error", BOOK_NAME, exc))

    # ------------------------------------------------------------------------------------------- reading
    def _remember(self, *entries: str) -> None:
        for entry in entries:
            sig = signature(self._dir() / entry)
            if sig is None:
                self._seen.pop(entry, None)
            else:
                self._seen[entry] = sig

    def _reconcile_locked(self, entry: str, events: list[_Event]) -> str:
        task = task_for_entry(entry)
        if task is None:
            return "ignored"
        try:
            validate_task_name(task)
        except PromptError as exc:
            self._remember(entry)
            if os.path.lexists(self._dir() / entry):
                events.append(("error", entry, exc))
                return "error"
            return "absent"
        raw, tree = self._dir() / f"{task}{RAW_SUFFIX}", self._dir() / task
        self._remember(raw.name, tree.name)
        has_raw, has_tree = raw.exists(), os.path.lexists(tree)
        if has_raw and has_tree:
            exc = PromptError(
                f"task {task!r} is ambiguous: expected one of {raw.name} or {tree.name}/, found both; "
                "keeping the prompt already loaded",
                reason="ambiguous",
            )
            events.append(("error", entry, exc))
            return "error"
        if not has_raw and not has_tree:
            self._forget_locked(task)
            if self.registry.remove(task) is not None:
                events.append(("remove", task))
                return "removed"
            return "absent"
        path = raw if has_raw else tree
        try:
            parsed = load_path(path, self.limits)
        except (PromptError, OSError) as exc:
            events.append(("error", path.name, exc))
            return "error"
        prompt, action = self._put_locked(task, parsed, str(path))
        if action != "unchanged":
            events.append(("load", prompt, action))
        return action

    def reconcile(self, task_or_entry_name: str) -> str:
        """Re-read one task from disk and bring the registry in line with it.

        Args:
            task_or_entry_name: a task name (``"qa"``) or a top-level entry name (``"qa.safetensors"``).

        Returns:
            ``"created"`` / ``"replaced"`` / ``"unchanged"`` (loaded), ``"removed"`` (no form on disk any
            more), ``"absent"`` (nothing on disk nor registered), ``"error"`` (refused; reported through
            ``on_error``; a previously loaded prompt keeps serving) or ``"ignored"`` (dot-entry). Never raises
            for bad files; returns ``"ignored"`` when the store has no directory.
        """
        if self.directory is None:
            return "ignored"
        events: list[_Event] = []
        with self._lock:
            action = self._reconcile_locked(task_or_entry_name, events)
            self._sync_book_locked(events)
        self._fire(events)
        return action

    def _entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self._dir()) if not n.startswith("."))

    def _reconcile_many(self, entries: Iterable[str], events: list[_Event]) -> dict[str, int]:
        counts = {"loaded": 0, "errors": 0}
        done: set[str] = set()
        for entry in entries:
            task = task_for_entry(entry)
            if task is None or task in done:
                continue
            done.add(task)
            try:
                action = self._reconcile_locked(entry, events)
            except Exception as exc:  # never let one entry stop the rest
                events.append(("error", entry, exc))
                action = "error"
            if action in ("created", "replaced", "unchanged"):
                counts["loaded"] += 1
            elif action == "error":
                counts["errors"] += 1
        return counts

    def scan(self) -> dict[str, int]:
        """Load every entry of the directory (full resync); return ``{"loaded": n, "errors": m}``.

        Also removes this store's own leftover temporary entries (``.<task>.tmp-<hex>``,
        ``.<task>.old-<hex>``, from a crash mid-upload) and unregisters tasks that have no entry on disk.
        Returns zeros for a memory-only store.

        Raises:
            OSError: if the directory cannot be created or listed.
        """
        if self.directory is None:
            return {"loaded": 0, "errors": 0}
        self.directory.mkdir(parents=True, exist_ok=True)
        events: list[_Event] = []
        with self._lock:
            for name in os.listdir(self.directory):
                if OWN_TEMP_RE.fullmatch(name):
                    remove_entry(self.directory / name)
            if self._book is not None:
                self._book.load()
            entries = self._entries()
            on_disk = {task_for_entry(e) for e in entries}
            gone = [p.task for p in self.registry.list() if p.task not in on_disk]
            counts = self._reconcile_many([*entries, *gone], events)
            if self._book is not None:  # tasks deleted while the server was down: their versions are spent
                for task in self._book.tasks_served():
                    if task not in on_disk:
                        self._book.forget(task)
            self._sync_book_locked(events)
        self._fire(events)
        return counts

    def _resync(self) -> None:
        """Reconcile the entries whose signature changed since last seen (closes the scan -> watch gap)."""
        events: list[_Event] = []
        with self._lock:
            current = {e: signature(self._dir() / e) for e in self._entries()}
            names = sorted(current.keys() | self._seen.keys())
            changed = [e for e in names if current.get(e) != self._seen.get(e)]
            on_disk = {task_for_entry(e) for e in current}
            gone = [p.task for p in self.registry.list() if p.task not in on_disk]
            self._reconcile_many([*changed, *gone], events)
            self._sync_book_locked(events)
        self._fire(events)

    # ------------------------------------------------------------------------------------------- writing
    def upload(self, task: str, filename: str, data: bytes) -> tuple[SoftPrompt, str]:
        """Validate an uploaded prompt, write it into the directory atomically, and register it.

        Validation (:func:`prompt_store.formats.validate_task_name`, then
        :func:`prompt_store.formats.parse_upload`) happens before anything changes. A RAW upload's bytes are
        written as ``<task>.safetensors``; a PEFT upload is re-serialized from the validated tensor
        (``adapter_model.safetensors`` with metadata ``{"format": "pt"}`` plus its ``adapter_config.json``)
        into ``<task>/``, swapped in by rename. The task's other form is removed. Files and directory are
        fsynced. The prompt is servable when this returns.

        Returns:
            ``(prompt, action)`` as :meth:`PromptRegistry.put` returns them (``"unchanged"`` keeps the
            registered object, including its ``source`` and ``peft_type``).

        Raises:
            PromptError: any refusal; the registry and the directory are then untouched.
            OSError: the write failed; the previous files and prompt are kept.
        """
        validate_task_name(task)
        parsed = parse_upload(filename, data, self.limits)
        events: list[_Event] = []
        with self._lock:
            if self.directory is None:
                prompt, action = self.registry.put(task, parsed, "upload")
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                if self._book is not None:
                    self._book.load()  # before the write, so a missing book is judged by the old contents
                if parsed.peft_type == "RAW":
                    final = write_raw(self._dir(), task, data)
                else:
                    final = write_peft(self._dir(), task, parsed)
                fsync_dir(self.directory)
                prompt, action = self._put_locked(task, parsed, str(final))
                self._remember(f"{task}{RAW_SUFFIX}", task)
                self._sync_book_locked(events)
        self._fire([("load", prompt, action), *events])
        return prompt, action

    def delete(self, task: str) -> bool:
        """Remove ``task``'s files (both forms) and its registry entry; ``False`` if neither existed.

        Raises:
            PromptError: reason ``"bad_name"`` for an invalid task name.
            OSError: a file could not be removed.
        """
        validate_task_name(task)
        with self._lock:
            existed = False
            if self.directory is not None:
                for path in (self.directory / f"{task}{RAW_SUFFIX}", self.directory / task):
                    if os.path.lexists(path):
                        remove_entry(path)
                        existed = True
                if existed:
                    fsync_dir(self.directory)
                self._remember(f"{task}{RAW_SUFFIX}", task)
            removed = self.registry.remove(task)
            events: list[_Event] = []
            if self.directory is not None:
                self._forget_locked(task)
                self._sync_book_locked(events)
        if removed is not None:
            events.insert(0, ("remove", task))
        self._fire(events)
        return existed or removed is not None

