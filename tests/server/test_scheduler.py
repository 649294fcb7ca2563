"""The continuous-batching scheduler on its own: no model, no KV tensors; block ids and reference counts are exact.

Blocks of 4 positions throughout. A step samples ``100 + len(output)`` for every row that completes its prompt
(never EOS), so a request's tokens show whether anything was lost or repeated across preemption.
"""

from __future__ import annotations

import pytest
from srv_helpers import make_prompt, rand_tensor

from server.block_pool import BlockPool
from server.prompt_cache import PromptKVCache
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler, SchedulerOutput

EOS = 2
BS = 4
BPT = 10  # KV bytes per position


def prompt(nv: int, seed: int = 0):
    """A registered SoftPrompt of ``nv`` virtual tokens (hidden size 4); equal seeds give equal content."""
    return make_prompt(f"task{nv}-{seed}", rand_tensor(nv, seed=seed, hidden=4))


def req(rid: str, nt: int, mn: int = 4, sp=None) -> Request:
    r = Request(rid, list(range(100, 100 + nt)), SamplingParams(max_new_tokens=mn), sp, sp.task if sp else "")
    r.eos_token_ids = frozenset({EOS})
    return r


def sched(num_blocks: int = 64, seqs: int = 8, tokens: int = 64, budget: int = 10**6) -> Scheduler:
    pool = BlockPool(num_blocks, BS)
    return Scheduler(pool, PromptKVCache(pool, budget, BPT), seqs, tokens)


def rows_of(plan: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(r.request.request_id, r.start, r.num_tokens) for r in plan.rows]


def ids(reqs) -> list[str]:
    return [r.request_id for r in reqs]


def refs(s: Scheduler, blocks) -> list[int]:
    return [s.pool.ref_count(b) for b in blocks]


def sample_for(plan: SchedulerOutput, tokens: dict[str, int] | None = None) -> dict[str, int]:
    return {r.request.request_id: (tokens or {}).get(r.request.request_id, 100 + len(r.request.output_token_ids))
            for r in plan.rows if r.completes_prompt}


def step(s: Scheduler, tokens: dict[str, int] | None = None, **kw):
    """Schedule, then sample for every row that completes its prompt (``tokens[id]`` or ``100 + len(output)``)."""
    plan = s.schedule()
    finished = s.update_from_output(plan, sample_for(plan, tokens), **kw)
    return plan, finished


# ------------------------------------------------------------------------------------------------ Request
def test_request_status_order_and_finish_reasons():
    order = [RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED,
             RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR]
    assert order == sorted(order)
    assert [s.is_finished for s in order] == [False, False, True, True, True, True]
    assert [s.finish_reason for s in order] == [None, None, "stop", "length", "abort", "error"]


def test_request_positions_with_virtual_tokens():
    r = req("a", nt=5, mn=7, sp=prompt(3))
    assert r.num_virtual_tokens == 3 and r.num_prompt_positions == 8 and r.max_positions == 15
    assert r.num_shared_prefix == 2
    assert r.block_table == [] and r.prompt_kv is None and r.num_preemptions == 0
    r.output_token_ids.extend([9, 8])
    assert r.num_tokens == 10
    assert r.token_ids_for(1, 10) == [0, 0, 100, 101, 102, 103, 104, 9, 8]
    assert r.token_ids_for(8, 10) == [9, 8]
    base = req("b", nt=2)
    assert base.num_virtual_tokens == 0 and base.num_shared_prefix == 0
    assert req("c", nt=2, sp=prompt(1)).num_shared_prefix == 0  # the only virtual token is computed with the text
    assert req("c", nt=2, sp=prompt(1)).num_input_positions == 3
    assert req("e", nt=0, sp=prompt(3)).num_input_positions == 1


def test_prefix_prompt_is_all_shared_and_its_text_starts_after_it():
    """A prefix-tuning prompt's virtual tokens are all served from the prompt-KV cache: admission starts the row at
    position n, and with empty text there is no input position."""
    pfx = make_prompt("pfx", rand_tensor(6, seed=3, hidden=4), "PREFIX_TUNING")
    r = req("p", nt=3, mn=2, sp=pfx)
    assert (r.num_shared_prefix, r.num_input_positions) == (6, 3)
    assert req("q", nt=0, sp=pfx).num_input_positions == 0
    s = sched()
    s.add(r)
    plan = s.schedule()
    assert [(row.start, row.num_tokens) for row in plan.rows] == [(6, 3)]
    assert r.prompt_kv.num_tokens == 6 and plan.prompts_to_compute == [(r.prompt_kv, r)]


# ------------------------------------------------------------------------------------------------ admission
def test_admission_is_fifo_and_takes_blocks_for_the_positions_computed_now():
    s = sched()
    rs = [req(f"r{i}", nt=3 + i, mn=5) for i in range(3)]
    for r in rs:
        s.add(r)
    plan = s.schedule()
    assert ids(plan.admitted) == ["r0", "r1", "r2"]
    assert rows_of(plan) == [("r0", 0, 3), ("r1", 0, 4), ("r2", 0, 5)]
    assert all(r.status == RequestStatus.RUNNING for r in rs)
    # ceil(3/4), ceil(4/4), ceil(5/4): not the whole possible length (that would be 2, 3, 3)
    assert [r.block_table for r in rs] == [[0], [1], [2, 3]]
    assert s.pool.num_used == 4
    assert plan.num_batched_tokens == 12 and plan.kind == "prefill"
    assert all(r.completes_prompt for r in plan.rows)
    assert plan.prompts_to_compute == [] and plan.tail_copies == [] and plan.preempted == []


def test_blocks_grow_one_at_a_time_as_decode_crosses_block_boundaries():
    s = sched()
    a, b = req("a", nt=3, mn=8), req("b", nt=3, mn=8)
    s.add(a)
    s.add(b)
    tables, used = [], []
    for _ in range(8):
        plan, finished = step(s)
        tables.append((list(a.block_table), list(b.block_table)))
        used.append(s.pool.num_used)
    # step 1 computes positions 0..2, step k >= 2 position k + 1: 0..3 fit one block, 4..7 two, 8 and 9 three
    assert tables[:7] == [([0], [1])] * 2 + [([0, 2], [1, 3])] * 4 + [([0, 2, 4], [1, 3, 5])]
    assert used == [2, 2, 4, 4, 4, 4, 6, 0]
    assert set(finished) == {a, b} and a.status == RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == list(range(100, 108)) and a.block_table == [] and s.pool.num_free == 64


def test_max_num_seqs_limits_running():
    s = sched(seqs=2)
    rs = [req(f"r{i}", nt=2, mn=3) for i in range(3)]
    for r in rs:
        s.add(r)
    plan, _ = step(s)
    assert ids(plan.admitted) == ["r0", "r1"]
    assert list(s.waiting) == [rs[2]] and rs[2].status == RequestStatus.WAITING and rs[2].block_table == []
    plan, finished = step(s, {"r0": EOS})
    assert finished == [rs[0]] and rs[0].status == RequestStatus.FINISHED_STOPPED
    assert rows_of(plan) == [("r0", 2, 1), ("r1", 2, 1)]  # r2 could not join: 2 were running at plan time
    plan, _ = step(s)
    assert ids(plan.admitted) == ["r2"]
    assert rows_of(plan) == [("r1", 3, 1), ("r2", 0, 2)]


def test_chunked_prefill_splits_a_long_prompt_and_grows_its_blocks():
    s = sched(tokens=16)
    r = req("long", nt=40, mn=2)
    s.add(r)
    plans, completes, blocks = [], [], []
    for _ in range(3):
        plan = s.schedule()
        completes.append(plan.rows[0].completes_prompt)  # judged before the step's token is applied
        blocks.append(len(r.block_table))
        s.update_from_output(plan, {"long": 7} if completes[-1] else {})
        plans.append(plan)
    assert [rows_of(p) for p in plans] == [[("long", 0, 16)], [("long", 16, 16)], [("long", 32, 8)]]
    assert completes == [False, False, True]
    assert blocks == [4, 8, 10]
    assert [p.num_batched_tokens for p in plans] == [16, 16, 8]
    assert r.output_token_ids == [7]  # one token, sampled only after the last chunk
    plan, finished = step(s, {"long": 7})
    assert rows_of(plan) == [("long", 40, 1)] and finished == [r]
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7, 7]


def test_budget_goes_to_running_rows_first_decode_rows_first():
    s = sched(tokens=16)
    a = req("a", nt=3, mn=10)
    s.add(a)
    step(s)  # a prefilled, decoding now
    b, c = req("b", nt=30, mn=2), req("c", nt=2, mn=2)
    s.add(b)
    s.add(c)
    plan, _ = step(s)
    # a decodes (1 token), b takes the remaining 15 of the budget; c must wait for budget (FIFO)
    assert rows_of(plan) == [("a", 3, 1), ("b", 0, 15)] and plan.kind == "mixed"
    assert list(s.waiting) == [c]
    plan, _ = step(s)
    assert rows_of(plan) == [("a", 4, 1), ("b", 15, 15)]
    plan, _ = step(s)
    # b's last prompt position is a one-token row: it goes with the decode rows, in admission order
    assert rows_of(plan) == [("a", 5, 1), ("b", 30, 1), ("c", 0, 2)]


def test_one_token_rows_go_before_an_older_prefill_row():
    s = sched(tokens=8)
    a = req("a", nt=20, mn=3)
    b = req("b", nt=1, mn=3)
    s.add(a)
    s.add(b)
    plan, _ = step(s)
    assert rows_of(plan) == [("a", 0, 8)] and plan.admitted == [a]
    plan, _ = step(s)
    assert rows_of(plan) == [("a", 8, 8)] and plan.admitted == []
    plan, _ = step(s)
    # b is admitted into the 4 tokens a's last chunk leaves; its one-token row goes first (the metadata's order)
    assert plan.admitted == [b] and rows_of(plan) == [("b", 0, 1), ("a", 16, 4)] and plan.kind == "mixed"
    plan, _ = step(s)
    assert rows_of(plan) == [("a", 20, 1), ("b", 1, 1)] and plan.kind == "decode"


def test_kv_exhaustion_holds_the_queue_in_order_until_blocks_are_freed():
    s = sched(num_blocks=4)  # 16 positions in all
    a = req("a", nt=12, mn=4)  # 3 blocks now, 4 once it decodes
    b = req("b", nt=8, mn=4)  # 2 blocks: does not fit beside a
    c = req("c", nt=1, mn=2)  # 1 block: would fit, but FIFO keeps it behind b
    for r in (a, b, c):
        s.add(r)
    plan, _ = step(s)
    assert plan.admitted == [a] and list(s.waiting) == [b, c] and a.block_table == [0, 1, 2]
    plan, _ = step(s)  # a grows into the last free block
    assert plan.admitted == [] and a.block_table == [0, 1, 2, 3] and s.pool.num_free == 0
    plan, _ = step(s)
    assert plan.admitted == [] and list(s.waiting) == [b, c]
    plan, finished = step(s)  # a's fourth token: length
    assert finished == [a] and s.pool.num_free == 4 and s.num_preemptions == 0
    plan, _ = step(s)
    assert plan.admitted == [b, c] and b.block_table == [0, 1] and c.block_table == [2]


def test_add_refuses_a_request_that_can_never_fit():
    s = sched(num_blocks=2)
    assert s.fits_ever(8) and not s.fits_ever(9)
    with pytest.raises(ValueError, match="9 KV positions; the pool holds 8"):
        s.add(req("x", nt=5, mn=4))
    assert not s.has_work() and list(s.waiting) == []
    s.add(req("y", nt=4, mn=4))
    assert s.has_work()


# ------------------------------------------------------------------------------------------------ shared prompt KV
def test_virtual_tokens_start_after_the_shared_prefix():
    s = sched()
    p = prompt(6)
    r = req("v", nt=4, mn=3, sp=p)
    s.add(r)
    plan = s.schedule()
    # positions 0..4 come from the prompt's KV; the last virtual token is computed with the text
    assert rows_of(plan) == [("v", 5, 5)]
    entry = r.prompt_kv
    assert entry.key == p.sha256 and entry.num_tokens == 5
    assert entry.full_blocks == (0,) and entry.tail_len == 1
    assert r.num_computed_tokens == 5 and r.block_table == [0, 1, 2]  # ceil(10/4) blocks, the first shared
    # the creating request's first own block receives the tail as the prompt is computed: no copy
    assert plan.prompts_to_compute == [(entry, r)] and plan.tail_copies == []
    assert plan.rows[0].completes_prompt


def test_requests_of_one_prompt_share_its_full_blocks():
    s = sched(num_blocks=16)
    p = prompt(11)  # 10 shared positions: 2 full blocks + a tail of 2
    a, b = req("a", nt=3, mn=2, sp=p), req("b", nt=2, mn=3, sp=p)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    entry = a.prompt_kv
    assert b.prompt_kv is entry and entry.users == 2
    assert entry.full_blocks == (0, 1)
    assert a.block_table == [0, 1, 2, 3] and b.block_table == [0, 1, 4, 5]  # same shared blocks first
    assert refs(s, range(7)) == [3, 3, 1, 1, 1, 1, 0]  # cache + a + b on the shared blocks
    assert rows_of(plan) == [("a", 10, 4), ("b", 10, 3)]
    # the prompt is computed once (its tail into a's first own block); b gets the tail copied into its own
    assert plan.prompts_to_compute == [(entry, a)]
    assert plan.tail_copies == [(b, entry)]
    assert s.prompt_cache.blocks_saved == 2
    s.update_from_output(plan, sample_for(plan))
    assert entry.computed and s.pool.ref_count(6) == 0
    # a third request later hits the computed entry: nothing to compute, only its tail copy
    c = req("c", nt=1, mn=1, sp=p)
    s.add(c)
    plan = s.schedule()
    assert plan.admitted == [c] and plan.prompts_to_compute == [] and plan.tail_copies == [(c, entry)]
    assert c.block_table == [0, 1, 6] and entry.users == 3 and refs(s, (0, 1)) == [4, 4]
    assert rows_of(plan) == [("a", 14, 1), ("b", 13, 1), ("c", 10, 2)]
    assert s.update_from_output(plan, sample_for(plan)) == [a, c]  # a's second token, c's first: both done
    assert c.block_table == [] and entry.users == 1 and refs(s, (0, 1)) == [2, 2]  # their references are gone
    _, finished = step(s)
    assert finished == [b] and not s.has_work()
    # every request gone: the cache keeps the prompt's full blocks (under budget), nothing else is held
    assert refs(s, (0, 1)) == [1, 1] and s.pool.num_used == 2 and entry.users == 0
    assert len(s.prompt_cache) == 1 and s.prompt_cache.nbytes == 10 * BPT


def test_a_new_prompt_is_computed_once_per_step_for_many_requests():
    s = sched(num_blocks=32)
    p, q = prompt(5, seed=1), prompt(9, seed=2)
    rs = [req("p1", 2, sp=p), req("q1", 2, sp=q), req("p2", 3, sp=p), req("n", 2), req("q2", 1, sp=q)]
    for r in rs:
        s.add(r)
    plan = s.schedule()
    assert plan.admitted == rs
    ep, eq = rs[0].prompt_kv, rs[1].prompt_kv
    assert ep.key == p.sha256 and eq.key == q.sha256 and ep is not eq
    assert plan.prompts_to_compute == [(ep, rs[0]), (eq, rs[1])]
    # p keeps 4 positions (one full block, no tail), q keeps 8 (two full blocks, no tail): no copies
    assert (ep.full_blocks, ep.tail_len, eq.full_blocks, eq.tail_len) == ((0,), 0, (2, 3), 0)
    assert plan.tail_copies == []
    assert (ep.users, eq.users) == (2, 2) and rs[3].prompt_kv is None
    assert (s.prompt_cache.hits, s.prompt_cache.misses) == (2, 2)


def test_abort_releases_the_prompt_reference():
    s = sched(num_blocks=16)
    p = prompt(9)  # 8 shared positions: blocks 0, 1
    a, b = req("a", nt=2, mn=8, sp=p), req("b", nt=2, mn=8, sp=p)
    s.add(a)
    s.add(b)
    step(s)
    assert refs(s, (0, 1)) == [3, 3]
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert refs(s, (0, 1)) == [2, 2] and a.prompt_kv is None and a.block_table == []
    assert b.prompt_kv.users == 1 and s.pool.num_used == 3  # 2 shared + b's own block


# ------------------------------------------------------------------------------------------------ preemption
def test_preemption_frees_the_most_recently_admitted_and_recomputes_it_later():
    s = sched(num_blocks=4, seqs=2)
    a, b, d = req("a", nt=4, mn=8), req("b", nt=4, mn=8), req("d", nt=4, mn=1)
    for r in (a, b, d):
        s.add(r)
    for _ in range(5):
        plan, _ = step(s)
        assert plan.preempted == []
    assert list(s.waiting) == [d]  # no sequence slot for d
    assert a.block_table == [0, 2] and b.block_table == [1, 3] and s.pool.num_free == 0
    assert b.output_token_ids == [100, 101, 102, 103, 104]
    # a (admitted first) needs a third block for position 8: b, the most recent, is preempted
    plan, _ = step(s)
    assert plan.preempted == [b] and rows_of(plan) == [("a", 8, 1)] and plan.admitted == []
    assert b.status == RequestStatus.WAITING and list(s.waiting) == [b, d] and s.running == [a]  # b at the head
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.output_token_ids == [100, 101, 102, 103, 104]  # kept
    assert a.block_table == [0, 2, 1] and s.pool.num_free == 1 and s.num_preemptions == 1
    assert plan.finished_ids == []
    # b needs 9 positions (3 blocks) to come back: it waits until a is done
    plan, _ = step(s)
    assert plan.admitted == [] and rows_of(plan) == [("a", 9, 1)]
    plan, finished = step(s)
    assert finished == [a] and s.pool.num_free == 4
    # readmitted before d: one row recomputes text + generated tokens, and samples the next token
    plan, _ = step(s)
    assert plan.admitted == [b, d] and rows_of(plan) == [("b", 0, 9), ("d", 0, 4)]
    assert b.block_table == [0, 2, 1] and b.status == RequestStatus.RUNNING and b.num_computed_tokens == 9
    assert b.output_token_ids == [100, 101, 102, 103, 104, 105]
    assert d.status == RequestStatus.FINISHED_LENGTH
    plan, _ = step(s)
    assert rows_of(plan) == [("b", 9, 1)]
    plan, finished = step(s)
    assert finished == [b] and b.status == RequestStatus.FINISHED_LENGTH
    assert b.output_token_ids == list(range(100, 108))  # nothing lost or repeated
    assert s.pool.num_free == 4 and not s.has_work()


def test_no_admission_in_a_step_with_a_preemption():
    s = sched(num_blocks=4, tokens=5)
    a, b = req("a", nt=4, mn=8), req("b", nt=1, mn=8)
    s.add(a)
    s.add(b)
    plan, _ = step(s)
    assert rows_of(plan) == [("b", 0, 1), ("a", 0, 4)]
    for _ in range(4):
        plan, _ = step(s)
        assert plan.preempted == []
    assert a.block_table == [0, 2] and b.block_table == [1, 3] and len(b.output_token_ids) == 5
    plan, _ = step(s)  # a crosses into a third block: b is preempted
    assert plan.preempted == [b] and rows_of(plan) == [("a", 8, 1)]
    # one block is free and 4 tokens of budget are left: enough for a first chunk of b, yet nobody is admitted
    assert s.pool.num_free == 1 and plan.num_batched_tokens == 1 and plan.admitted == []
    plan, _ = step(s)
    assert plan.admitted == [b] and rows_of(plan) == [("a", 9, 1), ("b", 0, 4)]
    assert b.block_table == [3] and not plan.rows[1].completes_prompt


def test_preemption_takes_the_newest_first_and_a_growing_newest_preempts_itself():
    s = sched(num_blocks=3)
    a, b, c = (req(k, nt=4, mn=8) for k in "abc")
    for r in (a, b, c):
        s.add(r)
    plan, _ = step(s)
    assert (a.block_table, b.block_table, c.block_table) == ([0], [1], [2])
    # a and b both cross into a second block: a takes c's (the newest), then b, now the newest, preempts itself
    plan, _ = step(s)
    assert plan.preempted == [c, b] and rows_of(plan) == [("a", 4, 1)]
    assert a.block_table == [0, 2] and s.running == [a]
    assert list(s.waiting) == [b, c]  # back at the head of the queue in their admission order
    assert [r.num_preemptions for r in (a, b, c)] == [0, 1, 1] and s.num_preemptions == 2
    assert (b.num_computed_tokens, c.num_computed_tokens) == (0, 0)
    assert b.output_token_ids == [100] and c.output_token_ids == [100]
    plan, _ = step(s)
    assert plan.admitted == [] and plan.preempted == [] and rows_of(plan) == [("a", 5, 1)]
    assert s.pool.num_free == 1  # b needs 5 positions: 2 blocks


def test_unused_cached_prompts_are_evicted_before_anyone_is_preempted():
    s = sched(num_blocks=6)
    p = prompt(9)  # 8 shared positions: 2 full blocks, no tail
    x = req("x", nt=1, mn=1, sp=p)
    s.add(x)
    step(s)
    assert x.status == RequestStatus.FINISHED_LENGTH
    assert len(s.prompt_cache) == 1 and s.pool.num_used == 2  # the prompt stays cached, unused
    a, b = req("a", nt=4, mn=8), req("b", nt=4, mn=8)
    s.add(a)
    s.add(b)
    for _ in range(5):
        plan, _ = step(s)
    assert s.pool.num_free == 0 and plan.evicted_prompts == [] and len(s.prompt_cache) == 1
    plan, _ = step(s)  # both cross into a third block: the cached prompt goes, nobody is preempted
    assert plan.preempted == [] and s.num_preemptions == 0
    assert [e.key for e in plan.evicted_prompts] == [p.sha256] and len(s.prompt_cache) == 0
    assert rows_of(plan) == [("a", 8, 1), ("b", 8, 1)]
    assert len(a.block_table) == 3 and len(b.block_table) == 3 and s.pool.num_free == 0
    assert s.pool.num_used == 6


def test_a_preempted_request_releases_its_prompt_and_takes_it_back():
    s = sched(num_blocks=5)
    p = prompt(5)  # 4 shared positions: one full block, no tail
    a = req("a", nt=4, mn=8)
    b = req("b", nt=1, mn=8, sp=p)
    s.add(a)
    s.add(b)
    plan, _ = step(s)
    entry = b.prompt_kv
    assert a.block_table == [0] and entry.full_blocks == (1,) and b.block_table == [1, 2]
    for _ in range(3):
        plan, _ = step(s)
    assert a.block_table == [0, 3] and b.block_table == [1, 2, 4] and s.pool.num_free == 0
    plan, _ = step(s)
    assert plan.preempted == []
    plan, _ = step(s)  # a needs a third block (position 8): b is preempted, its prompt entry stays cached
    assert plan.preempted == [b] and b.prompt_kv is None and entry.users == 0
    assert s.pool.ref_count(1) == 1 and len(s.prompt_cache) == 1 and plan.evicted_prompts == []
    assert a.block_table == [0, 3, 2] and s.pool.num_free == 1
    for _ in range(2):
        plan, finished = step(s)
    assert finished == [a]
    plan, _ = step(s)  # b comes back: a hit on its prompt, text + generated tokens recomputed after it
    assert plan.admitted == [b] and b.prompt_kv is entry and entry.users == 1
    assert plan.prompts_to_compute == [] and plan.tail_copies == []
    assert rows_of(plan) == [("b", 4, 1 + 1 + 5)]  # last virtual token, text, 5 generated tokens
    assert b.block_table == [1, 0, 3] and len(b.output_token_ids) == 6


# ------------------------------------------------------------------------------------------------ finishing
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
    assert s.running == [] and s.pool.num_used == 0 and not s.has_work()
    assert a.finish_time is not None and a.first_token_time is not None
    assert a.block_table == [] and b.block_table == []


def test_eos_on_the_last_allowed_token_is_a_stop():
    s = sched()
    r = req("a", nt=2, mn=1)
    s.add(r)
    _, finished = step(s, {"a": EOS})
    assert finished == [r] and r.status == RequestStatus.FINISHED_STOPPED


def test_stop_strings_finish_as_stopped_and_win_over_length():
    s = sched()
    a, b, c = req("a", nt=2, mn=1), req("b", nt=2, mn=5), req("c", nt=2, mn=5)
    for r in (a, b, c):
        s.add(r)
    _, finished = step(s, stopped=frozenset({"a", "b"}))
    assert finished == [a, b]
    assert a.status == RequestStatus.FINISHED_STOPPED  # its last allowed token also completed a stop string
    assert b.status == RequestStatus.FINISHED_STOPPED and b.output_token_ids == [100]
    assert s.running == [c] and s.pool.num_used == 1


def test_stopped_is_ignored_for_a_row_that_sampled_nothing():
    s = sched(tokens=4)
    r = req("a", nt=6, mn=3)
    s.add(r)
    plan = s.schedule()
    assert not plan.rows[0].completes_prompt
    assert s.update_from_output(plan, {}, stopped=frozenset({"a"})) == []
    assert r.status == RequestStatus.RUNNING and r.num_computed_tokens == 4


def test_failed_rows_finish_with_an_error_and_free_their_blocks():
    s = sched()
    a, b = req("a", nt=2, mn=5), req("b", nt=5, mn=5)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    finished = s.update_from_output(plan, {"b": 100}, failed=frozenset({"a"}))
    assert finished == [a] and a.status == RequestStatus.FINISHED_ERROR and a.status.finish_reason == "error"
    assert a.output_token_ids == [] and a.block_table == []
    assert s.running == [b] and s.pool.num_used == 2 and b.output_token_ids == [100]


def test_finished_ids_are_reported_once_in_the_next_plan():
    s = sched()
    a, b, c = req("a", nt=2, mn=1), req("b", nt=2, mn=3), req("c", nt=2, mn=3)
    for r in (a, b, c):
        s.add(r)
    plan, finished = step(s)
    assert finished == [a] and plan.finished_ids == []
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    plan, _ = step(s)
    assert plan.finished_ids == ["a", "b"]
    plan, _ = step(s, {"c": EOS})
    assert plan.finished_ids == []
    plan = s.schedule()
    assert plan.finished_ids == ["c"] and plan.is_empty
    assert s.schedule().finished_ids == []


def test_plan_kind():
    s = sched(tokens=64)
    a = req("a", nt=3, mn=5)
    s.add(a)
    plan, _ = step(s)
    assert plan.kind == "prefill"
    plan, _ = step(s)
    assert plan.kind == "decode"
    s.add(req("b", nt=3, mn=5))
    plan, _ = step(s)
    assert plan.kind == "mixed" and rows_of(plan) == [("a", 4, 1), ("b", 0, 3)]


# ------------------------------------------------------------------------------------------------ aborts
def test_abort_frees_blocks_running_or_waiting():
    s = sched(seqs=1)
    a, b = req("a", nt=3, mn=8), req("b", nt=3, mn=8)
    s.add(a)
    s.add(b)
    step(s)
    assert s.pool.num_used == 1 and a.block_table == [0] and list(s.waiting) == [b]
    s.finish(b, RequestStatus.FINISHED_ABORTED)  # waiting: removed, held nothing
    assert list(s.waiting) == [] and b.status == RequestStatus.FINISHED_ABORTED
    assert s.pool.num_used == 1
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert s.running == [] and s.pool.num_used == 0 and a.status.finish_reason == "abort"
    assert a.block_table == []
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
    assert s.running == [b] and s.pool.num_used == 1


def test_request_joining_while_others_decode_runs_at_the_next_step():
    s = sched()
    a = req("a", nt=3, mn=10)
    s.add(a)
    step(s)
    step(s)
    assert a.output_token_ids == [100, 101]
    b = req("b", nt=4, mn=2, sp=prompt(2))
    s.add(b)
    plan, _ = step(s)
    assert plan.admitted == [b]
    assert rows_of(plan) == [("a", 4, 1), ("b", 1, 5)]
    assert b.output_token_ids == [100] and len(a.output_token_ids) == 3


def test_a_request_that_fits_ever_runs_alone():
    """Regression: a new prompt's tail once took a block of its own, so a request passing fits_ever could hold
    the head of the queue forever. The tail is now computed into the request's own first block."""
    s = sched(num_blocks=2)
    p = prompt(7)  # 6 shared positions: 1 full block + a tail of 2 (computed into r's own block)
    r, c = req("r", nt=0, mn=1, sp=p), req("c", nt=1, mn=1)
    assert s.fits_ever(r.max_positions)  # 8 positions: exactly the pool
    s.add(r)
    s.add(c)
    for _ in range(4):
        step(s)
    assert r.status.is_finished and c.status.is_finished


def test_a_blocked_admission_of_a_new_prompt_evicts_nothing():
    """A new prompt whose full blocks would fit after evicting an unused cached prompt, but not together with the
    request's own blocks, leaves the cache as it was (no wasted eviction), and the request waits."""
    s = sched(num_blocks=4)
    old = prompt(5)  # 4 shared positions: one full block, cached and unused after its request finishes
    r0 = req("r0", nt=1, mn=1, sp=old)
    s.add(r0)
    step(s)
    assert r0.status.is_finished and old.sha256 in s.prompt_cache and s.pool.num_free == 3
    blocker = req("blocker", nt=11, mn=1)  # 12 positions: all 3 free blocks
    s.add(blocker)
    s.schedule()
    assert s.pool.num_free == 0
    new = req("new", nt=1, mn=1, sp=prompt(5, seed=9))  # 1 full block + 1 own: 2 > 0 free + 1 unused
    s.add(new)
    plan = s.schedule()
    assert new not in plan.admitted and new.status == new.status.WAITING
    assert old.sha256 in s.prompt_cache and plan.evicted_prompts == [] and s.pool.num_free == 0
