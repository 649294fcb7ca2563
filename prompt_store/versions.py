"""The version book: prompt versions that survive a restart, kept in the prompt directory as ``.versions.json``.

Without it, versions are issued per process and a prompt at version 3 comes back as version 1 after a restart.
With it, :class:`prompt_store.store.PromptStore` gives a task's content the version it had before the restart when
the content is the same, and ``high_water + 1`` when it differs; a task deleted and added again never reuses a
version. Memory-only stores have no book.

File format (UTF-8 JSON, one object; the file is a dot-name, so the directory scanner ignores it)::

    {
      "format": 1,
      "tasks": {
        "qa":   {"sha256": "<64 hex>", "version": 3, "high_water": 3},
        "gone": {"sha256": null, "version": null, "high_water": 2}
      }
    }

- ``sha256``: :func:`prompt_store.registry.tensor_sha256` of the content served as ``version``; ``null`` once the
  task was deleted (then only ``high_water`` is kept).
- ``version``: the version that content is served as (an integer >= 1, at most ``high_water``), or ``null``.
- ``high_water``: the highest version ever issued to the task (>= 1).

Written atomically (temporary file, fsync, rename, directory fsync; see
:func:`prompt_store.diskio.replace_file`) whenever a version is issued or a task deleted. A missing book starts
empty (a warning when the directory already holds prompts); an unreadable or malformed one is logged, reported
through :attr:`VersionBook.problem`, and replaced at the next write; a malformed entry is dropped alone. Either way
versions then restart from the files, as without a book.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prompt_store.diskio import replace_file
from prompt_store.formats import TASK_NAME_RE

logger = logging.getLogger("prompt_store")

#: The book's file name inside the prompt directory.
BOOK_NAME = ".versions.json"
#: The ``format`` value this module reads and writes.
BOOK_FORMAT = 1
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class BookEntry:
    """One task's line in the book (see the module docstring for the meaning of each field)."""

    sha256: str | None
    version: int | None
    high_water: int

    def to_json(self) -> dict:
        """The entry as written to the file."""
        return {"sha256": self.sha256, "version": self.version, "high_water": self.high_water}


def _is_pos_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _parse_entry(task: object, raw: object) -> BookEntry | None:
    """A valid entry, or ``None`` for a malformed one."""
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task) or not isinstance(raw, dict):
        return None
    sha, version, high = raw.get("sha256"), raw.get("version"), raw.get("high_water")
    if not _is_pos_int(high):
        return None
    if sha is None and version is None:
        return BookEntry(None, None, high)
    if isinstance(sha, str) and _SHA_RE.fullmatch(sha) and _is_pos_int(version) and version <= high:
        return BookEntry(sha, version, high)
    return None


class VersionBook:
    """The version book of one prompt directory. Not thread-safe: the store calls it under its lock.

    Changes are kept in memory until :meth:`flush` writes them (one write per batch of changes).

    Args:
        directory: the prompt directory (the book is ``directory / BOOK_NAME``).

    Attributes:
        problem: ``None``, or why the book on disk was not used (unreadable, malformed), set by :meth:`load`.
        dropped: number of malformed entries :meth:`load` dropped.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / BOOK_NAME
        self._entries: dict[str, BookEntry] = {}
        self._loaded = False
        self._dirty = False
        self._failed = False  # the last write failed: retry only when something new is recorded
        self.problem: str | None = None
        self.dropped = 0

    # ------------------------------------------------------------------------------------------- reading
    def load(self) -> None:
        """Read the book from disk (once; later calls do nothing). Never raises for a bad or missing file.

        A missing file starts an empty book; an unreadable or malformed one also does, with :attr:`problem` set
        and a warning logged; malformed entries are dropped one by one (counted in :attr:`dropped`).
        """
        if self._loaded:
            return
        self._loaded = True
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            others = [n for n in _listdir(self.path.parent) if not n.startswith(".")]
            if others:
                logger.info("version book %s is missing (a first start?); prompt versions start from the files (%d "
                            "entries)",
                               self.path, len(others))
            return
        except (OSError, UnicodeDecodeError) as exc:
            self._refuse(f"cannot be read: {exc}")
            return
        try:
            doc = json.loads(text)
        except ValueError as exc:
            self._refuse(f"is not valid JSON: {exc}")
            return
        if not isinstance(doc, dict) or doc.get("format") != BOOK_FORMAT or not isinstance(doc.get("tasks"), dict):
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            self._refuse(f"expected a JSON object with format {BOOK_FORMAT} and a 'tasks' object, got {got!r}")
            return
        for task, raw in doc["tasks"].items():
            entry = _parse_entry(task, raw)
            if entry is None:
                self.dropped += 1
                logger.warning("version book %s: dropped malformed entry %r: %r", self.path, task, raw)
            else:
                self._entries[task] = entry
        if self.dropped:
            self.problem = f"{self.dropped} malformed entries dropped"
            self._dirty = True

    def _refuse(self, why: str) -> None:
        self.problem = f"version book {self.path} {why}"
        logger.warning("%s; prompt versions restart from the files, and the book is rewritten", self.problem)
        self._dirty = True

    def get(self, task: str) -> BookEntry | None:
        """The book's entry for ``task`` (a copy), or ``None``."""
        entry = self._entries.get(task)
        return None if entry is None else BookEntry(entry.sha256, entry.version, entry.high_water)

    def tasks_served(self) -> list[str]:
        """Tasks whose entry names served content (``sha256`` not null), sorted."""
        return sorted(t for t, e in self._entries.items() if e.sha256 is not None)

    # ------------------------------------------------------------------------------------------- changing
    def version_for(self, task: str, sha256: str, floor: int = 0) -> int:
        """The version to serve content ``sha256`` of ``task`` as, without recording it.

        The book's version when it recorded this same content (and it is above ``floor``); otherwise
        ``max(high_water, floor) + 1``.

        Args:
            floor: the highest version already issued to ``task`` in this process (0 if none).
        """
        entry = self._entries.get(task)
        if entry is None:
            return floor + 1
        if entry.sha256 == sha256 and entry.version is not None and entry.version > floor:
            return entry.version
        return max(entry.high_water, floor) + 1

    def record(self, task: str, sha256: str, version: int) -> None:
        """Note that ``task`` now serves content ``sha256`` as ``version`` (raises ``high_water`` to it).

        Raises:
            ValueError: ``version`` is not an integer >= 1 or ``sha256`` not 64 lowercase hex digits.
        """
        if not _is_pos_int(version) or not _SHA_RE.fullmatch(sha256):
            raise ValueError(f"expected a version >= 1 and a 64-hex sha256, got {version!r} and {sha256!r}")
        old = self._entries.get(task)
        high = max(version, old.high_water if old is not None else 0)
        new = BookEntry(sha256, version, high)
        if old != new:
            self._entries[task] = new
            self._dirty, self._failed = True, False

    def forget(self, task: str) -> None:
        """Note that ``task`` was deleted: its content is forgotten, its ``high_water`` kept (never reused)."""
        old = self._entries.get(task)
        if old is not None and old.sha256 is not None:
            self._entries[task] = BookEntry(None, None, old.high_water)
            self._dirty, self._failed = True, False

    def flush(self) -> bool:
        """Write the book if it changed since the last write; return whether it wrote.

        After a failed write the changes stay pending, and the next flush after a new change writes them all (a
        read-only prompt directory thus costs one failed write per change, not one per call).

        Raises:
            OSError: the write failed (the old file is untouched).
        """
        if not self._dirty or self._failed:
            return False
        doc = {"format": BOOK_FORMAT, "tasks": {t: self._entries[t].to_json() for t in sorted(self._entries)}}
        try:
            replace_file(self.path.parent, self.path.name, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError:
            self._failed = True
            raise
        self._dirty = False
        return True


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []
