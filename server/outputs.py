"""Output processing, apart from the loop: detokenizing, stop strings, :class:`RequestOutput`, per-step metrics.

The engine thread calls :meth:`OutputProcessor.detokenize` after the runner sampled (so a stop string can finish
the request through the scheduler in the same step), then :meth:`OutputProcessor.outputs` after the scheduler
decided who finished. :class:`RequestStream` carries outputs to the HTTP layer's event loop.
"""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass

from server.detokenizer import TextPipeline
from server.metrics import Metrics
from server.request import Request, RequestStatus
from server.scheduler import SchedulerOutput


@dataclass(frozen=True)
class RequestOutput:
    """What a request learns after a step.

    Attributes:
        new_token_ids: tokens generated in this step (usually one).
        text: new text released in this step (complete characters only; never any part of a stop string).
        finished: whether the request is done; then ``finish_reason`` is "stop", "length", "abort", "timeout",
            "shutdown" or "error".
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


def make_output(req: Request, new: tuple[int, ...] = (), text: str = "", error: str | None = None) -> RequestOutput:
    """The :class:`RequestOutput` of ``req`` as it stands; with ``error``, a final output with finish reason
    "error" whatever the request's status."""
    ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
    finished, reason = (True, "error") if error is not None else (req.status.is_finished, req.status.finish_reason)
    return RequestOutput(
        req.request_id, new, text, finished, reason, len(req.prompt_token_ids), req.num_virtual_tokens,
        len(req.output_token_ids), ttft, error,
    )


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
        deliver([(self, out)])

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


def deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    """Hand outputs to their streams with one wake-up per event loop (not one per output), so the HTTP layer's
    loop takes the GIL once per engine step rather than once per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
    for stream, out in items:
        if stream._loop is not None and stream._aq is not None:
            by_loop.setdefault(stream._loop, []).append((stream._aq, out))
        else:
            stream._q.put(out)
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


def _put_all(pairs: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for aq, out in pairs:
        aq.put_nowait(out)


class OutputProcessor:
    """Per-request text pipelines and the step's outputs and metrics. Engine thread only.

    Args:
        tokenizer: the model's tokenizer.
        eos_token_ids: ids never shown as text.
        metrics: where step and token statistics go.
    """

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], metrics: Metrics) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics
        self._text: dict[str, TextPipeline] = {}
        self._pending: dict[str, str] = {}

    def add(self, req: Request) -> None:
        """Start the text pipeline of a newly submitted request."""
        self._text[req.request_id] = TextPipeline(self.tokenizer, self.eos_token_ids, req.params.stop)

    def detokenize(self, sampled: dict[str, int]) -> frozenset[str]:
        """Feed each new token to its request's pipeline; returns the ids whose text completed a stop string."""
        stopped = set()
        for rid, tok in sampled.items():
            pipe = self._text.get(rid)
            if pipe is None:
                continue
            text, hit = pipe.add(tok)
            self._pending[rid] = text
            if hit:
                stopped.add(rid)
        return frozenset(stopped)

    def outputs(self, plan: SchedulerOutput, sampled: dict[str, int], failed: frozenset[str]
                ) -> list[RequestOutput]:
        """The step's outputs, one per row that sampled, failed or finished; finished rows release their held
        text (unless a stop string ended them) and their pipeline."""
        outs = []
        for row in plan.rows:
            req = row.request
            rid = req.request_id
            tok = sampled.get(rid)
            if tok is None and rid not in failed:
                continue
            text = self._pending.pop(rid, "")
            if req.status.is_finished and req.status != RequestStatus.FINISHED_ERROR:
                pipe = self._text.get(rid)
                if pipe is not None:
                    text += pipe.finish()
            error = "the model produced non-finite logits for this request" if rid in failed else None
            outs.append(self.finish_or_keep(req, make_output(req, () if tok is None else (tok,), text, error)))
        return outs

    def flush(self, req: Request) -> str:
        """Text of ``req`` not yet released (held back as part of a character or of a possible stop string): what a
        request ended early (timeout, shutdown) still gets."""
        pipe = self._text.get(req.request_id)
        return self._pending.pop(req.request_id, "") + (pipe.finish() if pipe is not None else "")

    def finish_or_keep(self, req: Request, out: RequestOutput) -> RequestOutput:
        """Account ``out`` in the metrics and drop the request's pipeline when it is final."""
        task = req.task or "_base"
        if out.new_token_ids:
            self.metrics.generated_tokens.labels(task).inc(len(out.new_token_ids))
            if len(req.output_token_ids) == len(out.new_token_ids) and out.ttft is not None:
                self.metrics.ttft.labels(task).observe(out.ttft)
        if out.finished:
            self._text.pop(req.request_id, None)
            self._pending.pop(req.request_id, None)
        return out

    def observe_step(self, plan: SchedulerOutput, seconds: float) -> None:
        """Per-step statistics: rows, distinct tasks, tokens, time by step kind, admissions' queue wait."""
        m = self.metrics
        if plan.preempted:
            m.preemptions.inc(len(plan.preempted))
        if plan.is_empty:
            return
        m.batch_size.observe(len(plan.rows))
        m.batch_tasks.observe(len({r.request.task for r in plan.rows}))
        m.step_tokens.observe(plan.num_batched_tokens)
        m.step_duration.observe(seconds)
        m.step_seconds.labels(plan.kind).inc(seconds)
        m.step_tokens_total.labels(plan.kind).inc(plan.num_batched_tokens)
        for req in plan.admitted:
            if req.num_preemptions == 0:
                m.prompt_tokens.inc(len(req.prompt_token_ids))
                if req.admit_time is not None:
                    m.queue_wait.observe(req.admit_time - req.arrival_time)
