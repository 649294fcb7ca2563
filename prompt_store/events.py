"""Store events and their callbacks, shared by the directory store and the shared (object-store) store.

An event is a tuple: ``("load", SoftPrompt, action)``, ``("error", entry, exception)`` or ``("remove", task)``.
Stores collect events under their lock and fire them after releasing it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prompt_store.registry import SoftPrompt

logger = logging.getLogger("prompt_store")

Event = tuple  # ("load", SoftPrompt, action) | ("error", entry, exc) | ("remove", task)


class CallbackMixin:
    """``_fire(events)``: log each event and call ``self._on_load`` / ``_on_error`` / ``_on_remove`` (any may be
    ``None``); a callback that raises is logged and otherwise ignored."""

    _on_load: Callable[[SoftPrompt, str], None] | None
    _on_error: Callable[[str, Exception], None] | None
    _on_remove: Callable[[str], None] | None

    def _fire(self, events: Iterable[Event]) -> None:
        for event in events:
            try:
                if event[0] == "load":
                    _, prompt, action = event
                    logger.info("prompt %s %s: v%d, %s", prompt.task, action, prompt.version, prompt.source)
                    if self._on_load is not None:
                        self._on_load(prompt, action)
                elif event[0] == "error":
                    _, entry, exc = event
                    logger.warning("prompt entry %s refused: %s", entry, exc)
                    if self._on_error is not None:
                        self._on_error(entry, exc)
                else:
                    logger.info("prompt %s removed", event[1])
                    if self._on_remove is not None:
                        self._on_remove(event[1])
            except Exception:
                logger.exception("prompt_store callback failed for event %s", event[0])
