"""The printed table, the report's derived figures, the JSON file and the plot, from a synthetic results dict."""

from __future__ import annotations

import json
import math

import pytest

from bench.report import format_table, masked_command, render, table_rows, write_json


def _leg(system, tps, **kw):
    base = {"system": system, "requests": 64, "failed_requests": 0, "tokens_per_s": tps, "ttft_p50_s": 1.0,
            "ttft_p95_s": 2.0, "latency_p50_s": 3.0, "latency_p95_s": 4.0, "load_avg_1min_at_start": 0.5,
            "early_stops": 0, "requests_per_s": 2.0}
    return {**base, **kw}


RES = {
    "command": "softprompt bench --admin-token ***", "model": "m", "cpu_count": 2,
    "scenarios": {
        "standard": {
            "legs": {
                "server": _leg("server", 120.0),
                "vllm": _leg("vllm", 100.0, texts_equal_to_server=[64, 64]),
                "hf-padded-batch": _leg("hf-padded-batch", 75.0, texts_equal_to_server=[60, 64]),
                "hf-sequential": _leg("hf-sequential", 10.0, requests=4, ttft_p50_s=math.nan,
                                      texts_equal_to_server=[4, 4], early_stops=1),
            },
            "prefill": {"achieved_gflops_per_s": None, "peak_gflops_per_s": 150.0, "prefill_seconds": None,
                        "peak_load_avg_1min": 0.25},
        },
        "many-tasks": {"levels": [
            {"tasks": 1, "distribution": "uniform", "server": _leg("server", 100.0), "ratio_to_reference": 1.0,
             "memory": {"added_tasks": 1, "bytes_per_task": 2048.0, "tensor_bytes": 46080, "ratio": 0.0444,
                        "source": "metrics"}},
            {"tasks": 1000, "distribution": "zipf", "server": _leg("server", 90.0), "ratio_to_reference": 0.9,
             "memory": {"added_tasks": 0}},
        ]},
        "offered-load": {"capacity_requests_per_s": 3.0, "rates": [
            {"rate_rps": 0.75, "legs": {"server": _leg("server", 20.0), "vllm": {"system": "vllm",
                                                                                 "error": "ConnectError()"}}},
        ]},
    },
}


def test_table_rows_ratios_and_missing_values():
    rows = {(r[0], r[1]): r for r in table_rows(RES)}
    srv, vllm = rows[("standard", "server")], rows[("standard", "vllm")]
    assert srv[3] == "120.0" and srv[8] == "-" and srv[9] == "1.20x" and srv[10] == "12.00x"
    assert vllm[8] == "64/64" and vllm[9] == "-" and vllm[10] == "10.00x"
    seq = rows[("standard", "hf-sequential")]
    assert seq[2] == "4" and seq[4] == "n/a" and seq[10] == "-"
    assert rows[("many-tasks zipf 1000", "server")][9] == "-"
    assert rows[("offered-load 0.75 req/s", "vllm")][3] == "failed"
    assert rows[("offered-load 0.75 req/s", "server")][9:11] == ["-", "-"]  # open loop: no ratios
    assert [r[1] for r in table_rows(RES)][:4] == ["server", "vllm", "hf-padded-batch", "hf-sequential"]


def test_format_table_aligns_columns():
    out = format_table(("a", "b", "num"), [["x", "yy", "1.0"], ["long", "z", "123.45"]]).splitlines()
    assert out[0] == "a     b      num"
    assert out[1] == "----  --  ------"
    assert out[2] == "x     yy     1.0"
    assert out[3] == "long  z   123.45"
    assert len({len(line) for line in out}) == 1


def test_render_has_table_many_tasks_prefill_and_notes():
    text = render(RES)
    assert "scenario" in text and "TTFT p50" in text and "vs HF seq" in text
    assert "RSS/tensor" in text and "0.04x" in text and "2.0" in text
    assert "prefill, standard: server n/a GFLOP/s" in text
    assert "peak 150.0 GFLOP/s, measured at load average 0.25" in text
    assert 'softprompt_step_seconds_total{kind="prefill"}' in text
    assert "standard / hf-sequential: early stops (EOS) 1" in text
    assert "ConnectError" in text


def test_prefill_line_variants():
    from bench.report import prefill_lines

    def line(**p):
        return prefill_lines({"scenarios": {"long": {"prefill": {"peak_gflops_per_s": 200.0, **p}}}})[0]

    assert "no prefill-only step" in line(prefill_seconds=0.0, prefill_tokens=0.0)
    full = line(prefill_seconds=2.0, prefill_tokens=1000.0, achieved_gflops_per_s=170.0, fraction_of_peak=0.85,
                all_steps_gflops_per_s=100.0, all_steps_positions=5000.0, all_steps_seconds=9.5)
    assert "server 170.0 GFLOP/s in prefill-only steps (85% of the fp32 torch.mm peak 200.0 GFLOP/s)" in full
    assert "over 1000 positions / 2.00 s" in full
    assert "all steps 100.0 GFLOP/s (50% of peak) over 5000 positions / 9.50 s" in full


def test_masked_command_hides_the_token():
    assert masked_command(["--admin-token", "s3cret", "--x"]) == "softprompt bench --admin-token '***' --x"
    assert "s3cret" not in masked_command(["--admin-token=s3cret"])


def test_json_is_strict(tmp_path):
    p = tmp_path / "r.json"
    write_json(RES, str(p))
    data = json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["scenarios"]["standard"]["legs"]["hf-sequential"]["ttft_p50_s"] is None


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import plot

    p = tmp_path / "bench.png"
    plot(RES, str(p))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot({"scenarios": {}}, str(tmp_path / "empty.png"))  # every panel 'not run'
    assert (tmp_path / "empty.png").stat().st_size > 0
