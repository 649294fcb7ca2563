"""The continuous-batching scheduler on its own (no model, no tensors beyond tiny prompt stand-ins)."""

from __future__ import annotations

import pytest
import torch
from srv_helpers import make_prompt

from server.kv_cache import BlockAllocator
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler

EOS = 2


def req(rid: str, nt: int, mn: int = 4, nv: int = 0) -> Request:
    prompt = make_prompt(f"task{nv}", torch.randn(nv, 4)) if nv else None
    r = Request(rid, list(range(100, 100 + nt)), SamplingParams(max_new_tokens=mn), prompt,
                prompt.task if prompt else "")
    r.eos_token_ids = frozenset({EOS})
    return r


def sched(num_blocks: int = 64, block_size: int = 4, seqs: int = 8, tokens: int = 64) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks, block_size), seqs, tokens)


def rows_of(plan) -> list[tuple[str, int, int]]:
    return [(r.request.request_id, r.start, r.num_tokens) for r in plan.rows]


def step(s: Scheduler, tokens: dict[str, int] | None = None, default: int = 7):
    """Schedule, then sample ``default`` (or ``tokens[id]``) for every row that completes its prompt."""
    plan = s.schedule()
    sampled = {r.request.request_id: (tokens or {}).get(r.request.request_id, default)
               for r in plan.rows if r.completes_prompt}
    finished = s.update_from_output(plan, sampled)
    return plan, finished


def test_request_status_order_and_finish_reasons():
    order = [RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED,
             RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR]
    assert order == sorted(order)
    assert [s.is_finished for s in order] == [False, False, True, True, True, True]
    assert [s.finish_reason for s in order] == [None, None, "stop", "length", "abort", "error"]


def test_request_positions_with_virtual_tokens():
    r = req("a", nt=5, mn=7, nv=3)
    assert r.num_virtual_tokens == 3 and r.num_prompt_positions == 8 and r.max_positions == 15
    assert r.num_cached_prefix == 2
    r.output_token_ids.extend([9, 8])
    assert r.num_tokens == 10
    assert r.token_ids_for(1, 10) == [0, 0, 100, 101, 102, 103, 104, 9, 8]
    base = req("b", nt=2)
    assert base.num_virtual_tokens == 0 and base.num_cached_prefix == 0


def test_admission_is_fifo_and_reserves_whole_length():
    s = sched()
    rs = [req(f"r{i}", nt=3 + i, mn=5) for i in range(3)]
    for r in rs:
        s.add(r)
    plan = s.schedule()
    assert [r.request_id for r in plan.admitted] == ["r0", "r1", "r2"]
    assert rows_of(plan) == [("r0", 0, 3), ("r1", 0, 4), ("r2", 0, 5)]
    assert all(r.status == RequestStatus.RUNNING for r in rs)
    assert [len(r.blocks) for r in rs] == [2, 3, 3]  # ceil((3+5)/4), ceil(9/4), ceil(10/4)
    assert s.allocator.num_used_blocks == 8
    assert plan.num_batched_tokens == 12
    assert all(r.completes_prompt for r in plan.rows)


def test_virtual_tokens_start_after_the_cached_prefix():
    s = sched()
    r = req("v", nt=4, mn=3, nv=6)
    s.add(r)
    plan = s.schedule()
    # positions 0..4 come from the prompt's KV cache; the last virtual token is computed with the text
    assert rows_of(plan) == [("v", 5, 5)]
    assert r.num_computed_tokens == 5 and len(r.blocks) == 4  # ceil(13/4)
    assert plan.rows[0].completes_prompt


def test_max_num_seqs_limits_running():
    s = sched(seqs=2)
    rs = [req(f"r{i}", nt=2, mn=3) for i in range(3)]
    for r in rs:
        s.add(r)
    plan, _ = step(s)
    assert [r.request_id for r in plan.admitted] == ["r0", "r1"]
    assert list(s.waiting) == [rs[2]] and rs[2].status == RequestStatus.WAITING
    plan, finished = step(s, {"r0": EOS})
    assert finished == [rs[0]] and rs[0].status == RequestStatus.FINISHED_STOPPED
    assert rows_of(plan) == [("r0", 2, 1), ("r1", 2, 1)]  # r2 could not join: 2 were running at plan time
    plan, _ = step(s)
    assert [r.request_id for r in plan.admitted] == ["r2"]
    assert rows_of(plan) == [("r1", 3, 1), ("r2", 0, 2)]


def test_chunked_prefill_splits_a_long_prompt():
    s = sched(tokens=16)
    r = req("long", nt=40, mn=2)
    s.add(r)
    plans, completes = [], []
    for _ in range(3):
        plan = s.schedule()
        completes.append(plan.rows[0].completes_prompt)  # judged before the step's token is applied
        s.update_from_output(plan, {"long": 7} if completes[-1] else {})
        plans.append(plan)
    assert [rows_of(p) for p in plans] == [[("long", 0, 16)], [("long", 16, 16)], [("long", 32, 8)]]
    assert completes == [False, False, True]
    assert [p.num_batched_tokens for p in plans] == [16, 16, 8]
    assert r.output_token_ids == [7]  # one token, sampled only after the last chunk
    plan, finished = step(s)
    assert rows_of(plan) == [("long", 40, 1)] and finished == [r]
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7, 7]


def test_budget_goes_to_running_rows_first():
    s = sched(tokens=16)
    a = req("a", nt=3, mn=10)
    s.add(a)
    step(s)  # a prefilled, decoding now
    b, c = req("b", nt=30, mn=2), req("c", nt=2, mn=2)
    s.add(b)
    s.add(c)
    plan, _ = step(s)
    # a decodes (1 token), b takes the remaining 15 of the budget; c must wait for budget (FIFO)
    assert rows_of(plan) == [("a", 3, 1), ("b", 0, 15)]
    assert list(s.waiting) == [c]
    plan, _ = step(s)
    assert rows_of(plan) == [("a", 4, 1), ("b", 15, 15)]
    plan, _ = step(s)
    assert rows_of(plan) == [("a", 5, 1), ("b", 30, 1), ("c", 0, 2)]


def test_kv_exhaustion_blocks_admission_until_blocks_are_freed():
    s = sched(num_blocks=4, block_size=4)  # 16 positions in all
    a = req("a", nt=6, mn=4)  # 10 positions -> 3 blocks
    b = req("b", nt=4, mn=4)  # 8 positions -> 2 blocks: does not fit beside a
    c = req("c", nt=1, mn=2)  # 3 positions -> 1 block: would fit, but FIFO keeps it behind b
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    assert plan.admitted == [a] and list(s.waiting) == [b, c]
    s.update_from_output(plan, {"a": 5})
    for _ in range(2):
        plan, _ = step(s)
        assert plan.admitted == [] and list(s.waiting) == [b, c]
    plan, finished = step(s)  # a's fourth token: length
    assert finished == [a] and a.status == RequestStatus.FINISHED_LENGTH
    assert s.allocator.num_free_blocks == 4
    plan, _ = step(s)
    assert plan.admitted == [b, c] and s.allocator.num_used_blocks == 3


def test_add_refuses_a_request_that_can_never_fit():
    s = sched(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="9 KV positions"):
        s.add(req("x", nt=5, mn=4))
    assert not s.has_work()


def test_finish_on_eos_and_on_length():
    s = sched()
    a, b = req("a", nt=2, mn=5), req("b", nt=2, mn=2)
    s.add(a)
    s.add(b)
    _, finished = step(s, {"a": 11, "b": 12})
    assert finished == []
    _, finished = step(s, {"a": EOS, "b": 13})
    assert set(finished) == {a, b}
    assert a.status == RequestStatus.FINISHED_STOPPED and a.status.finish_reason == "stop"
    assert b.status == RequestStatus.FINISHED_LENGTH and b.status.finish_reason == "length"
    assert a.output_token_ids == [11, EOS] and b.output_token_ids == [12, 13]
    assert s.running == [] and s.allocator.num_used_blocks == 0 and not s.has_work()
    assert a.finish_time is not None and a.first_token_time is not None


def test_eos_on_the_last_allowed_token_is_a_stop():
    s = sched()
    r = req("a", nt=2, mn=1)
    s.add(r)
    _, finished = step(s, {"a": EOS})
    assert finished == [r] and r.status == RequestStatus.FINISHED_STOPPED


def test_abort_frees_blocks_running_or_waiting():
    s = sched(seqs=1)
    a, b = req("a", nt=3, mn=8), req("b", nt=3, mn=8)
    s.add(a)
    s.add(b)
    step(s)
    used = s.allocator.num_used_blocks
    assert used == 3 and list(s.waiting) == [b]
    s.finish(b, RequestStatus.FINISHED_ABORTED)  # waiting: removed, held nothing
    assert list(s.waiting) == [] and b.status == RequestStatus.FINISHED_ABORTED
    assert s.allocator.num_used_blocks == used
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert s.running == [] and s.allocator.num_used_blocks == 0 and a.status.finish_reason == "abort"
    s.finish(a, RequestStatus.FINISHED_ERROR)  # already finished: no change
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert not s.has_work()


def test_abort_between_schedule_and_update_is_ignored_by_update():
    s = sched()
    a, b = req("a", nt=2, mn=4), req("b", nt=2, mn=4)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    finished = s.update_from_output(plan, {"a": 5, "b": 6})
    assert finished == []
    assert a.output_token_ids == [] and b.output_token_ids == [6]
    assert s.running == [b]


def test_request_joining_while_others_decode_runs_at_the_next_step():
    s = sched()
    a = req("a", nt=3, mn=10)
    s.add(a)
    step(s)
    step(s)
    assert a.output_token_ids == [7, 7]
    b = req("b", nt=4, mn=2, nv=2)
    s.add(b)
    plan, _ = step(s)
    assert plan.admitted == [b]
    assert rows_of(plan) == [("a", 4, 1), ("b", 1, 5)]
    assert b.output_token_ids == [7] and len(a.output_token_ids) == 3
