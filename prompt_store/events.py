"""Store events and their callbacks, shared by the directory store and the shared (object-store) store.

An event is a tuple: ``("load", SoftPrompt, action)``, ``("error", entry, exception)`` or ``("remove", task)``.
Stores collect events under their lock and fire them after releasing it.
"""

from __future__ import annotations

import logging
import threading
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


class StoreBase(CallbackMixin):
    """What the directory store and the shared store have in common besides the callbacks: the registry
    pass-throughs and one background thread (the directory watcher, or the poller) with its stop and ready events.

    Subclasses set ``registry`` and call :meth:`_init_background` in their constructor.
    """

    registry: object  # prompt_store.registry.PromptRegistry

    def _init_background(self) -> None:
        self._stop_event = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def _start_background(self, target: Callable[[], None], name: str, timeout: float) -> bool:
        """Start ``target`` on a daemon thread unless it runs already; wait up to ``timeout`` seconds for it to set
        ``self._ready`` and return whether it did."""
        if self._thread is None:
            self._stop_event.clear()
            self._ready.clear()
            self._thread = threading.Thread(target=target, name=name, daemon=True)
            self._thread.start()
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread (it finishes the pass in progress) and wait up to ``timeout`` seconds."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def get(self, task: str) -> SoftPrompt | None:
        """The registered prompt of ``task``, or ``None`` (pass-through to the registry)."""
        return self.registry.get(task)

    def list(self) -> list[SoftPrompt]:
        """All registered prompts sorted by task (pass-through to the registry)."""
        return self.registry.list()
