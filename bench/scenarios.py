"""The scenarios: which workloads run, on which systems, and what is derived from them.

- ``standard``: ``--num-requests`` (64) over ``--num-tasks`` (16, request ``j`` -> task ``j % 16``),
  ``--virtual-tokens`` (20) + ``--text-tokens`` (20), ``--max-new-tokens`` (32), ``--concurrency`` (64).
- ``long``: ``--long-requests`` (32) of ``--long-text-tokens`` (480) text tokens, otherwise as standard.
- ``many-tasks``: ``--many-requests`` (192) of the standard shape, task chosen uniformly at random among
  ``--task-counts`` (1, 100, 1,000, 5,000) tasks, plus a Zipf mix (``--zipf-s`` 1.1) over ``--zipf-tasks``
  (1,000). Levels run in increasing task count; each uploads only the tasks it adds, and the server's resident
  memory is read just before and just after those uploads (no requests in flight), so memory per extra task =
  RSS growth / tasks added. The same texts are sent at every level: only the spread over tasks changes.
- ``offered-load``: ``--load-requests`` (64) of the standard shape with Poisson arrivals (seeded) at each rate of
  ``--rates``, or by default at ``--rate-fractions`` (0.25, 0.5, 0.8) of the capacity the standard scenario
  measured in this run (completed requests/s of its server leg; measured first if standard is not selected).

Peers: the server leg always runs; vLLM runs on standard, long and offered-load when ``--vllm`` is given; the
Hugging Face padded batch and sequential legs run on standard and long unless turned off.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx

from . import prom
from .driver import load_average
from .flops import ModelShape, matmul_peak, row_prefill_flops, server_all_steps_flops, server_prefill_flops
from .hf_legs import hf_padded_batch, hf_sequential
from .server_leg import ServerTarget
from .stats import LegResult, summarize, texts_equal
from .vllm_leg import VllmTarget
from .workload import PromptBank, Workload, choose_tasks, make_texts, poisson_arrivals

SCENARIOS = ("standard", "long", "many-tasks", "offered-load")
RSS_SETTLE_S = 3.0  # after uploads, before reading RSS: lets the server's directory watcher settle
PREFETCH_WAIT_S = 240.0  # most seconds to wait for the server to finish computing new prompts' KV (idle prefetch)
CACHED = "softprompt_prompt_kv_cached"
TAIL_BYTES = "softprompt_prompt_kv_tail_bytes"


@dataclass
class Context:
    args: object
    loaded: object
    bank: PromptBank
    target: ServerTarget
    vllm: VllmTarget | None
    shape: ModelShape
    results: dict = field(default_factory=dict)
    peak: dict | None = None
    failed_requests: int = 0

    def texts(self, tag: str, n: int, num_tokens: int) -> list[str]:
        return make_texts(self.loaded.tokenizer, n, num_tokens, random.Random(f"{self.args.seed}-{tag}"))


def _summary(leg: LegResult, ref: LegResult | None, ctx: Context) -> dict:
    s = summarize(leg)
    if ref is not None and leg is not ref:
        eq, n = texts_equal(leg, ref)
        s["texts_equal_to_server"] = [eq, n]
    if leg.system == "server":
        ctx.failed_requests += s["failed_requests"]
    return s


def _peer_error(system: str, exc: Exception) -> dict:
    print(f"  {system} leg failed: {exc!r}", flush=True)
    return {"system": system, "error": repr(exc)}


def _vllm_leg(ctx: Context, wl: Workload, scenario: str, server: LegResult) -> dict:
    try:
        leg = asyncio.run(ctx.vllm.run(ctx.loaded, ctx.bank, wl, scenario))
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return _peer_error("vllm", exc)
    s = _summary(leg, server, ctx)
    eq, n = s["texts_equal_to_server"]
    print(f"  vllm: {s['tokens_per_s']:.1f} tokens/s; texts equal {eq}/{n}", flush=True)
    return s


# ------------------------------------------------------------------------------------ standard and long
def _prefill(ctx: Context, server: dict, wl: Workload, hf_batch: LegResult | None) -> dict:
    """Achieved prefill GFLOP/s of the server (and of the HF padded batch's first step) vs the torch.mm peak."""
    if ctx.peak is None:
        load1 = load_average()
        ctx.peak = {**matmul_peak(), "load_avg_1min_at_start": load1}
    eng = server.get("engine", {})
    tokens = (eng.get("step_tokens") or {}).get("prefill")
    seconds = (eng.get("step_seconds") or {}).get("prefill")
    out: dict = {"prefill_tokens": tokens, "prefill_seconds": seconds, "achieved_gflops_per_s": None,
                 "peak_gflops_per_s": ctx.peak["peak_gflops_per_s"], "fraction_of_peak": None,
                 "peak_load_avg_1min": ctx.peak["load_avg_1min_at_start"]}
    if tokens and seconds:
        flops = server_prefill_flops(ctx.shape, tokens, wl.virtual_tokens, wl.text_tokens)
        out.update(flops=flops, achieved_gflops_per_s=flops / seconds / 1e9)
        out["fraction_of_peak"] = out["achieved_gflops_per_s"] / out["peak_gflops_per_s"]
    all_pos = [v for v in (eng.get("step_tokens") or {}).values() if v is not None]
    all_s = [v for v in (eng.get("step_seconds") or {}).values() if v is not None]
    if all_pos and sum(all_s) > 0:
        ok = server["requests"] - server["failed_requests"]
        flops = server_all_steps_flops(ctx.shape, sum(all_pos), ok, server["completion_tokens"],
                                       wl.virtual_tokens, wl.text_tokens)
        out.update(all_steps_positions=sum(all_pos), all_steps_seconds=sum(all_s),
                   all_steps_gflops_per_s=flops / sum(all_s) / 1e9)
    if hf_batch is not None:
        flops = wl.num_requests * row_prefill_flops(ctx.shape, 0, wl.virtual_tokens + wl.text_tokens)
        out["hf_batch_prefill_gflops_per_s"] = flops / hf_batch.extra["first_step_s"] / 1e9
    return out


def run_with_peers(ctx: Context, wl: Workload) -> dict:
    """A closed-loop workload on the server, then on each enabled peer (peers never share the CPU with the
    server leg: they run after it)."""
    a, name = ctx.args, wl.name
    server = asyncio.run(ctx.target.run(wl, name))
    legs = {"server": _summary(server, None, ctx)}
    print(f"  server: {legs['server']['tokens_per_s']:.1f} tokens/s", flush=True)
    if ctx.vllm is not None:
        legs["vllm"] = _vllm_leg(ctx, wl, name, server)
    batch = None
    if not a.no_hf_batch:
        batch = hf_padded_batch(ctx.loaded, ctx.bank, wl, name)
        legs["hf-padded-batch"] = _summary(batch, server, ctx)
    if not a.no_baseline:
        n = min(a.baseline_requests or wl.num_requests, wl.num_requests)
        legs["hf-sequential"] = _summary(hf_sequential(ctx.loaded, ctx.bank, wl, n, name), server, ctx)
    return {"workload": wl.describe(), "legs": legs, "prefill": _prefill(ctx, legs["server"], wl, batch)}


def standard_workload(ctx: Context, name: str = "standard") -> Workload:
    a = ctx.args
    return Workload(name, ctx.texts("standard", a.num_requests, a.text_tokens),
                    choose_tasks(a.num_requests, a.num_tasks, "cycle", random.Random(0)), a.num_tasks,
                    a.virtual_tokens, a.text_tokens, a.max_new_tokens, a.concurrency)


def run_standard(ctx: Context) -> dict:
    return run_with_peers(ctx, standard_workload(ctx))


def run_long(ctx: Context) -> dict:
    a = ctx.args
    wl = Workload("long", ctx.texts("long", a.long_requests, a.long_text_tokens),
                  choose_tasks(a.long_requests, a.num_tasks, "cycle", random.Random(0)), a.num_tasks,
                  a.virtual_tokens, a.long_text_tokens, a.max_new_tokens, a.concurrency)
    return run_with_peers(ctx, wl)


# ------------------------------------------------------------------------------------------ many tasks
def many_task_levels(task_counts: list[int], zipf_tasks: int) -> list[tuple[str, int]]:
    """(distribution, tasks) in run order: increasing task count, the Zipf level right after the uniform level
    of the same count (or where its count falls)."""
    levels = [("uniform", n) for n in sorted(set(task_counts))]
    if zipf_tasks:
        levels.append(("zipf", zipf_tasks))
    return sorted(levels, key=lambda lv: (lv[1], lv[0] == "zipf"))


async def _settled_prefetch(ctx: Context) -> tuple[float, float | None]:
    """Wait (at most ``PREFETCH_WAIT_S``) until the server's count of cached prompt KVs stops changing for two
    polls a second apart: the server computes new prompts' KV while idle. Returns (seconds waited, count)."""
    t0, last, stable = time.perf_counter(), None, 0
    while time.perf_counter() - t0 < PREFETCH_WAIT_S and stable < 2:
        await asyncio.sleep(1.0)
        now = prom.value(await ctx.target.metrics(), CACHED)
        stable = stable + 1 if now == last else 0
        last = now
    return time.perf_counter() - t0, last


async def _upload_measured(ctx: Context, n: int) -> dict:
    samples = await ctx.target.metrics()
    before, source = ctx.target.rss.read(samples)
    tails_before = prom.value(samples, TAIL_BYTES)
    t0 = time.perf_counter()
    added = await ctx.target.ensure_tasks(n)
    upload_s = time.perf_counter() - t0
    if not added:
        return {"added_tasks": 0}
    await asyncio.sleep(RSS_SETTLE_S)
    waited, cached = await _settled_prefetch(ctx)
    samples = await ctx.target.metrics()
    after, source_after = ctx.target.rss.read(samples)
    tails_after = prom.value(samples, TAIL_BYTES)
    tails = (tails_after - tails_before) if tails_before is not None and tails_after is not None else 0.0
    out = {"added_tasks": added, "upload_s": upload_s, "rss_before": before, "rss_after": after,
           "source": source_after, "tensor_bytes": ctx.bank.tensor_bytes, "bytes_per_task": None, "ratio": None,
           "prefetch_wait_s": waited, "prompt_kv_cached": cached, "tail_bytes_added": tails}
    if before is not None and after is not None and source == source_after:
        # the prompt-KV tails computed ahead of traffic are cache (bounded by its budget), not per-task memory
        out["bytes_per_task"] = (after - before - tails) / added
        out["ratio"] = out["bytes_per_task"] / ctx.bank.tensor_bytes
    return out


def run_many_tasks(ctx: Context) -> dict:
    a = ctx.args
    texts = ctx.texts("many-tasks", a.many_requests, a.text_tokens)
    levels = []
    for dist, n in many_task_levels(a.task_counts, a.zipf_tasks):
        announce_upload = max(0, n - len(ctx.target.uploaded))
        if announce_upload:
            print(f"[many-tasks] uploading {announce_upload} tasks (up to {n}) ...", flush=True)
        memory = asyncio.run(_upload_measured(ctx, n))
        if memory.get("bytes_per_task") is not None:
            print(f"  resident memory per added task: {memory['bytes_per_task'] / 1024:.1f} KiB "
                  f"({memory['ratio']:.2f}x the {memory['tensor_bytes'] / 1024:.1f} KiB tensor; "
                  f"{memory['source']}; prompt-KV tails excluded: {memory['tail_bytes_added'] / 2**20:.1f} MiB); "
                  f"{memory['upload_s']:.1f} s to upload, {memory['prefetch_wait_s']:.0f} s until "
                  f"{memory['prompt_kv_cached']:.0f} prompt KVs were cached", flush=True)
        rng = random.Random(f"{a.seed}-many-{dist}-{n}")
        wl = Workload(f"many-tasks/{dist}-{n}", texts, choose_tasks(a.many_requests, n, dist, rng, a.zipf_s), n,
                      a.virtual_tokens, a.text_tokens, a.max_new_tokens, a.concurrency, distribution=dist)
        s = _summary(asyncio.run(ctx.target.run(wl, "many-tasks")), None, ctx)
        print(f"  server: {s['tokens_per_s']:.1f} tokens/s", flush=True)
        levels.append({"tasks": n, "distribution": dist, "workload": wl.describe(), "server": s,
                       "memory": memory})
    uniform = [lv for lv in levels if lv["distribution"] == "uniform"]
    ref = min(uniform, key=lambda lv: lv["tasks"]) if uniform else None
    for lv in levels:
        lv["reference_tasks"] = ref["tasks"] if ref else None
        lv["ratio_to_reference"] = (lv["server"]["tokens_per_s"] / ref["server"]["tokens_per_s"]
                                    if ref and ref["server"]["tokens_per_s"] else None)
    return {"levels": levels}


# ---------------------------------------------------------------------------------------- offered load
def run_offered_load(ctx: Context) -> dict:
    a = ctx.args
    out: dict = {}
    if a.rates:
        rates = list(a.rates)
    else:
        std = ctx.results.get("standard", {}).get("legs", {}).get("server")
        if std is None:
            print("[offered-load] measuring capacity with the standard workload first", flush=True)
            std = _summary(asyncio.run(ctx.target.run(standard_workload(ctx, "offered-load/capacity"),
                                                      "offered-load")), None, ctx)
            out["capacity_probe"] = std
        out["capacity_requests_per_s"] = cap = std["requests_per_s"]
        rates = [f * cap for f in a.rate_fractions]
    texts = ctx.texts("offered-load", a.load_requests, a.text_tokens)
    tasks = choose_tasks(a.load_requests, a.num_tasks, "cycle", random.Random(0))
    out["rates"] = []
    for i, rate in enumerate(rates):
        arrivals = poisson_arrivals(a.load_requests, rate, random.Random(f"{a.seed}-arrivals-{i}"))
        wl = Workload(f"offered-load@{rate:.3g}", texts, tasks, a.num_tasks, a.virtual_tokens, a.text_tokens,
                      a.max_new_tokens, concurrency=a.load_requests, arrivals=arrivals)
        server = asyncio.run(ctx.target.run(wl, f"offered-load {rate:.3g} req/s"))
        legs = {"server": _summary(server, None, ctx)}
        s = legs["server"]
        print(f"  server: TTFT p50/p95 {s['ttft_p50_s']:.2f}/{s['ttft_p95_s']:.2f} s, latency p50/p95 "
              f"{s['latency_p50_s']:.2f}/{s['latency_p95_s']:.2f} s", flush=True)
        if ctx.vllm is not None:
            legs["vllm"] = _vllm_leg(ctx, wl, f"offered-load {rate:.3g} req/s", server)
        out["rates"].append({"rate_rps": rate, "fraction": a.rate_fractions[i] if not a.rates else None,
                             "realized_rate_rps": len(arrivals) / arrivals[-1], "workload": wl.describe(),
                             "legs": legs})
    return out


RUNNERS = {"standard": run_standard, "long": run_long, "many-tasks": run_many_tasks,
           "offered-load": run_offered_load}


def run_scenario(ctx: Context, name: str) -> dict:
    """Run one scenario; its tasks are deleted from the server afterwards, whatever happens."""
    try:
        return RUNNERS[name](ctx)
    finally:
        asyncio.run(ctx.target.delete_all())
