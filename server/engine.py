"""The engine's thread-safe front: submit, abort, admission checks, request streams, and the loop thread.

The HTTP layer only calls :meth:`Engine.submit` / :meth:`Engine.abort` and awaits :class:`RequestStream` objects,
so it never blocks on the model. The loop thread drains the inbox and runs :meth:`EngineCore.step` (schedule ->
execute -> update -> emit). If the loop dies, :attr:`Engine.error` is set, every pending request gets an error
output at once, and new submissions raise :class:`EngineDeadError`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from server.attention.backend import AttentionBackend
from server.engine_config import EngineConfig
from server.engine_core import EngineCore
from server.metrics import Metrics
from server.model_loader import LoadedModel
from server.outputs import RequestOutput, RequestStream, make_output
from server.request import Request, RequestStatus
from server.scheduler import SchedulerOutput

__all__ = [
    "Engine", "EngineConfig", "EngineDeadError", "EngineOverloadedError", "RequestOutput", "RequestRejectedError",
    "RequestStream",
]

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full."""


class RequestRejectedError(ValueError):
    """A request the engine can never run (too long for the context or the KV pool, or with no position at all).

    Attributes:
        code: short machine code, e.g. ``context_length_exceeded``.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Engine:
    """Runs an :class:`EngineCore` on a background thread; every method here is safe from any thread.

    Args:
        loaded: the frozen base model.
        config: limits (defaults: :class:`EngineConfig`).
        metrics: where to report; a fresh :class:`Metrics` if None.
        backend: attention backend (the device's default if None).
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, metrics: Metrics | None = None,
                 backend: AttentionBackend | None = None) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.core = EngineCore(loaded, self.config, self.metrics, backend)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.max_context = loaded.max_context
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams and _dead
        self._dead = False
        self._thread: threading.Thread | None = None

    # shortcuts for tests and the bench
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @property
    def steps(self) -> int:
        return self.core.steps

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
            self._thread.start()
            self.metrics.engine_alive.set(1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; pending requests finish with an error."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(EngineDeadError("engine stopped"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ------------------------------------------------------------------ front (any thread)
    def check(self, request: Request) -> None:
        """Refuse what can never run.

        Raises:
            RequestRejectedError: no position to generate from (empty text and no soft prompt), or virtual + text
                + max_new_tokens exceeds the model's context or the KV pool.
        """
        nv, nt, mn = request.num_virtual_tokens, len(request.prompt_token_ids), request.params.max_new_tokens
        if nv + nt == 0:
            raise RequestRejectedError(
                "empty input: a request with no soft prompt needs at least one token, "
                "and the tokenizer added none (no BOS token) for this input", "empty_input",
            )
        total = nv + nt + mn
        if total > self.max_context:
            raise RequestRejectedError(
                f"virtual tokens ({nv}) + text tokens ({nt}) + max_new_tokens ({mn}) = {total} exceeds the "
                f"model's context length of {self.max_context} tokens", "context_length_exceeded",
            )
        if not self.core.scheduler.fits_ever(total):
            pool = self.core.pool
            raise RequestRejectedError(
                f"virtual tokens ({nv}) + text tokens ({nt}) + max_new_tokens ({mn}) = {total} exceeds the KV "
                f"cache of {pool.num_blocks * pool.block_size} tokens (raise --kv-cache-bytes)", "kv_cache_exceeded",
            )

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; outputs arrive on the returned stream.

        Raises:
            RequestRejectedError: see :meth:`check`.
            EngineDeadError: the loop is not running.
            EngineOverloadedError: ``max_waiting`` requests are already queued.
        """
        self.check(request)
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        if len(self.core.scheduler.waiting) + self._inbox.qsize() >= self.config.max_waiting:
            raise EngineOverloadedError(f"{self.config.max_waiting} requests already waiting")
        request.eos_token_ids = self.eos_token_ids
        stream = RequestStream(request)
        with self._lock:
            if self._dead:  # the loop died after the alive check above: never leave a stream nobody completes
                raise EngineDeadError(f"engine is not running: {self.error!r}")
            self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step and free its KV (no-op if it already finished)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ loop (engine thread)
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                if not self._drain_inbox() and not self.core.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self.core.has_work():
                    self.step()
        except BaseException as exc:  # noqa: BLE001 - the loop reports any death, then fails requests fast
            log.exception("engine loop died")
            self.error = exc
            self.metrics.engine_alive.set(0)
            self._fail_all(EngineDeadError(f"engine loop died: {exc!r}"))

    def step(self) -> SchedulerOutput:
        """One engine step, its outputs delivered to their streams (engine thread, or tests driving it); returns
        the step's plan."""
        plan, outs = self.core.step()
        for out in outs:
            self._deliver(out)
        return plan

    def _drain_inbox(self) -> bool:
        got = False
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return got
            got = True
            if kind == "add":
                self.core.add(item)  # type: ignore[arg-type]
            elif kind == "abort":
                with self._lock:
                    stream = self._streams.get(str(item))
                if stream is not None:
                    out = self.core.abort(stream.request)
                    if out is not None:
                        self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._dead = True
            streams = list(self._streams.values())
            self._streams.clear()
        for s in streams:
            req = s.request
            if not req.status.is_finished:
                req.status = RequestStatus.FINISHED_ERROR
                req.finish_time = time.monotonic()
            s.put(make_output(req, error=str(exc)))
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
