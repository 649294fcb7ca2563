"""The engine: a thread that runs the continuous-batching loop, and a thread-safe front for the HTTP layer.

The loop is a few lines: drain new requests and aborts, ``schedule()`` a plan, run one packed forward pass,
sample, ``update_from_output()``, and hand each request its new tokens. The HTTP layer only enqueues and awaits
:class:`RequestStream` objects, so it never blocks on the model. If the loop dies, :attr:`Engine.error` is set,
every pending request gets an error output at once, and new submissions raise :class:`EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import torch

from server.detokenizer import OutputProcessor
from server.kv_cache import BlockAllocator
from server.metrics import Metrics
from server.model_loader import LoadedModel
from server.model_runner import ModelRunner, RowInput
from server.request import Request, RequestStatus
from server.sampler import sample
from server.scheduler import Scheduler, SchedulerOutput

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


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``kv_cache_bytes`` (bytes) sizes the KV pool; the rest are counts of sequences/tokens."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int = 1024**3
    block_size: int = 16
    max_virtual_tokens: int = 128
    prefix_cache_bytes: int = 256 * 1024**2
    max_waiting: int = 1024


@dataclass(frozen=True)
class RequestOutput:
    """What a request learns after a step.

    Attributes:
        new_token_ids: tokens generated in this step (usually one).
        text: new text released in this step (complete characters only; never any part of a stop string).
        finished: whether the request is done; then ``finish_reason`` is "stop", "length", "abort" or "error".
        num_prompt_tokens, num_virtual_tokens, num_output_tokens: usage so far, tokens.
        ttft: seconds from arrival to the first token, once known.
        error: message when ``finish_reason == "error"``.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_virtual_tokens: int
    num_output_tokens: int
    ttft: float | None = None
    error: str | None = None


class RequestStream:
    """Outputs of one request, delivered from the engine thread to an asyncio loop (or to a plain queue when
    created outside a running loop, as in scripts and tests)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue[RequestOutput] | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._aq = None, None
        self._q: queue.Queue[RequestOutput] = queue.Queue()

    def put(self, out: RequestOutput) -> None:
        """Called by the engine thread."""
        if self._loop is not None and self._aq is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass
        else:
            self._q.put(out)

    async def __aiter__(self):
        if self._aq is None:
            raise RuntimeError("this stream was created outside an event loop; use iter_sync()")
        while True:
            out = await self._aq.get()
            yield out
            if out.finished:
                return

    def iter_sync(self, timeout: float | None = None):
        """Blocking iteration for callers without an event loop."""
        while True:
            out = self._q.get(timeout=timeout)
            yield out
            if out.finished:
                return


class Engine:
    """Owns the scheduler and model runner; runs them on a background thread.

    Args:
        loaded: the frozen base model.
        config: limits.
        metrics: where to report; a fresh :class:`Metrics` if None.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, metrics: Metrics | None = None):
        self.loaded = loaded
        self.config = cfg = config or EngineConfig()
        self.metrics = metrics or Metrics()
        bpt = ModelRunner.bytes_per_token(loaded)
        num_blocks = max(cfg.kv_cache_bytes // (bpt * cfg.block_size), 1)
        self.allocator = BlockAllocator(num_blocks, cfg.block_size)
        self.runner = ModelRunner(
            loaded, num_blocks=num_blocks, block_size=cfg.block_size,
            max_virtual_tokens=cfg.max_virtual_tokens, prefix_cache_bytes=cfg.prefix_cache_bytes,
        )
        self.scheduler = Scheduler(self.allocator, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.max_context = loaded.max_context
        self.error: BaseException | None = None
        self.steps = 0
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams and _dead
        self._dead = False
        self._thread: threading.Thread | None = None

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
        if not self.allocator.fits_ever(total):
            cap = self.allocator.num_blocks * self.allocator.block_size
            raise RequestRejectedError(
                f"virtual tokens ({nv}) + text tokens ({nt}) + max_new_tokens ({mn}) = {total} exceeds the KV "
                f"cache of {cap} tokens (raise --kv-cache-bytes)", "kv_cache_exceeded",
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
        if len(self.scheduler.waiting) + self._inbox.qsize() >= self.config.max_waiting:
            raise EngineOverloadedError(f"{self.config.max_waiting} requests already waiting")
        request.eos_token_ids = self.eos_token_ids
        request.processor = OutputProcessor(self.loaded.tokenizer, self.eos_token_ids, request.params.stop)
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
                if not self._drain_inbox() and not self.scheduler.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self.scheduler.has_work():
                    self.step()
        except BaseException as exc:  # noqa: BLE001 - the loop reports any death, then fails requests fast
            log.exception("engine loop died")
            self.error = exc
            self.metrics.engine_alive.set(0)
            self._fail_all(EngineDeadError(f"engine loop died: {exc!r}"))

    def _drain_inbox(self) -> bool:
        got = False
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return got
            got = True
            if kind == "add":
                self.scheduler.add(item)  # type: ignore[arg-type]
            elif kind == "abort":
                self._abort_now(str(item))

    def _abort_now(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None or stream.request.status.is_finished:
            return
        self.scheduler.finish(stream.request, RequestStatus.FINISHED_ABORTED)
        self._emit(stream.request, (), "")
        self._refresh_gauges()

    def step(self) -> SchedulerOutput:
        """Run one engine step: plan, forward, sample, apply."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return plan
        self._prepare(plan.admitted)
        rows = [self._row_input(r.request, r.start, r.num_tokens, r.completes_prompt) for r in plan.rows]
        logits = self.runner.forward(rows)
        sampling = [r.request for r in plan.rows if r.completes_prompt]
        logits, sampling = self._drop_non_finite(logits, sampling)
        tokens = sample(logits, [q.params for q in sampling], [q.generator for q in sampling])
        sampled = {q.request_id: t for q, t in zip(sampling, tokens, strict=True)}
        self.scheduler.update_from_output(plan, sampled)
        for q in sampling:
            self._emit(q, (sampled[q.request_id],), self._text(q, sampled[q.request_id]))
        self.steps += 1
        self._observe(plan)
        self.metrics.step_duration.observe(time.perf_counter() - t0)
        return plan

    def _drop_non_finite(self, logits: torch.Tensor, rows: list[Request]) -> tuple[torch.Tensor, list[Request]]:
        """Finish, with an error, only the rows whose logits (``[num_rows, vocab]``) hold NaN or +inf, or are all
        -inf (nothing to pick); the loop and every other row go on. A -inf for some tokens is a valid mask."""
        bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
        ok = (~bad).tolist()
        if all(ok):
            return logits, rows
        for q, good in zip(rows, ok, strict=True):
            if not good:
                log.error("request %s (task %r): non-finite logits; finished with an error", q.request_id, q.task)
                self.scheduler.finish(q, RequestStatus.FINISHED_ERROR)
                self._emit(q, (), "", error="the model produced non-finite logits for this request")
        keep = [i for i, good in enumerate(ok) if good]
        return logits[keep], [rows[i] for i in keep]

    def _prepare(self, admitted: list[Request]) -> None:
        """Give admitted requests their KV slots, their prompts' virtual-token KV (new prompts computed together
        in one packed pass), and their generators."""
        with_prompt = [q for q in admitted if q.soft_prompt is not None]
        prefixes = self.runner.prefixes_for([(q.soft_prompt.sha256, q.soft_prompt.embeddings) for q in with_prompt])
        prefix_of = {q.request_id: p for q, p in zip(with_prompt, prefixes, strict=True)}
        for req in admitted:
            req.slots = self.runner.pool.slots_for(req.blocks, req.max_positions)
            prefix = prefix_of.get(req.request_id)
            if prefix is not None:
                self.runner.load_prefix(req.slots, prefix)
            if not req.params.greedy:
                seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
                req.generator = torch.Generator(device="cpu").manual_seed(seed)
            self.metrics.prompt_tokens.inc(len(req.prompt_token_ids))

    @staticmethod
    def _row_input(req: Request, start: int, n: int, need_logits: bool) -> RowInput:
        nv = req.num_virtual_tokens
        virtual = None
        if start < nv:
            virtual = req.soft_prompt.embeddings[start : min(nv, start + n)]  # type: ignore[union-attr]
        assert req.slots is not None  # set by _prepare; internal invariant, not input validation
        return RowInput(req.slots, start, req.token_ids_for(start, start + n), virtual, need_logits)

    def _text(self, req: Request, token: int) -> str:
        """Detokenize ``token`` and apply stop strings; a stop string ends the request now, with reason "stop"."""
        proc = req.processor
        if proc is None:
            return ""
        text, hit_stop = proc.add(token)
        if hit_stop:
            if req.status.is_finished:  # it also hit max_new_tokens in this step: the stop string wins
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        elif req.status.is_finished:
            text += proc.finish()
        return text

    def _emit(self, req: Request, new: tuple[int, ...], text: str, error: str | None = None) -> None:
        finished = req.status.is_finished
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
        out = RequestOutput(
            req.request_id, new, text, finished, req.status.finish_reason, len(req.prompt_token_ids),
            req.num_virtual_tokens, len(req.output_token_ids), ttft, error,
        )
        if new:
            self.metrics.generated_tokens.labels(req.task or "_base").inc(len(new))
            if len(req.output_token_ids) == len(new) and ttft is not None:
                self.metrics.ttft.labels(req.task or "_base").observe(ttft)
        with self._lock:
            stream = self._streams.pop(req.request_id, None) if finished else self._streams.get(req.request_id)
        if stream is not None:
            stream.put(out)

    def _observe(self, plan: SchedulerOutput) -> None:
        m = self.metrics
        m.batch_size.observe(len(plan.rows))
        m.batch_tasks.observe(len({r.request.task for r in plan.rows}))
        m.step_tokens.observe(plan.num_batched_tokens)
        self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_used_blocks.set(self.allocator.num_used_blocks)

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
            s.put(
                RequestOutput(
                    req.request_id, (), "", True, "error", len(req.prompt_token_ids), req.num_virtual_tokens,
                    len(req.output_token_ids), None, str(exc),
                )
            )
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
