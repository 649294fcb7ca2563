"""Fault scenarios with requests in flight (run through ``python -m bench.faults``):

- ``replace_delete_inflight``: 64 greedy requests of one task; while they run its prompt is replaced (upload)
  and then deleted: all 64 end 200 with the ``prompt_version`` they started on, and with the text the same
  request gets alone on that version;
- ``disconnects``: 200 clients (streamed and not, ``max_new_tokens`` 200) hang up at random moments in 0-2 s
  after the engine first reports running requests (on a busy CPU the first step alone can take seconds):
  within 1 s of the last hang-up the server has 0 running requests and 0 request KV blocks
  (``softprompt_running_requests``, ``softprompt_kv_cache_blocks{owner="requests"}``), and counts each once;
- ``sigterm_drain``: 16 requests in flight (streamed and not), then SIGTERM: ``/ready`` answers 503 and a new
  request 503 with ``Retry-After`` during the drain, all 16 end 200 (streams with their final event) within the
  drain timeout, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time

import httpx

from .driver import sse_events
from .faults import Env, Result, prompt_meta, upload
from .procs import copy_prompts, count_by_label, metric_sum, raw_prompt_bytes, retry_after_ok

RUNNING = "softprompt_running_requests"
WAITING = "softprompt_waiting_requests"
KV_BLOCKS = "softprompt_kv_cache_blocks"
REQUESTS_TOTAL = "softprompt_requests_total"
STORY_INPUTS = ["Once upon a time, in a small village by the sea,", "The history of the printing press began",
                "Here is a long list of fruits: apple, banana,", "Dear diary, today I woke up and",
                "The recipe for bread is simple. First,", "In 1850 the city of London was",
                "Chapter 1. The storm arrived at night and", "A guide to learning Python: step one is"]


async def gen_request(cli: httpx.AsyncClient, path: str, body: dict) -> dict:
    """POST ``body`` (streamed when ``body["stream"]``); returns ``{"status", "retry_after", "final", "text",
    "finish_reason", "prompt_version", "error", "t_end"}`` (``final``: a 200 ended with its final event)."""
    out: dict = {"status": None, "final": False, "text": "", "error": None}
    try:
        if not body.get("stream"):
            r = await cli.post(path, json=body)
            out.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
            obj = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200:
                out.update(final=True, text=obj.get("generated_text", ""), finish_reason=obj.get("finish_reason"),
                           prompt_version=obj.get("prompt_version"))
            else:
                out["error"] = r.text[:300]
        else:
            async with cli.stream("POST", path, json=body) as r:
                out.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
                if r.status_code != 200:
                    out["error"] = (await r.aread()).decode(errors="replace")[:300]
                else:
                    async for event, data in sse_events(r):
                        if event == "error":
                            out["error"] = data[:300]
                            break
                        obj = json.loads(data)
                        out["text"] += obj.get("text", "")
                        if "finish_reason" in obj:
                            out.update(final=True, finish_reason=obj["finish_reason"],
                                       prompt_version=obj.get("prompt_version"))
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["t_end"] = time.monotonic()
    return out


def _body(text: str, max_new_tokens: int, stream: bool = False) -> dict:
    return {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0}, "stream": stream}


async def _metrics(cli: httpx.AsyncClient) -> dict:
    from . import prom

    r = await cli.get("/metrics")
    return prom.parse(r.text)


# ----------------------------------------------------------------------------------- replace_delete_inflight
def replace_delete_inflight(env: Env, n: int = 64, max_new_tokens: int = 32) -> Result:
    """Replace, then delete, a task's prompt while ``n`` of its requests run."""
    res = Result("replace_delete_inflight")
    prompts = copy_prompts(env.workdir / "replace_delete_inflight", [])
    (prompts / "inflight.safetensors").write_bytes(raw_prompt_bytes("topic-ptuning"))
    path = "/v1/tasks/inflight/generate"
    with env.server("replace_delete_inflight", prompts) as srv:
        srv.start()
        _, meta = prompt_meta(srv, "inflight")
        v1 = meta.get("version")

        async def go() -> tuple[dict, list[dict], dict]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=300,
                                         limits=httpx.Limits(max_connections=n + 8)) as cli:
                solo = {t: await gen_request(cli, path, _body(t, max_new_tokens)) for t in STORY_INPUTS}
                tasks = [asyncio.create_task(gen_request(cli, path, _body(STORY_INPUTS[i % len(STORY_INPUTS)],
                                                                          max_new_tokens))) for i in range(n)]
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30 and (metric_sum(await _metrics(cli), RUNNING) or 0) < 1:
                    await asyncio.sleep(0.05)
                ev = {"done_at_replace": sum(t.done() for t in tasks)}
                r = await asyncio.to_thread(upload, srv, "inflight", raw_prompt_bytes("date-format"))
                ev.update(replace=r.status_code, replace_action=r.json().get("action") if r.status_code < 300 else
                          r.text[:200], replaced_version=r.json().get("version") if r.status_code < 300 else None)
                ev["done_at_delete"] = sum(t.done() for t in tasks)
                r = await cli.delete("/v1/admin/prompts/inflight", headers=srv.auth)
                ev["delete"] = r.status_code
                ev["done_after_delete"] = sum(t.done() for t in tasks)
                results = list(await asyncio.gather(*tasks))
                ev["after_delete_generate"] = (await cli.post(path, json=_body("x", 1))).status_code
                return solo, results, ev

        solo, results, ev = asyncio.run(go())
    res.note("events", ev)
    statuses = [r["status"] for r in results]
    versions = [r.get("prompt_version") for r in results]
    same_text = sum(r["text"] == solo[STORY_INPUTS[i % len(STORY_INPUTS)]]["text"] for i, r in enumerate(results))
    res.note("finish reasons", {f: sum(r.get("finish_reason") == f for r in results)
                                for f in {r.get("finish_reason") for r in results}})
    res.check("replace and delete happened while requests ran", ev["done_at_replace"] < n
              and ev["done_at_delete"] < n and ev.get("replace") in (200, 201) and ev.get("delete") in (200, 204),
              f"{n - ev['done_at_replace']} in flight at replace ({ev.get('replace')}), "
              f"{n - ev['done_at_delete']} at delete ({ev.get('delete')})")
    res.check(f"all {n} end 200", statuses.count(200) == n, f"{statuses.count(200)}/{n}; others "
              f"{[(r['status'], r['error']) for r in results if r['status'] != 200][:3]}")
    res.check("all report the version they started on", all(v == v1 for v in versions),
              f"{versions.count(v1)}/{n} at version {v1}; seen {sorted(set(map(str, versions)))}")
    res.check("text equals the same request alone on that version", same_text == n, f"{same_text}/{n}")
    return res


# ----------------------------------------------------------------------------------------------- disconnects
def disconnects(env: Env, n: int = 200, max_new_tokens: int = 200, settle_s: float = 1.0) -> Result:
    """``n`` clients hang up at random moments; the server must free their rows and KV within ``settle_s``."""
    res = Result("disconnects")
    prompts = copy_prompts(env.workdir / "disconnects", ["date-format", "topic"])
    rng = random.Random(env.seed)
    plan = []
    for i in range(n):
        path = rng.choice(["/v1/tasks/date-format/generate", "/v1/tasks/topic/generate", "/v1/generate"])
        plan.append((path, _body(STORY_INPUTS[i % len(STORY_INPUTS)], max_new_tokens, rng.random() < 0.5),
                     rng.uniform(0.0, 2.0)))
    with env.server("disconnects", prompts) as srv:
        srv.start()

        generating = asyncio.Event()  # set once the engine reports running requests

        async def one(cli: httpx.AsyncClient, path: str, body: dict, after: float) -> tuple[str, float]:
            req = asyncio.create_task(gen_request(cli, path, body))
            await generating.wait()
            done, _ = await asyncio.wait([req], timeout=after)
            if done:
                return f"finished {req.result()['status']}", time.monotonic()
            req.cancel()  # a request cancelled mid-flight closes its connection: the client hangs up
            await asyncio.gather(req, return_exceptions=True)
            return "disconnected", time.monotonic()

        async def go() -> tuple[list, list, float, dict]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as mc, httpx.AsyncClient(
                    base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=n + 8)) as cli:
                before = count_by_label(await _metrics(mc), REQUESTS_TOTAL, "status")
                peak = {"running": 0.0, "waiting": 0.0, "s_to_first_running": None}
                t0 = time.monotonic()
                clients = asyncio.gather(*(one(cli, *p) for p in plan))
                while not clients.done():  # how many were in the engine while the clients hung up
                    m = await _metrics(mc)
                    peak.update(running=max(peak["running"], metric_sum(m, RUNNING) or 0),
                                waiting=max(peak["waiting"], metric_sum(m, WAITING) or 0))
                    if not generating.is_set() and (peak["running"] > 0 or time.monotonic() - t0 > 60):
                        peak["s_to_first_running"] = round(time.monotonic() - t0, 2)
                        generating.set()
                    await asyncio.wait([clients], timeout=0.1)
                ends = await clients
                t_last = max(t for _, t in ends)
                polls = []
                while True:
                    m = await _metrics(mc)
                    row = (time.monotonic() - t_last, metric_sum(m, RUNNING),
                           metric_sum(m, KV_BLOCKS, owner="requests"), metric_sum(m, WAITING))
                    polls.append(row)
                    if (row[1] == 0 and row[2] == 0) or row[0] > 30:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.0)
                after = count_by_label(await _metrics(mc), REQUESTS_TOTAL, "status")
                counted = {k: round(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}
                return ends, polls, counted, peak

        ends, polls, counted, peak = asyncio.run(go())
    kinds = {k: sum(e == k for e, _ in ends) for k in {e for e, _ in ends}}
    res.note("client ends", kinds)
    res.note("peak running / waiting requests while clients hung up", peak)
    last = polls[-1]
    res.note("polls (s after last hang-up, running, request KV blocks, waiting)",
             [tuple(round(x, 3) if isinstance(x, float) else x for x in p) for p in polls[:3] + polls[-2:]])
    res.check("the requests reached the engine", peak["running"] > 0, f"peak running {peak['running']:g}")
    freed = last[1] == 0 and last[2] == 0
    res.check(f"0 running and 0 request KV blocks within {settle_s} s of the last hang-up",
              freed and last[0] <= settle_s, f"{'reached' if freed else 'NOT reached'} after {last[0]:.3f} s "
              f"(running {last[1]}, request blocks {last[2]}, waiting {last[3]})")
    cut = kinds.get("disconnected", 0)
    # a client can hang up after its last byte was sent (the server rightly counts a 200 then): so every 499 is a
    # hung-up client and every client that read its answer is a 200, not necessarily the converse
    res.check("the server counts each request once; 499s only for clients that hung up",
              sum(counted.values()) == n and counted.get("499", 0) <= cut and counted.get("200", 0) >= n - cut,
              f"server +{sum(counted.values())} {dict(sorted(counted.items()))} vs {n} sent, {cut} hung up")
    return res


# --------------------------------------------------------------------------------------------- sigterm_drain
def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def sigterm_drain(env: Env, n: int = 16, max_new_tokens: int = 160, drain_timeout: float = 30.0) -> Result:
    """SIGTERM with ``n`` requests in flight: they finish, new work is refused, the process exits 0."""
    res = Result("sigterm_drain")
    prompts = copy_prompts(env.workdir / "sigterm_drain", ["date-format"])
    with env.server("sigterm_drain", prompts, ["--drain-timeout", str(drain_timeout)]) as srv:
        srv.start()

        async def go() -> dict:
            async with httpx.AsyncClient(base_url=srv.url, timeout=drain_timeout + 60,
                                         limits=httpx.Limits(max_connections=n + 8)) as cli:
                paths = ["/v1/generate", "/v1/tasks/date-format/generate"]
                tasks = [asyncio.create_task(gen_request(cli, paths[i % 2], _body(
                    STORY_INPUTS[i % len(STORY_INPUTS)], max_new_tokens, stream=i % 4 < 2))) for i in range(n)]
                t0 = time.monotonic()
                while time.monotonic() - t0 < 60 and (metric_sum(await _metrics(cli), RUNNING) or 0) < n:
                    await asyncio.sleep(0.05)
                done_before = sum(t.done() for t in tasks)
                t_sig = time.monotonic()
                srv.sigterm()
                await asyncio.sleep(0.3)
                probe: dict = {}
                async with httpx.AsyncClient(base_url=srv.url, timeout=10) as fresh:  # new connections
                    try:
                        probe["ready"] = (await fresh.get("/ready")).status_code
                    except httpx.HTTPError as exc:
                        probe["ready"] = f"{type(exc).__name__}: {exc}"
                    try:
                        r = await fresh.post("/v1/generate", json=_body("Hello", 4))
                        probe.update(new_request=r.status_code, retry_after=r.headers.get("retry-after"),
                                     new_body=r.text[:200])
                    except httpx.HTTPError as exc:
                        probe["new_request"] = f"{type(exc).__name__}: {exc}"
                probe["in_flight_at_probe"] = sum(not t.done() for t in tasks)
                results = await asyncio.gather(*tasks)
                code = await asyncio.to_thread(_wait_exit, srv.proc, drain_timeout + 30)
                return {"done_before_sigterm": done_before, "probe": probe, "results": results,
                        "exit": code, "exit_s": time.monotonic() - t_sig,
                        "finish_s": [r["t_end"] - t_sig for r in results]}

        out = asyncio.run(go())
    rs = out["results"]
    res.note("probe during drain", out["probe"])
    res.note("finish reasons", {str(f): sum(r.get("finish_reason") == f for r in rs)
                                for f in {r.get("finish_reason") for r in rs}})
    res.note("requests finished s after SIGTERM (max)", round(max(out["finish_s"]), 2))
    res.note("exit status, s after SIGTERM", (out["exit"], round(out["exit_s"], 2)))
    ok = sum(r["status"] == 200 and r["final"] for r in rs)
    res.check(f"{n} requests in flight at SIGTERM", out["done_before_sigterm"] == 0,
              f"{n - out['done_before_sigterm']} in flight")
    res.check("/ready answers 503 during the drain", out["probe"]["ready"] == 503, str(out["probe"]["ready"]))
    p = out["probe"]
    res.check("a new request during the drain gets 503 with Retry-After",
              p.get("new_request") == 503 and retry_after_ok(p.get("retry_after")),
              f"{p.get('new_request')} Retry-After {p.get('retry_after')!r}")
    res.check(f"all {n} end 200 with their final event within the drain timeout",
              ok == n and max(out["finish_s"]) <= drain_timeout,
              f"{ok}/{n}; others {[(r['status'], r['error']) for r in rs if not r['final']][:3]}")
    res.check("the process exits 0", out["exit"] == 0, f"exit {out['exit']} after {out['exit_s']:.2f} s")
    return res
