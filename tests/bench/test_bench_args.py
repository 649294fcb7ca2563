"""The bench's flag parsing: scenario selection and refusals (exit status 2, before anything runs)."""

from __future__ import annotations

import pytest

from bench.serve_bench import parse_args

TOKEN = ["--admin-token", "t"]


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-tasks", "0"], "--num-tasks must be >= 1"),
    (["--num-requests", "-1"], "--num-requests must be >= 1"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--text-tokens", "0"], "--text-tokens must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--baseline-requests", "0"], "--baseline-requests must be >= 1"),
    (["--upload-concurrency", "0"], "--upload-concurrency must be >= 1"),
    (["--many-requests", "0"], "--many-requests must be >= 1"),
    (["--task-counts", "1,0,5"], "--task-counts must be integers >= 1"),
    (["--task-counts", "1,x"], "expected comma-separated integers"),
    (["--task-counts", "200000"], "<= 100000"),
    (["--zipf-tasks", "-1"], "--zipf-tasks must be >= 0"),
    (["--zipf-s", "0"], "--zipf-s must be > 0"),
    (["--rates", "1,0"], "--rates must be numbers > 0"),
    (["--rate-fractions", "-0.5"], "--rate-fractions must be numbers > 0"),
    (["--scenario", "huge"], "--scenario must be one of"),
    (["--vllm", "localhost:8100"], "--vllm must be an http(s) URL"),
])
def test_refusals(argv, message, capsys):
    assert message in _refused(argv + TOKEN, capsys)


def test_admin_token_required(monkeypatch, capsys):
    monkeypatch.delenv("SOFTPROMPT_ADMIN_TOKEN", raising=False)
    assert "--admin-token is required" in _refused([], capsys)


def test_defaults_are_the_standard_scenario():
    a = parse_args(TOKEN)
    assert a.scenarios == ["standard"]
    assert (a.num_requests, a.num_tasks, a.virtual_tokens, a.text_tokens, a.max_new_tokens, a.concurrency) == (
        64, 16, 20, 20, 32, 64)
    assert (a.long_requests, a.long_text_tokens) == (32, 480)
    assert a.task_counts == [1, 100, 1000, 5000] and a.zipf_tasks == 1000 and a.many_requests == 192
    assert a.rates is None and a.rate_fractions == [0.25, 0.5, 0.8] and a.load_requests == 64


def test_scenarios_repeatable_comma_lists_and_all_in_canonical_order():
    assert parse_args(TOKEN + ["--scenario", "offered-load,standard", "--scenario", "long"]).scenarios == [
        "standard", "long", "offered-load"]
    assert parse_args(TOKEN + ["--scenario", "all"]).scenarios == ["standard", "long", "many-tasks",
                                                                   "offered-load"]
    assert parse_args(TOKEN + ["--scenario", "many-tasks", "--task-counts", "1,5000"]).task_counts == [1, 5000]
    assert parse_args(TOKEN + ["--rates", "0.5,1.5"]).rates == [0.5, 1.5]
