"""Pure helpers of the reliability harnesses (bench/loadtest.py, bench/faults.py, bench/procs.py): no server."""

from __future__ import annotations

import pytest

from bench import prom
from bench.faults import Result, stray_entries
from bench.loadtest import TASKS, Outcome, aggregate, backoff_s, evaluate, make_plan, task_inputs
from bench.procs import count_by_label, metric_sum, raw_prompt_bytes, retry_after_ok

EXPO = """\
# HELP softprompt_requests_total Generation requests by task and outcome.
# TYPE softprompt_requests_total counter
softprompt_requests_total{status="200",task="topic"} 7.0
softprompt_requests_total{status="429",task="topic"} 2.0
softprompt_requests_total{status="200",task=""} 3.0
# HELP softprompt_kv_cache_blocks KV blocks by owner.
# TYPE softprompt_kv_cache_blocks gauge
softprompt_kv_cache_blocks{owner="prompts"} 4.0
softprompt_kv_cache_blocks{owner="requests"} 0.0
softprompt_kv_cache_blocks{owner="free"} 2908.0
"""


@pytest.mark.parametrize("value,ok", [("1", True), ("30", True), (" 5 ", True), ("0", False), ("-1", False),
                                      ("1.5", False), ("Wed, 21 Oct 2015 07:28:00 GMT", False), ("", False),
                                      (None, False)])
def test_retry_after_must_be_a_positive_integer(value, ok):
    assert retry_after_ok(value) is ok


def test_metric_sum_over_labels():
    samples = prom.parse(EXPO)
    assert metric_sum(samples, "softprompt_requests_total") == 12.0
    assert metric_sum(samples, "softprompt_requests_total", status="200") == 10.0
    assert metric_sum(samples, "softprompt_kv_cache_blocks", owner="requests") == 0.0
    assert metric_sum(samples, "softprompt_kv_cache_blocks", owner="nobody") is None
    assert metric_sum(samples, "softprompt_running_requests") is None


def test_count_by_label():
    samples = {("softprompt_requests_total", (("status", "200"), ("task", "a"))): 3.0,
               ("softprompt_requests_total", (("status", "200"), ("task", "b"))): 2.0,
               ("softprompt_requests_total", (("status", "429"), ("task", "a"))): 1.0,
               ("other_total", (("status", "200"),)): 9.0}
    assert count_by_label(samples, "softprompt_requests_total", "status") == {"200": 5.0, "429": 1.0}


def _outcomes() -> list[Outcome]:
    return [
        Outcome("task", True, 200, 1.0, final_ok=True, tokens=4),
        Outcome("chat", False, 200, 3.0, final_ok=True, tokens=8),
        Outcome("base", True, 200, 2.0, final_ok=False, tokens=2),  # a stream cut before its final event
        Outcome("task", False, 429, 0.01, retry_after="2"),
        Outcome("completions", False, 503, 0.02, retry_after=None),  # no Retry-After: breaks the rule
        Outcome("task", True, None, 0.5, error="ReadError"),  # connection error
    ]


def test_aggregate_counts_statuses_rule_breakers_and_throughput():
    fig = aggregate(_outcomes(), wall_s=2.0)
    assert fig["requests"] == 6
    assert fig["by_status"] == {"200": 3, "429": 1, "503": 1, "conn_error": 1}
    assert fig["connection_errors"] == 1
    assert fig["rejected_without_valid_retry_after"] == 1
    assert fig["ok_without_final_event"] == 1
    assert fig["requests_per_s"] == 3.0
    assert fig["generated_tokens"] == 14 and fig["tokens_per_s"] == 7.0
    assert fig["latency_200_p50_s"] == 2.0  # of 1, 2, 3 s
    assert fig["by_kind_status"]["task+stream:None"] == 1


def test_evaluate_targets():
    fig = aggregate(_outcomes(), wall_s=2.0)
    fig.update(rss_before_bytes=1000, rss_after_bytes=1150, server_counted=6.0)
    met = {name: ok for name, ok, _ in evaluate(fig)}
    once = "server counts every request once, with its status"
    assert met == {"every request 200 or 429/503+Retry-After": False, "0 connection errors": False,
                   "every 200 ends with its final event": False, "RSS after within 10% of before": False,
                   once: False}  # the right total, but no per-status figures: a miss
    good = aggregate([Outcome("task", True, 200, 1.0, final_ok=True), Outcome("task", False, 429, 0.1,
                                                                              retry_after="1")], 1.0)
    good.update(rss_before_bytes=1000, rss_after_bytes=1090, server_counted=2.0,
                server_by_status={"200": 1, "429": 1})
    assert all(ok for _, ok, _ in evaluate(good))
    good["server_by_status"] = {"200": 2}  # right total, wrong statuses (a 429 counted as 200)
    assert not dict((n, ok) for n, ok, _ in evaluate(good))[once]
    good["server_counted"] = None  # unknown is a miss
    assert not dict((n, ok) for n, ok, _ in evaluate(good))[once]


def test_backoff_after_rejections():
    assert backoff_s(Outcome("task", False, 429, 0.0, retry_after="3")) == 3.0
    assert backoff_s(Outcome("task", False, 429, 0.0, retry_after="120")) == 5.0
    assert backoff_s(Outcome("task", False, 503, 0.0, retry_after=None)) == 1.0
    assert backoff_s(Outcome("task", False, 200, 0.0)) == 0.0


def test_plan_is_seeded_and_mixes_every_route():
    inputs = {t: task_inputs(t, 5) for t in TASKS}
    plan = make_plan(400, TASKS, inputs, seed=3)
    assert plan == make_plan(400, TASKS, inputs, seed=3)
    assert {s.path for s in plan} >= {"/v1/generate", "/v1/completions", "/v1/chat/completions",
                                      "/v1/tasks/topic/generate"}
    assert 100 < sum(s.stream for s in plan) < 300
    assert {s.body.get("max_tokens") or s.body["parameters"]["max_new_tokens"] for s in plan} == set(range(1, 9))
    for s in plan:
        if s.path.startswith("/v1/c"):
            assert s.body["model"] in TASKS


def test_result_passes_only_when_every_check_is_met():
    r = Result("x")
    assert not r.passed  # nothing checked
    r.check("a", True, "ok")
    assert r.passed
    r.check("b", False, "no")
    assert not r.passed and r.as_dict()["checks"][1] == {"target": "b", "met": False, "detail": "no"}


def test_stray_entries_and_raw_prompt(tmp_path):
    for name in ("topic", "victim.safetensors", ".victim.tmp-0123456789abcdef", "victim", ".versions.json"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_bytes(b"")
    assert stray_entries(tmp_path, {"topic", "victim.safetensors"}) == [".victim.tmp-0123456789abcdef", "victim"]
    from safetensors.numpy import load

    (t,) = load(raw_prompt_bytes("date-format")).values()
    assert t.shape == (20, 576)
