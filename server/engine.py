"""The engine's thread-safe front: submit, abort, admission checks, request streams, and the loop thread.

The HTTP layer only calls :meth:`Engine.submit` / :meth:`Engine.abort` and awaits :class:`RequestStream` objects,
so it never blocks on the model. The loop drains the inbox and runs :meth:`EngineCore.step` (schedule -> execute ->
update -> emit), on a thread of its own (:meth:`Engine.start`) or on the caller's (:meth:`Engine.run_forever`).

``softprompt serve`` runs the loop on the process's main thread and the HTTP server on another: with GNU OpenMP (the
CPU wheels of torch), every parallel region that a thread other than the process's first starts pays a wake-up of
its worker team, measured here at 50-75 us for one small elementwise op (4 us from the main thread) and 163 against
111 ms for a 64-row SmolLM2 decode step. If the loop dies, :attr:`Engine.error` is set, every pending request gets
an error output at once, and new submissions raise :class:`EngineDeadError`.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time

import torch

from server.attention.backend import AttentionBackend
from server.engine_config import EngineConfig
from server.engine_core import EngineCore
from server.metrics import Metrics
from server.model_loader import LoadedModel
from server.outputs import RequestOutput, RequestStream, deliver, make_output
from server.request import Request, RequestStatus
from server.scheduler import SchedulerOutput

__all__ = [
    "Engine", "EngineClosedError", "EngineConfig", "EngineDeadError", "EngineOverloadedError", "RequestOutput",
    "RequestRejectedError", "RequestStream",
]

log = logging.getLogger(__name__)

#: :meth:`Engine.retry_after` estimates the completion rate from at most this many recent completions, within
#: ``RATE_WINDOW_S`` seconds.
RATE_WINDOW_REQUESTS, RATE_WINDOW_S = 256, 60.0


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class EngineClosedError(RuntimeError):
    """The engine takes no new requests: a shutdown is draining it (:meth:`Engine.close`)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (by requests or by tokens).

    Attributes:
        retry_after: seconds after which a retry is likely to be admitted (:meth:`Engine.retry_after`).
    """

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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
        self._started = False
        self._entered = False  # run_forever was called
        self._done = threading.Event()
        self._queued_tokens = 0  # prompt positions of submitted requests not yet admitted (guarded by _lock)
        self._charged: dict[str, int] = {}  # request id -> its positions counted in _queued_tokens
        # when requests completed (stop or length), monotonic seconds; appended by the engine thread
        self._finish_times: collections.deque[float] = collections.deque(maxlen=RATE_WINDOW_REQUESTS)
        self._closed = False  # close() was called: submit refuses (guarded by _lock)

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
    def start(self, background: bool = True) -> None:
        """Accept requests from now on and run the loop (:meth:`run_forever`: warm-up, then steps) on a thread of its
        own, or (``background=False``) leave running it to the caller's thread. Idempotent."""
        if self._started:
            return
        self._started = True
        self.metrics.engine_alive.set(1)
        if background:
            self._thread = threading.Thread(target=self.run_forever, name="softprompt-engine", daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        """Warm up, then run the loop on the calling thread until :meth:`stop` (after ``start(background=False)``;
        requests submitted meanwhile wait in the inbox)."""
        self._entered = True
        try:
            self._warm_up()
        except BaseException:
            self._done.set()
            raise
        self._run()

    def _warm_up(self) -> None:
        """Kernels built and first-touch memory paid on the thread that will run the loop."""
        self.core.runner.warm_up(self.config.max_num_batched_tokens, self.config.max_num_seqs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (waiting up to ``timeout`` seconds for its step to end); pending requests finish with an
        error. If the step outlasts the timeout, their streams still get the error at once, and the loop, which
        still owns the requests, exits after that step."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._entered:
            self._done.wait(timeout)
        if not self._entered:
            self._done.set()  # a loop never entered counts as ended
        self.metrics.engine_alive.set(0)
        self._fail_all(EngineDeadError("engine stopped"))

    @property
    def alive(self) -> bool:
        """Started, not stopped, its loop not ended, and no error."""
        return self._started and not self._stop.is_set() and not self._done.is_set() and self.error is None

    # ------------------------------------------------------------------ front (any thread)
    def check(self, request: Request) -> None:
        """Refuse what can never run.

        Raises:
            RequestRejectedError: no position to generate from (empty text with no soft prompt or with a
                prefix-tuning prompt: :func:`server.request.cached_prompt_positions`), or virtual + text
                + max_new_tokens exceeds the model's context or the KV pool.
        """
        nv, nt, mn = request.num_virtual_tokens, len(request.prompt_token_ids), request.params.max_new_tokens
        if request.num_input_positions == 0:
            who = ("a prefix-tuned task's virtual tokens are KV only, with no input position, so its requests need"
                   if request.soft_prompt is not None else "a request with no soft prompt needs")
            raise RequestRejectedError(
                f"empty input: {who} at least one text token, and the tokenizer added none (no BOS token) for "
                "this input", "empty_input",
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
            EngineClosedError: :meth:`close` was called (a shutdown is draining the engine).
            EngineOverloadedError: ``max_waiting`` requests, or ``max_waiting_tokens`` prompt positions, are already
                queued (submitted and not yet admitted).
        """
        self.check(request)
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        cfg = self.config
        request.eos_token_ids = self.eos_token_ids
        stream = RequestStream(request)
        n = request.num_prompt_positions
        with self._lock:
            if self._dead:  # the loop died after the alive check above: never leave a stream nobody completes
                raise EngineDeadError(f"engine is not running: {self.error!r}")
            if self._closed:
                raise EngineClosedError("server is shutting down: it takes no new requests")
            if len(self._charged) >= cfg.max_waiting:
                raise EngineOverloadedError(f"server overloaded: {cfg.max_waiting} requests already waiting",
                                            self.retry_after())
            if self._queued_tokens and self._queued_tokens + n > cfg.max_waiting_tokens:
                raise EngineOverloadedError(
                    f"server overloaded: {self._queued_tokens} prompt tokens already waiting; this request's {n} "
                    f"would pass the limit of {cfg.max_waiting_tokens}", self.retry_after())
            self._queued_tokens += n
            self._charged[request.request_id] = n
            self._streams[request.request_id] = stream
            self._inbox.put(("add", request))  # under the lock: never behind an "end_all" put after close()
        self._wake.set()
        return stream

    @property
    def num_open(self) -> int:
        """Requests submitted and not yet given their final output."""
        with self._lock:
            return len(self._streams)

    @property
    def queued_tokens(self) -> int:
        """Prompt positions (virtual + text) of submitted requests not yet admitted, tokens."""
        with self._lock:
            return self._queued_tokens

    def retry_after(self) -> int:
        """Seconds a refused client should wait before retrying: the time the engine needs, at the rate it completed
        requests (stop or length) lately (at most the last ``RATE_WINDOW_REQUESTS``, within ``RATE_WINDOW_S``
        seconds), to get through the requests waiting now; clamped to ``[1, 60]``; 1 with fewer than two recent
        completions."""
        now = time.monotonic()
        times = [t for t in list(self._finish_times) if t >= now - RATE_WINDOW_S]  # list(): a C-level copy
        waiting = len(self._charged)
        if len(times) < 2 or times[-1] <= times[0]:
            return 1
        rate = (len(times) - 1) / (times[-1] - times[0])  # requests per second
        return min(max(math.ceil(waiting / rate), 1), 60)

    def close(self) -> None:
        """Take no new requests from now on (:meth:`submit` raises :class:`EngineClosedError`); those already
        submitted go on. The first step of a drain."""
        with self._lock:
            self._closed = True

    def end_all(self) -> None:
        """End every request now, with finish reason "shutdown" (their text so far is kept), at the next step."""
        self._inbox.put(("end_all", None))
        self._wake.set()

    def prefetch(self, prompt) -> None:
        """Compute a newly loaded prompt's virtual-token KV while the engine is idle (best effort; see
        :meth:`EngineCore.prefetch_some`)."""
        self._inbox.put(("prefetch", prompt))
        self._wake.set()

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
                    if self.core.prefetch_pending:
                        self.core.prefetch_some()
                        continue
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self.core.has_work():
                    self._deliver(*self.core.expire(time.monotonic()))
                if self.core.has_work():
                    self.step()
        except BaseException as exc:  # noqa: BLE001 - the loop reports any death, then fails requests fast
            log.exception("engine loop died")
            self.error = exc
            self.metrics.engine_alive.set(0)
            self._fail_all(EngineDeadError(f"engine loop died: {exc!r}"))
        finally:
            self._done.set()

    def step(self) -> SchedulerOutput:
        """One engine step, its outputs delivered to their streams (engine thread, or tests driving it); returns
        the step's plan."""
        plan, outs = self.core.step()
        if plan.admitted:
            self._discharge(plan.admitted)
        self._deliver(*outs)
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
                try:
                    self.core.add(item)  # type: ignore[arg-type]
                except ValueError as exc:  # refused by the scheduler (check() should have caught it): this one fails
                    self.core.scheduler.finish(item, RequestStatus.FINISHED_ERROR)  # type: ignore[arg-type]
                    self._deliver(make_output(item, error=str(exc)))  # type: ignore[arg-type]
            elif kind == "prefetch":
                self.core.queue_prefetch(item)
            elif kind == "end_all":
                self._deliver(*self.core.end_all(RequestStatus.FINISHED_SHUTDOWN))
            elif kind == "abort":
                with self._lock:
                    stream = self._streams.get(str(item))
                if stream is not None:
                    out = self.core.abort(stream.request)
                    if out is not None:
                        self._deliver(out)

    def _discharge(self, requests) -> None:
        """Take admitted or finished requests' positions off the queued-token count."""
        with self._lock:
            for req in requests:
                self._queued_tokens -= self._charged.pop(req.request_id, 0)

    def _deliver(self, *outs: RequestOutput) -> None:
        items = []
        now = time.monotonic()
        with self._lock:
            for out in outs:
                get = self._streams.pop if out.finished else self._streams.get
                stream = get(out.request_id, None)
                if stream is not None:
                    items.append((stream, out))
                if out.finished and out.finish_reason in ("stop", "length"):
                    self._finish_times.append(now)
                if out.finished:
                    # finished before admission (abort, timeout, shutdown): no longer queued
                    self._queued_tokens -= self._charged.pop(out.request_id, 0)
        deliver(items)

    def _fail_all(self, exc: BaseException) -> None:
        """Close every open stream with an error output. Request state is only touched once the loop has ended
        (or never ran): a loop still inside a step (``stop`` timed out) owns its requests, and its outputs find no
        stream any more."""
        with self._lock:
            self._dead = True
            streams = list(self._streams.values())
            self._streams.clear()
            self._charged.clear()
            self._queued_tokens = 0
        loop_over = self._done.is_set() or not self._entered
        for s in streams:
            req = s.request
            if loop_over and not req.status.is_finished:
                req.status = RequestStatus.FINISHED_ERROR
                req.finish_time = time.monotonic()
            s.put(make_output(req, error=str(exc)))
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
