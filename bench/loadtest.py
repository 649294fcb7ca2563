"""``make loadtest``: many concurrent clients against a real server on loopback; every request must be accounted.

Starts ``softprompt serve`` (its own process, a temporary copy of some example prompts), warms it up, then
``--clients`` client coroutines (default 500, one httpx connection each) send ``--requests`` requests (default
10,000) over a mix of routes: ``/v1/tasks/{task}/generate``, ``/v1/generate``, ``/v1/completions`` and
``/v1/chat/completions`` (``model`` = a task), half of them streamed, greedy, ``max_new_tokens`` 1-8. A client
that gets 429/503 does not retry that request; it waits the ``Retry-After`` seconds (at most 5; 1 when the header
is missing or bad) before its next one.

Targets (a ``PASS``/``FAIL`` line each; the exit status is 1 when one is missed):

- every request ends in 200, or in 429/503 with ``Retry-After`` a positive integer;
- 0 connection errors;
- every streamed 200 ends with its final event (``finish_reason``, or OpenAI's ``data: [DONE]``), and every
  non-streamed 200 carries a ``finish_reason``;
- the server's resident memory after the run within 10% of before (after the warm-up);
- the server counts every request exactly once: the increase of ``softprompt_requests_total`` (all labels)
  over the run equals the number of requests sent.

Also printed: the count by status, requests/s and generated tokens/s (wall clock of the run), latency p50/p95
(seconds, from sending to the last byte). ``--out FILE`` writes every figure as JSON. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from .driver import sse_events
from .procs import REPO, ServerProcess, copy_prompts, count_by_label, retry_after_ok, target_line
from .stats import percentile

TASKS = ["date-format", "topic", "unit-convert", "extract-name", "topic-ptuning", "date-format-prefix"]
KINDS = ("task", "base", "completions", "chat")
REQUESTS_TOTAL = "softprompt_requests_total"


@dataclass
class Spec:
    """One planned request."""

    kind: str  # task | base | completions | chat
    path: str
    body: dict
    stream: bool


@dataclass
class Outcome:
    """What one request got. ``status`` is ``None`` for a connection error; ``final_ok`` is whether a 200 ended
    properly (final event / ``[DONE]`` for a stream, a ``finish_reason`` otherwise); ``None`` for non-200."""

    kind: str
    stream: bool
    status: int | None
    latency_s: float
    retry_after: str | None = None
    final_ok: bool | None = None
    tokens: int = 0
    error: str | None = None


def task_inputs(task: str, n: int = 40) -> list[str]:
    """Inputs of the example test set of ``task``'s family (``topic-ptuning`` -> ``topic``)."""
    family = next(f for f in ("date-format", "topic", "unit-convert", "extract-name") if task.startswith(f))
    lines = (REPO / "examples" / "tasks" / family / "test.jsonl").read_text().splitlines()
    return [json.loads(line)["input"] for line in lines[:n] if line.strip()]


def make_plan(n: int, tasks: list[str], inputs: dict[str, list[str]], seed: int = 0,
              max_new_tokens: tuple[int, int] = (1, 8)) -> list[Spec]:
    """``n`` requests, the route kind, task, input, streaming and ``max_new_tokens`` drawn with ``seed``."""
    rng = random.Random(seed)
    plan = []
    for _ in range(n):
        kind, task, stream = rng.choice(KINDS), rng.choice(tasks), rng.random() < 0.5
        text, m = rng.choice(inputs[task]), rng.randint(*max_new_tokens)
        if kind in ("task", "base"):
            path = f"/v1/tasks/{task}/generate" if kind == "task" else "/v1/generate"
            body = {"inputs": text, "parameters": {"max_new_tokens": m, "temperature": 0}, "stream": stream}
        else:
            body = {"model": task, "max_tokens": m, "temperature": 0, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            if kind == "completions":
                path, body["prompt"] = "/v1/completions", text
            else:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
        plan.append(Spec(kind, path, body, stream))
    return plan


def _usage_tokens(obj: dict) -> int:
    return int((obj.get("usage") or {}).get("completion_tokens") or 0)


def _has_finish(obj: dict) -> bool:
    if "finish_reason" in obj:
        return obj["finish_reason"] is not None
    choices = obj.get("choices") or [{}]
    return choices[0].get("finish_reason") is not None


async def send(cli: httpx.AsyncClient, spec: Spec) -> Outcome:
    """Send one planned request; never raises (a transport error becomes ``status=None``)."""
    t0 = time.perf_counter()
    out = Outcome(spec.kind, spec.stream, None, 0.0)
    try:
        if not spec.stream:
            r = await cli.post(spec.path, json=spec.body)
            out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code == 200:
                obj = r.json()
                out.final_ok, out.tokens = _has_finish(obj), _usage_tokens(obj)
            else:
                out.error = r.text[:300]
        else:
            async with cli.stream("POST", spec.path, json=spec.body) as r:
                out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
                if r.status_code != 200:
                    out.error = (await r.aread()).decode(errors="replace")[:300]
                else:
                    out.final_ok = False
                    async for event, data in sse_events(r):
                        if event == "error":
                            out.error = f"stream error event: {data[:300]}"
                            break
                        if data == "[DONE]":
                            out.final_ok = True
                            break
                        obj = json.loads(data)
                        out.tokens = _usage_tokens(obj) or out.tokens
                        if spec.kind in ("task", "base") and "finish_reason" in obj:
                            out.final_ok = True
    except httpx.TransportError as exc:
        out.status, out.error = None, f"{type(exc).__name__}: {exc}"
    except (httpx.HTTPError, ValueError) as exc:  # a broken body after a status line: a bad end, not a conn error
        out.final_ok, out.error = False, f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - t0
    return out


def backoff_s(outcome: Outcome) -> float:
    """Seconds a client waits after ``outcome`` before its next request: ``Retry-After`` (at most 5) after a
    429/503, 1 s when that header is missing or bad, else 0."""
    if outcome.status not in (429, 503):
        return 0.0
    return float(min(int(outcome.retry_after), 5)) if retry_after_ok(outcome.retry_after) else 1.0


async def run_load(url: str, plan: list[Spec], clients: int, timeout: float = 300.0) -> tuple[list[Outcome], float]:
    """Send ``plan`` with ``clients`` concurrent clients (each takes the next planned request when done);
    returns the outcomes in plan order and the wall-clock seconds."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    outcomes: list[Outcome | None] = [None] * len(plan)
    next_i = 0

    async def client_loop(cli: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < len(plan):
            i, next_i = next_i, next_i + 1
            outcomes[i] = await send(cli, plan[i])
            if (pause := backoff_s(outcomes[i])) > 0:
                await asyncio.sleep(pause)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as cli:
        await asyncio.gather(*(client_loop(cli) for _ in range(clients)))
    return [o for o in outcomes if o is not None], time.perf_counter() - t0


def aggregate(outcomes: list[Outcome], wall_s: float) -> dict:
    """The run's figures: counts by final status (``"conn_error"`` for no response), the requests that break the
    rules, throughput and latency percentiles (seconds)."""
    by_status = Counter("conn_error" if o.status is None else str(o.status) for o in outcomes)
    unaccounted = [o for o in outcomes if o.status is not None and o.status != 200
                   and not (o.status in (429, 503) and retry_after_ok(o.retry_after))]
    bad_end = [o for o in outcomes if o.status == 200 and not o.final_ok]
    lat = [o.latency_s for o in outcomes if o.status is not None]
    lat_ok = [o.latency_s for o in outcomes if o.status == 200]
    tokens = sum(o.tokens for o in outcomes if o.status == 200)
    errors = Counter((o.status, (o.error or "")[:120]) for o in outcomes if o.status != 200 or not o.final_ok)
    return {
        "requests": len(outcomes),
        "by_status": dict(sorted(by_status.items())),
        "by_kind_status": dict(sorted(Counter(f"{o.kind}{'+stream' if o.stream else ''}:{o.status}"
                                              for o in outcomes).items())),
        "connection_errors": by_status.get("conn_error", 0),
        "rejected_without_valid_retry_after": len(unaccounted),
        "ok_without_final_event": len(bad_end),
        "wall_s": wall_s,
        "requests_per_s": len(outcomes) / wall_s if wall_s > 0 else None,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "latency_p50_s": percentile(lat, 0.5) if lat else None,
        "latency_p95_s": percentile(lat, 0.95) if lat else None,
        "latency_200_p50_s": percentile(lat_ok, 0.5) if lat_ok else None,
        "latency_200_p95_s": percentile(lat_ok, 0.95) if lat_ok else None,
        "top_errors": [{"status": s, "error": e, "count": c} for (s, e), c in errors.most_common(8)],
    }


def evaluate(fig: dict) -> list[tuple[str, bool, str]]:
    """Targets as ``(name, met, detail)``; ``fig`` is :func:`aggregate`'s dict plus ``rss_before_bytes``,
    ``rss_after_bytes`` and ``server_counted`` (``None`` when unknown: a missed target)."""
    out = []
    n = fig["requests"]
    bad = fig["rejected_without_valid_retry_after"] + fig["connection_errors"]
    out.append(("every request 200 or 429/503+Retry-After", bad == 0,
                f"{n - bad}/{n} ({fig['rejected_without_valid_retry_after']} other statuses or no Retry-After)"))
    out.append(("0 connection errors", fig["connection_errors"] == 0, str(fig["connection_errors"])))
    out.append(("every 200 ends with its final event", fig["ok_without_final_event"] == 0,
                f"{fig['ok_without_final_event']} without"))
    b, a = fig.get("rss_before_bytes"), fig.get("rss_after_bytes")
    if b and a is not None:
        ch = (a - b) / b
        out.append(("RSS after within 10% of before", abs(ch) <= 0.10,
                    f"{b / 2**20:.1f} MiB -> {a / 2**20:.1f} MiB ({ch:+.1%})"))
    else:
        out.append(("RSS after within 10% of before", False, f"unknown ({b} -> {a})"))
    sc = fig.get("server_counted")
    client = {k: v for k, v in fig["by_status"].items() if k != "conn_error"}
    server = fig.get("server_by_status")  # None (unknown) is a miss
    out.append(("server counts every request once, with its status", sc is not None and round(sc) == n
                and server == client, f"server {sc if sc is None else int(round(sc))} {server} vs client {n} "
                f"{client}"))
    return out


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} s"


def print_figures(fig: dict) -> None:
    """Print the figures of a run (units in the labels)."""
    print(f"requests: {fig['requests']} in {fig['wall_s']:.1f} s; by status: {fig['by_status']}")
    print(f"by route/status: {fig['by_kind_status']}")
    print(f"throughput: {fig['requests_per_s']:.1f} requests/s, {fig['tokens_per_s']:.1f} generated tokens/s "
          f"({fig['generated_tokens']} tokens)")
    print(f"latency (all answered): p50 {_s(fig['latency_p50_s'])}, p95 {_s(fig['latency_p95_s'])}; "
          f"200s: p50 {_s(fig['latency_200_p50_s'])}, p95 {_s(fig['latency_200_p95_s'])}")
    if "client_cpu_s" in fig:
        print(f"load generator CPU: {fig['client_cpu_s']:.1f} s (it shares the machine with the server)")
    print(f"server softprompt_requests_total increase: {fig.get('server_counted')}; client sent: {fig['requests']}")
    for e in fig["top_errors"]:
        print(f"  {e['count']} x status {e['status']}: {e['error']}")


def main(argv: list[str] | None = None) -> int:
    """Run the load test; returns the exit status (0: every target met)."""
    ap = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=500, help="concurrent clients (default 500)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests in the run (default 10,000)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed requests before the 'before' RSS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="--log-level warning",
                    help="extra `softprompt serve` flags, one string (default: %(default)r)")
    ap.add_argument("--server-tree", type=Path, help="run the server from this source tree (default: this checkout)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--log", type=Path, help="server log file (default: in the temporary directory, kept)")
    a = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="softprompt-loadtest-"))
    log = a.log or tmp / "server.log"
    inputs = {t: task_inputs(t) for t in TASKS}
    warm = make_plan(a.warmup, TASKS, inputs, seed=a.seed + 1)
    plan = make_plan(a.requests, TASKS, inputs, seed=a.seed)
    with ServerProcess(copy_prompts(tmp / "prompts", TASKS), log, shlex.split(a.server_args),
                       tree=a.server_tree) as srv:
        ready_s = srv.start()
        print(f"server {srv.url} (pid {srv.pid}, {srv.tree}) ready in {ready_s:.1f} s; log {log}", flush=True)
        asyncio.run(run_load(srv.url, warm, min(a.clients, 20)))
        rss_before, counted_before = srv.rss_bytes(), count_by_label(srv.metrics(), REQUESTS_TOTAL, "status")
        print(f"warm-up done ({a.warmup} requests); {a.clients} clients, {a.requests} requests...", flush=True)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        outcomes, wall = asyncio.run(run_load(srv.url, plan, a.clients))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)  # let the last requests' metrics land
        counted_after = count_by_label(srv.metrics(), REQUESTS_TOTAL, "status")
        fig = aggregate(outcomes, wall)
        by_status = {k: round(v - counted_before.get(k, 0.0)) for k, v in counted_after.items()}
        fig.update(rss_before_bytes=rss_before, rss_after_bytes=srv.rss_bytes(), clients=a.clients,
                   client_cpu_s=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
                   server_counted=sum(by_status.values()) if counted_after else None,
                   server_by_status={k: v for k, v in sorted(by_status.items()) if v})
        exit_status = srv.stop()
    fig["server_exit_status"] = exit_status
    print_figures(fig)
    targets = evaluate(fig)
    for name, ok, detail in targets:
        print(target_line(name, ok, detail))
    fig["targets"] = [{"name": n, "met": ok, "detail": d} for n, ok, d in targets]
    if a.out:
        a.out.write_text(json.dumps(fig, indent=2))
    return 0 if all(ok for _, ok, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
