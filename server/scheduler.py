"""Continuous (iteration-level) batching: which requests run in the next engine step, and how many tokens each.

Follows vLLM v1's contract: :meth:`Scheduler.schedule` returns a plan, :meth:`Scheduler.update_from_output`
applies the step's sampled tokens. The scheduler never touches tensors: KV memory is accounted in blocks by
:class:`~server.kv_cache.BlockAllocator`.

Policy, each step:
1. every running request gets its work first: one token for each decoding request, then, for ones still in
   prefill, the rest of the prompt (up to the step's token budget; longer prompts are prefilled in chunks);
2. waiting requests are admitted in arrival order while there is a free sequence slot, token budget, and KV
   blocks for their whole length (virtual + text + max_new_tokens). Admission stops at the first request that
   does not fit, so a long request is never starved by shorter ones behind it.
A request that joins while others decode therefore runs at the next step, and a finished one leaves at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.kv_cache import BlockAllocator
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
        rows: every row to run, in order.
        admitted: requests admitted this step (the engine loads their virtual-token KV before running).
        num_batched_tokens: sum of ``num_tokens``.
    """

    rows: list[ScheduledRow] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.rows


class Scheduler:
    """Waiting queue + running set under three limits.

    Args:
        allocator: KV block accounting.
        max_num_seqs: most running requests.
        max_num_batched_tokens: most positions computed in one step.
    """

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ------------------------------------------------------------------ queue
    def add(self, request: Request) -> None:
        """Queue a request. Raises ValueError if its KV can never fit the pool."""
        if not self.allocator.fits_ever(request.max_positions):
            raise ValueError(
                f"request needs {request.max_positions} KV positions; the pool holds "
                f"{self.allocator.num_blocks * self.allocator.block_size}"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish a request now (abort, error, or a stop the engine detected) and free its KV blocks."""
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

    # ------------------------------------------------------------------ plan
    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring for the policy)."""
        plan = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # decoding rows first (one token each), then the rest of running prefills, so a long chunked prefill
        # never stalls rows that are decoding
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for req in order:
            if budget <= 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            plan.rows.append(ScheduledRow(req, req.num_computed_tokens, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not self.allocator.can_allocate(req.max_positions):
                break
            self.waiting.popleft()
            req.blocks = self.allocator.allocate(req.request_id, req.max_positions)
            req.num_computed_tokens = req.num_cached_prefix
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.admitted.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            plan.rows.append(ScheduledRow(req, req.num_computed_tokens, n))
            budget -= n
        plan.num_batched_tokens = self.max_num_batched_tokens - budget
        return plan

    def update_from_output(self, plan: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Apply a step's results.

        Args:
            plan: the step's plan.
            sampled: request_id -> new token, for rows whose prompt was complete.
        Returns:
            The requests that finished in this step (EOS -> FINISHED_STOPPED; max_new_tokens -> FINISHED_LENGTH).
        """
        finished: list[Request] = []
        now = time.monotonic()
        for row in plan.rows:
            req = row.request
            if req.status.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens = row.start + row.num_tokens
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            status = None
            if tok in req.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif len(req.output_token_ids) >= req.params.max_new_tokens:
                status = RequestStatus.FINISHED_LENGTH
            if status is not None:
                self.running.remove(req)
                self._finalize(req, status)
                finished.append(req)
        return finished

    def _finalize(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.finish_time = time.monotonic()
        self.allocator.free(request.request_id)
        request.slots = None
