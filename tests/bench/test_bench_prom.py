"""Reading /metrics (bench/prom.py): step counters by kind, batch sizes, resident memory and its fallback."""

from __future__ import annotations

import os
import socket

from bench import prom

EXPO = """\
# HELP softprompt_batch_size Rows per engine step.
# TYPE softprompt_batch_size histogram
softprompt_batch_size_bucket{le="+Inf"} 10.0
softprompt_batch_size_count 10.0
softprompt_batch_size_sum 250.0
# HELP softprompt_step_seconds Engine step seconds by kind.
# TYPE softprompt_step_seconds counter
softprompt_step_seconds_total{kind="prefill"} 4.0
softprompt_step_seconds_total{kind="decode"} 6.0
# HELP softprompt_step_tokens Engine step tokens by kind.
# TYPE softprompt_step_tokens counter
softprompt_step_tokens_total{kind="prefill"} 1344.0
softprompt_step_tokens_total{kind="decode"} 2048.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.5e+09
"""


def test_snapshot_and_delta():
    before = prom.snapshot(prom.parse(EXPO))
    assert before["step_seconds"] == {"prefill": 4.0, "decode": 6.0, "mixed": None}
    assert before["step_tokens"]["prefill"] == 1344.0 and before["rss_bytes"] == 1.5e9
    after = prom.snapshot(prom.parse(EXPO.replace("count 10.0", "count 14.0").replace("sum 250.0", "sum 350.0")
                                     .replace('"prefill"} 4.0', '"prefill"} 9.5')))
    d = prom.leg_delta(before, after)
    assert d["engine_steps"] == 4 and d["mean_rows_per_step"] == 25
    assert d["step_seconds"] == {"prefill": 5.5, "decode": 0.0, "mixed": 0.0}
    later = prom.snapshot(prom.parse(EXPO + 'softprompt_step_tokens_total{kind="mixed"} 99.0\n'))
    assert prom.leg_delta(before, later)["step_tokens"]["mixed"] == 99.0  # first seen during the leg: from 0


def test_step_positions_is_read_as_step_tokens():
    text = EXPO.replace("softprompt_step_tokens", "softprompt_step_positions")
    assert prom.snapshot(prom.parse(text))["step_tokens"]["prefill"] == 1344.0


def test_missing_metrics_are_none():
    s = prom.snapshot(prom.parse("# nothing\n"))
    assert s["batch_count"] is None and s["rss_bytes"] is None and s["step_tokens"]["prefill"] is None
    d = prom.leg_delta(s, s)
    assert d["engine_steps"] is None and d["mean_rows_per_step"] is None


def test_rss_from_metrics_first():
    assert prom.RssReader("http://example.org:1", pid=None).read(prom.parse(EXPO)) == (1_500_000_000, "metrics")


def test_rss_falls_back_to_proc_of_the_local_listener():
    assert os.path.exists("/proc/net/tcp"), "the project's machines run Linux with /proc"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        assert prom.find_local_server_pid(url) == os.getpid()
        rss, source = prom.RssReader(url).read({})
    assert rss > 0 and source == f"/proc/{os.getpid()}"
    assert prom.find_local_server_pid("http://example.org:8000") is None
    assert prom.RssReader("http://example.org:8000").read({}) == (None, "n/a")
