"""The watching half of :class:`prompt_store.store.PromptStore`: a daemon thread that reloads changed entries.

Split from :mod:`prompt_store.store` to keep modules short; :class:`WatchingMixin` uses the store's lock, its
``_reconcile_many`` / ``_resync`` / ``_sync_book_locked`` / ``_fire`` and the thread state its ``__init__`` sets.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import watchfiles

logger = logging.getLogger("prompt_store")


class WatchingMixin:
    """Watching for :class:`prompt_store.store.PromptStore` (see there for the behaviour)."""

    def _top_entry(self, path: str) -> str | None:
        try:
            rel = Path(path).relative_to(self._dir())
        except ValueError:
            return None
        return rel.parts[0] if rel.parts else ""

    def _watch_filter(self, change: watchfiles.Change, path: str) -> bool:
        entry = self._top_entry(path)
        return entry is not None and not entry.startswith(".")

    def _handle_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        entries = {self._top_entry(path) for _, path in changes}
        if "" in entries:  # the directory itself changed (e.g. re-created): resync everything
            self._resync()
            return
        events: list[tuple] = []
        with self._lock:
            self._reconcile_many(sorted(e for e in entries if e), events)
            self._sync_book_locked(events)
        self._fire(events)

    def _watch_loop(self) -> None:
        backoff = 0.2
        while not self._stop_event.is_set():
            try:
                self._dir().mkdir(parents=True, exist_ok=True)
                inode = self._dir().stat().st_ino
                fresh, last_resync = True, time.monotonic()
                for changes in watchfiles.watch(
                    self._dir(),
                    watch_filter=self._watch_filter,
                    debounce=self._debounce_ms,
                    step=50,
                    rust_timeout=250,
                    yield_on_timeout=True,
                    stop_event=self._stop_event,
                    force_polling=True if self._poll else None,
                    poll_delay_ms=100,
                    raise_interrupt=False,
                ):
                    if changes:
                        self._handle_changes(changes)
                    # On (re)start the OS watch is live now: pick up what changed before it was. After that,
                    # a periodic stat-based resync covers what the watcher can miss (the polling backend
                    # compares mtimes in whole seconds; inotify can overflow).
                    if fresh or time.monotonic() - last_resync >= self._resync_s:
                        self._resync()
                        last_resync = time.monotonic()
                    if fresh:
                        self._ready.set()
                        fresh, backoff = False, 0.2
                    if self._dir().stat().st_ino != inode:  # deleted (raises) or replaced: watch again
                        logger.warning("prompt directory %s was replaced; watching the new one", self._dir())
                        break
            except Exception as exc:  # the watcher must never die
                logger.exception("prompt directory watcher failed; restarting in %.1f s", backoff)
                self._fire([("error", "<watcher>", exc)])
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def start_watching(self, timeout: float = 5.0) -> bool:
        """Start the daemon thread that reloads changed entries, usually within 0.5 s (always under 2 s).

        Waits up to ``timeout`` seconds for the OS watch to be live, then returns whether it is. Any change
        made before that (even before :meth:`scan`) is picked up by a resync when the watch starts. Does
        nothing and returns ``False`` for a memory-only store; a second call returns the first one's state.
        """
        if self.directory is None:
            return False
        return self._start_background(self._watch_loop, "prompt-store-watch", timeout)
