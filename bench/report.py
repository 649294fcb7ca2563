"""The printed report (one table of every scenario x system, then the many-tasks and prefill figures) and the
JSON file. Reads only the results dict the scenarios build, so it can be re-run on a saved ``--json``."""

from __future__ import annotations

import json
import math
import re
import shlex

HEADERS = ("scenario", "system", "reqs", "tokens/s", "TTFT p50", "TTFT p95", "lat p50", "lat p95",
           "texts eq", "vs vLLM", "vs HF seq", "load1")
SYSTEM_ORDER = ("server", "vllm", "hf-padded-batch", "hf-sequential")


def masked_command(argv: list[str]) -> str:
    """The command line with the admin token replaced by ``***``."""
    out, hide = [], False
    for a in argv:
        out.append("***" if hide else re.sub(r"^(--admin-token=).*", r"\1***", a))
        hide = a == "--admin-token"
    return "softprompt bench " + shlex.join(out)


def _num(x, fmt: str = "{:.2f}", na: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return na
    return fmt.format(x)


def _ratio(a, b) -> str:
    if a is None or not b or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{a / b:.2f}x"


def _rows_for(label: str, legs: dict, ratios: bool = True) -> list[list[str]]:
    """One row per system; ``ratios=False`` (open-loop legs, whose tokens/s follows the offered rate) leaves the
    ratio columns empty."""
    vllm = legs.get("vllm", {}).get("tokens_per_s") if ratios else None
    seq = legs.get("hf-sequential", {}).get("tokens_per_s") if ratios else None
    rows = []
    for system in sorted(legs, key=lambda s: SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else 99):
        s = legs[system]
        if "error" in s:
            rows.append([label, system, "-", "failed", *["-"] * 7, "-"])
            continue
        eq = s.get("texts_equal_to_server")
        tps = s.get("tokens_per_s")
        reqs = f"{s['requests'] - s['failed_requests']}/{s['requests']}" if s.get("failed_requests") \
            else str(s["requests"])
        rows.append([
            label, system, reqs, _num(tps, "{:.1f}"),
            _num(s.get("ttft_p50_s")), _num(s.get("ttft_p95_s")),
            _num(s.get("latency_p50_s")), _num(s.get("latency_p95_s")),
            f"{eq[0]}/{eq[1]}" if eq else "-",
            _ratio(tps, vllm) if system != "vllm" else "-",
            _ratio(tps, seq) if system != "hf-sequential" else "-",
            _num(s.get("load_avg_1min_at_start")),
        ])
    return rows


def table_rows(res: dict) -> list[list[str]]:
    """Rows of the main table, in scenario order."""
    rows: list[list[str]] = []
    for name, sc in res.get("scenarios", {}).items():
        if name in ("standard", "long"):
            rows += _rows_for(name, sc["legs"])
        elif name == "many-tasks":
            for lv in sc["levels"]:
                rows += _rows_for(f"many-tasks {lv['distribution']} {lv['tasks']}", {"server": lv["server"]})
        elif name == "offered-load":
            if "capacity_probe" in sc:
                rows += _rows_for("offered-load capacity", {"server": sc["capacity_probe"]})
            for r in sc["rates"]:
                rows += _rows_for(f"offered-load {r['rate_rps']:.3g} req/s", r["legs"], ratios=False)
    return rows


def format_table(headers, rows) -> str:
    """A plain-text table: first two columns left-aligned, the rest right-aligned, a rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def many_tasks_lines(sc: dict) -> list[str]:
    out = ["many tasks: tokens/s by task count (ratio to the fewest-task uniform level) and resident memory per "
           "added task (RSS growth across its uploads / tasks added, vs the prompt tensor's bytes):"]
    rows = []
    for lv in sc["levels"]:
        m = lv.get("memory") or {}
        per = m.get("bytes_per_task")
        rows.append([lv["distribution"], str(lv["tasks"]), _num(lv["server"]["tokens_per_s"], "{:.1f}"),
                     _num(lv.get("ratio_to_reference"), "{:.2f}x", "-"), str(m.get("added_tasks", 0)),
                     _num(per / 1024 if per is not None else None, "{:.1f}", "n/a" if m.get("added_tasks") else "-"),
                     _num(m.get("tensor_bytes", 0) / 1024 if m.get("tensor_bytes") else None, "{:.1f}", "-"),
                     _num(m.get("ratio"), "{:.2f}x", "n/a" if m.get("added_tasks") else "-"),
                     m.get("source", "-")])
    table = format_table(("distribution", "tasks", "tokens/s", "vs fewest", "added", "RSS KiB/task",
                          "tensor KiB", "RSS/tensor", "RSS source"), rows)
    return out + ["  " + t for t in table.splitlines()]


def prefill_lines(res: dict) -> list[str]:
    out = []
    for name in ("standard", "long"):
        p = res.get("scenarios", {}).get(name, {}).get("prefill")
        if not p:
            continue
        hf, load, peak = p.get("hf_batch_prefill_gflops_per_s"), p.get("peak_load_avg_1min"), p.get("peak_gflops_per_s")
        line = (f"prefill, {name}: server {_num(p.get('achieved_gflops_per_s'), '{:.1f}')} GFLOP/s in prefill-only "
                f"steps ({_num(p.get('fraction_of_peak'), '{:.0%}')} of the fp32 torch.mm peak "
                f"{_num(peak, '{:.1f}')} GFLOP/s"
                + (f", measured at load average {load:.2f}" if load is not None else "") + ")")
        if p.get("prefill_seconds"):
            line += f" over {p['prefill_tokens']:.0f} positions / {p['prefill_seconds']:.2f} s"
        elif p.get("prefill_seconds") is None:
            line += "  [n/a: the server exports no softprompt_step_seconds_total{kind=\"prefill\"}]"
        else:
            line += "  [n/a: no prefill-only step in this leg]"
        if (a := p.get("all_steps_gflops_per_s")) is not None:
            line += (f"; all steps {a:.1f} GFLOP/s ({_num(a / peak if peak else None, '{:.0%}')} of peak) over "
                     f"{p['all_steps_positions']:.0f} positions / {p['all_steps_seconds']:.2f} s")
        if hf is not None:
            line += f"; HF padded batch first step {hf:.1f} GFLOP/s"
        out.append(line)
    return out


def notes(res: dict) -> list[str]:
    """Early stops, failures and errors per leg; the units."""
    out = []
    for name, sc in res.get("scenarios", {}).items():
        legs = []
        if "legs" in sc:
            legs = [(name, s) for s in sc["legs"].values()]
        for lv in sc.get("levels", []):
            legs.append((f"many-tasks {lv['distribution']} {lv['tasks']}", lv["server"]))
        for r in sc.get("rates", []):
            legs += [(f"offered-load {r['rate_rps']:.3g}", s) for s in r["legs"].values()]
        for label, s in legs:
            if s.get("early_stops") or s.get("failed_requests") or s.get("error"):
                out.append(f"{label} / {s['system']}: early stops (EOS) {s.get('early_stops', '-')}, failed "
                           f"{s.get('failed_requests', '-')}" + (f", {s['errors'][0]}" if s.get("errors") else "")
                           + (f", {s['error']}" if s.get("error") else ""))
    return out


def render(res: dict) -> str:
    parts = [res.get("command", ""), "", format_table(HEADERS, table_rows(res))]
    parts.append("tokens/s: completion tokens (EOS included) / wall s; TTFT and latency in s, client-side "
                 "(hf-sequential: per request, from its own start; hf-padded-batch: every row shares the first "
                 "step); texts eq: greedy texts equal to the server's; load1: load average at the leg's start "
                 f"(of {res.get('cpu_count', '?')} CPUs)"
                 + ("; offered-load: open loop, tokens/s follows the offered rate, no ratios"
                    if "offered-load" in res.get("scenarios", {}) else ""))
    if "many-tasks" in res.get("scenarios", {}):
        parts += [""] + many_tasks_lines(res["scenarios"]["many-tasks"])
    if pl := prefill_lines(res):
        parts += [""] + pl
    if n := notes(res):
        parts += [""] + n
    return "\n".join(parts)


def _clean(x):
    """NaN -> None, recursively, so the JSON file is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_json(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_clean(res), f, indent=2)
