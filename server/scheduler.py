"""Continuous (iteration-level) batching with KV on demand and preemption.

Follows vLLM v1's contract: :meth:`Scheduler.schedule` returns a plan (:class:`SchedulerOutput`), the model runner
executes it, :meth:`Scheduler.update_from_output` applies the results. Every finish goes through the scheduler:
EOS, ``max_new_tokens``, stop strings (reported by the output processor), aborts and errors. The scheduler never
touches tensors: KV memory is accounted in blocks (:class:`~server.block_pool.BlockPool`) and each prompt's shared
virtual-token KV through :class:`~server.prompt_cache.PromptKVCache`.

Policy, each step:
1. running requests get their work first, decode rows (one token) before the rest of running prefills (chunked
   to the step's token budget). A row that needs a new KV block takes one; when none is free, unused cached
   prompts are evicted, then the most recently admitted running request is *preempted*: its blocks are freed and
   it goes back to the front of the queue, to be recomputed (text and generated tokens) when it is admitted again;
2. if nobody was preempted, waiting requests are admitted in arrival order while there is a sequence slot, token
   budget, and KV blocks for the positions they compute *now* (not their whole possible length). Admission stops
   at the first request that does not fit, so a long request is never starved by shorter ones behind it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.block_pool import BlockPool, BlockPoolExhausted
from server.prompt_cache import PromptKV, PromptKVCache
from server.request import Request, RequestStatus


@dataclass
class ScheduledRow:
    """``request`` computes positions ``[start, start + num_tokens)`` this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when, after this step, every known position is computed, so the row samples a token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """The plan of one step.

    Attributes:
        rows: every row to run, one-token rows first (the attention metadata's order).
        admitted: requests admitted (or re-admitted after preemption) this step.
        prompts_to_compute: ``(entry, request)``: prompt KV the runner computes before the rows, from
            ``request.soft_prompt``, into the entry's full blocks and (the tail) the request's first own block.
        tail_copies: ``(request, entry)``: copy the entry's tail into the request's first own block (every
            request of an entry but the one that created it).
        evicted_prompts: prompt-KV entries evicted since the last step (the runner drops their tails and may keep
            their KV in the host tier; their blocks are free but not yet rewritten).
        finished_ids: requests finished since the last step (the runner drops their state).
        preempted: requests preempted this step.
        num_batched_tokens: sum of the rows' ``num_tokens``.
    """

    rows: list[ScheduledRow] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    prompts_to_compute: list[tuple[PromptKV, Request]] = field(default_factory=list)
    tail_copies: list[tuple[Request, PromptKV]] = field(default_factory=list)
    evicted_prompts: list[PromptKV] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.rows

    @property
    def kind(self) -> str:
        """"prefill" (no one-token row), "decode" (only one-token rows) or "mixed"."""
        ones = sum(1 for r in self.rows if r.num_tokens == 1)
        return "prefill" if ones == 0 else "decode" if ones == len(self.rows) else "mixed"


class Scheduler:
    """Waiting queue + running set under three limits: sequences, tokens per step, KV blocks.

    Args:
        pool: KV block accounting (shared with ``prompt_cache``).
        prompt_cache: the prompts' shared virtual-token KV.
        max_num_seqs: most running requests.
        max_num_batched_tokens: most positions computed in one step.
    """

    def __init__(self, pool: BlockPool, prompt_cache: PromptKVCache, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.prompt_cache = prompt_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self._finished_ids: list[str] = []

    # ------------------------------------------------------------------ queue
    def fits_ever(self, num_positions: int) -> bool:
        """Whether a request of ``num_positions`` positions could run in an otherwise empty KV pool."""
        return self.pool.blocks_for(num_positions) <= self.pool.num_blocks

    def add(self, request: Request) -> None:
        """Queue a request.

        Raises:
            ValueError: its KV can never fit the pool.
        """
        if not self.fits_ever(request.max_positions):
            raise ValueError(
                f"request needs {request.max_positions} KV positions; the pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish a request now (abort, timeout, shutdown or error) and free its KV blocks; no-op if already
        finished."""
        if request.status.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self._finalize(request, status)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished(self) -> list[Request]:
        """Every running and waiting request, running first."""
        return [*self.running, *self.waiting]

    def past_deadline(self, now: float) -> list[Request]:
        """Running and waiting requests whose deadline is at or before ``now`` (``time.monotonic()`` seconds)."""
        return [r for r in self.unfinished() if r.deadline is not None and r.deadline <= now]

    # ------------------------------------------------------------------ plan
    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring for the policy)."""
        plan = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        scheduled: dict[int, ScheduledRow] = {}
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            budget = self.max_num_batched_tokens - sum(r.num_tokens for r in scheduled.values())
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._grow(req, req.num_computed_tokens + n, plan, scheduled):
                scheduled[id(req)] = ScheduledRow(req, req.num_computed_tokens, n)
        budget = self.max_num_batched_tokens - sum(r.num_tokens for r in scheduled.values())
        if not plan.preempted:
            self._admit(plan, scheduled, budget)
        plan.rows = sorted(scheduled.values(), key=lambda r: r.num_tokens > 1)
        plan.num_batched_tokens = sum(r.num_tokens for r in plan.rows)
        plan.evicted_prompts = self.prompt_cache.drain_evicted()
        return plan

    def _grow(self, req: Request, num_positions: int, plan: SchedulerOutput,
              scheduled: dict[int, ScheduledRow]) -> bool:
        """Give ``req`` blocks for ``num_positions`` positions, evicting unused prompts and then preempting the
        most recently admitted running requests as needed. Returns False if ``req`` itself was preempted."""
        need = self.pool.blocks_for(num_positions) - len(req.block_table)
        while need > 0 and not self.prompt_cache.make_room(need):
            victim = self.running[-1]
            self._preempt(victim, plan)
            scheduled.pop(id(victim), None)  # its tokens leave this step's plan with it
            if victim is req:
                return False
        if need > 0:
            req.block_table.extend(self.pool.allocate(need))
        return True

    def _admit(self, plan: SchedulerOutput, scheduled: dict[int, ScheduledRow], budget: int) -> None:
        """Admit waiting requests in order while a sequence slot, token budget and KV blocks allow."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            entry, created = None, False
            p = req.num_shared_prefix
            if p > 0 and req.soft_prompt.sha256 not in self.prompt_cache:
                # a miss needs the prompt's full blocks and the request's own: make room for both or evict nothing
                own = self.pool.blocks_for(p + min(req.num_tokens - p, budget)) - p // self.pool.block_size
                if not self.prompt_cache.make_room(p // self.pool.block_size + own):
                    break
            if p > 0:
                try:
                    entry, created = self.prompt_cache.acquire(req.soft_prompt.sha256, p)
                except BlockPoolExhausted:
                    break
            start = entry.num_tokens if entry is not None else 0
            n = min(req.num_tokens - start, budget)
            shared = list(entry.full_blocks) if entry is not None else []
            need = self.pool.blocks_for(start + n) - len(shared)
            if not self.prompt_cache.make_room(need):
                if entry is not None:
                    self.pool.release(entry.full_blocks)
                    self.prompt_cache.release(entry)
                break
            self.waiting.popleft()
            req.block_table = shared + self.pool.allocate(need)
            req.prompt_kv = entry
            req.num_computed_tokens = start
            req.status = RequestStatus.RUNNING
            req.admit_time = time.monotonic()
            self.running.append(req)
            plan.admitted.append(req)
            if created:
                plan.prompts_to_compute.append((entry, req))  # its tail is computed into req's first own block
            elif entry is not None and entry.tail_len:
                plan.tail_copies.append((req, entry))
            scheduled[id(req)] = ScheduledRow(req, start, n)
            budget -= n

    def update_from_output(self, plan: SchedulerOutput, sampled: dict[str, int],
                           stopped: frozenset[str] = frozenset(), failed: frozenset[str] = frozenset()
                           ) -> list[Request]:
        """Apply a step's results; every finish decision of a step is made here.

        Args:
            plan: the step's plan.
            sampled: request_id -> new token, for rows whose prompt was complete.
            stopped: ids whose new text completed a stop string (finish "stop", before any other reason).
            failed: ids whose logits were unusable (finish "error").
        Returns:
            The requests that finished in this step: stop string or EOS -> FINISHED_STOPPED; max_new_tokens ->
            FINISHED_LENGTH; failed -> FINISHED_ERROR.
        """
        for entry, _ in plan.prompts_to_compute:
            self.prompt_cache.mark_computed(entry)
        finished: list[Request] = []
        now = time.monotonic()
        for row in plan.rows:
            req = row.request
            if req.status != RequestStatus.RUNNING:  # aborted while the step ran
                continue
            if req.request_id in failed:
                self.running.remove(req)
                self._finalize(req, RequestStatus.FINISHED_ERROR)
                finished.append(req)
                continue
            req.num_computed_tokens = row.start + row.num_tokens
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            status = None
            if req.request_id in stopped or tok in req.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif len(req.output_token_ids) >= req.params.max_new_tokens:
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                self.running.remove(req)
                self._finalize(req, status)
                finished.append(req)
        return finished

    # ------------------------------------------------------------------ KV release
    def _release_kv(self, req: Request) -> None:
        if req.block_table:
            self.pool.release(req.block_table)
        req.block_table = []
        if req.prompt_kv is not None:
            self.prompt_cache.release(req.prompt_kv)
            req.prompt_kv = None

    def _preempt(self, req: Request, plan: SchedulerOutput) -> None:
        """Free ``req``'s KV and put it back at the head of the queue; it recomputes everything when readmitted
        (its generated tokens are kept, so it resumes where it stopped)."""
        self.running.remove(req)
        self._release_kv(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req)

    def _finalize(self, request: Request, status: RequestStatus) -> None:
        self._release_kv(request)
        request.status = status
        request.finish_time = time.monotonic()
        self._finished_ids.append(request.request_id)
