"""``softprompt bench``: load a live server over HTTP; compare with a sequential HF ``generate`` baseline.

The run, in order:

1. load the base model here (for its hidden size, the tokenizer and the baseline);
2. build the workload, seeded: ``--num-tasks`` soft prompts ``[virtual_tokens, hidden_size]`` (rows of the
   model's input-embedding matrix plus small noise, so they are scaled like real embeddings) and one text per
   request whose tokenization is exactly ``--text-tokens`` tokens;
3. upload the prompts as tasks ``bench-00``, ``bench-01``, ... (``PUT /v1/admin/prompts/{task}``), send one
   warm-up request, then ``--num-requests`` greedy ``POST /v1/tasks/{task}/generate`` (request ``j`` uses task
   ``j % num_tasks``), at most ``--concurrency`` in flight; the tasks are deleted afterwards;
4. the baseline, after the load so the two do not share the cores: one request at a time through
   ``model.generate(inputs_embeds=cat(prompt, embed(ids)))`` with the same model, prompts, texts and
   ``max_new_tokens``, greedy.

Units: tokens/s is generated (completion) tokens, EOS included, divided by wall-clock seconds; latencies are
seconds. A request may stop early at EOS (the API has no ``ignore_eos``), so the actual token counts are used
and early stops are reported. Requests are streamed (``"stream": true``) so that time to first token (TTFT) is
measured per request, client-side, as the time to the first Server-Sent Event; latency is the time to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import sys
import time

import httpx
import torch

BATCH_METRIC = "softprompt_batch_size"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="softprompt bench", description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000", help="base URL of a running server")
    ap.add_argument("--admin-token", default=os.environ.get("SOFTPROMPT_ADMIN_TOKEN"),
                    help="the server's admin token, to upload tasks [env SOFTPROMPT_ADMIN_TOKEN]")
    ap.add_argument("--num-tasks", type=int, default=16, help="distinct tasks (soft prompts)")
    ap.add_argument("--num-requests", type=int, default=64, help="requests sent to the server")
    ap.add_argument("--concurrency", type=int, default=64, help="most requests in flight at once")
    ap.add_argument("--virtual-tokens", type=int, default=20, help="virtual tokens per soft prompt")
    ap.add_argument("--text-tokens", type=int, default=20, help="text tokens per request (exact)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per request")
    ap.add_argument("--seed", type=int, default=0, help="seed of prompts and texts")
    ap.add_argument("--baseline-requests", type=int, default=None,
                    help="run the baseline on the first N requests only (default: all)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the sequential baseline")
    ap.add_argument("--model", default=None, help="baseline model (default: the default model)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-request HTTP timeout, seconds")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    counts = ("num_tasks", "num_requests", "concurrency", "virtual_tokens", "text_tokens", "max_new_tokens")
    for name in counts + ("baseline_requests",) * (args.baseline_requests is not None):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.admin_token:
        ap.error("--admin-token is required (the bench uploads its tasks through /v1/admin)")
    if args.num_tasks > 100:
        ap.error("--num-tasks must be <= 100 (tasks are named bench-00 .. bench-99)")
    return args


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation between order statistics."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------- workload
def make_texts(tokenizer, n: int, num_tokens: int, rng: random.Random) -> list[str]:
    """``n`` texts of random lower-case vocabulary words, each tokenizing (tokenizer defaults, as the server
    does) to exactly ``num_tokens`` tokens."""
    words = sorted({m.group(1) for t in tokenizer.get_vocab() if (m := re.fullmatch(r"Ġ([a-z]{3,10})", t))})
    texts: list[str] = []
    for _ in range(n):
        for _attempt in range(200):
            text = " ".join(rng.choice(words) for _ in range(num_tokens))
            ids = tokenizer(text)["input_ids"]
            while len(ids) > num_tokens and " " in text:  # a word split in two: drop words from the end
                text = text.rsplit(" ", 1)[0]
                ids = tokenizer(text)["input_ids"]
            if len(ids) == num_tokens:
                texts.append(text)
                break
        else:
            raise RuntimeError(f"could not build a text of exactly {num_tokens} tokens")
    return texts


def make_prompts(embed: torch.Tensor, n: int, num_virtual: int, seed: int) -> list[torch.Tensor]:
    """``n`` soft prompts ``[num_virtual, hidden_size]`` (float32): random rows of the embedding matrix
    ``embed`` plus Gaussian noise of 10% of its standard deviation."""
    g = torch.Generator().manual_seed(seed)
    std = float(embed.float().std())
    out = []
    for _ in range(n):
        rows = embed[torch.randint(0, embed.shape[0], (num_virtual,), generator=g)].float()
        out.append((rows + 0.1 * std * torch.randn(rows.shape, generator=g)).contiguous())
    return out


# ----------------------------------------------------------------------------------------------- metrics
def scrape(text: str) -> dict[str, dict]:
    """From a Prometheus exposition: the batch-size histogram's ``_sum``/``_count`` (rows per engine step)."""
    from prometheus_client.parser import text_string_to_metric_families

    batch = {"sum": 0.0, "count": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (BATCH_METRIC + "_sum", BATCH_METRIC + "_count"):
                batch[s.name.rsplit("_", 1)[1]] = s.value
    return {"batch": batch}


# ----------------------------------------------------------------------------------------------- server leg
class BenchError(RuntimeError):
    """A refusal with a message for the user (server unreachable, bad token, failed upload)."""


def preflight(args) -> None:
    """Refuse early (before the model loads) if the server is unreachable, not ready, or refuses the token."""
    auth = {"Authorization": f"Bearer {args.admin_token}"}
    try:
        with httpx.Client(base_url=args.server.rstrip("/"), timeout=10) as cli:
            r = cli.get("/ready")
            if r.status_code != 200:
                raise BenchError(f"server {args.server} is not ready: GET /ready -> {r.status_code} {r.text}")
            r = cli.get("/v1/admin/prompts", headers=auth)
    except httpx.HTTPError as exc:
        raise BenchError(f"server {args.server} is not reachable ({exc!r}); start it with "
                         "`softprompt serve --admin-token TOKEN --port PORT`") from exc
    if r.status_code in (401, 403):
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        raise BenchError(f"admin access refused ({r.status_code}): {msg}; pass the server's --admin-token")


async def server_leg(args, prompts: list[torch.Tensor], texts: list[str]) -> dict:
    """Upload the tasks, run the load, delete the tasks. Returns wall time (s), per-request latencies (s),
    responses, and metric snapshots before/after."""
    from safetensors.torch import save

    tasks = [f"bench-{i:02d}" for i in range(args.num_tasks)]
    auth = {"Authorization": f"Bearer {args.admin_token}"}
    conns = args.concurrency + 4
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    base_url = args.server.rstrip("/")
    async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout, limits=limits) as cli:
        uploaded: list[str] = []
        try:
            for task, p in zip(tasks, prompts, strict=True):
                blob = save({"prompt_embeddings": p})
                files = {"file": (f"{task}.safetensors", blob, "application/octet-stream")}
                r = await cli.put(f"/v1/admin/prompts/{task}", headers=auth, files=files)
                if r.status_code not in (200, 201):
                    raise BenchError(f"upload of {task} failed: {r.status_code} {r.text}")
                uploaded.append(task)
            params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
            warm = {"inputs": texts[0], "parameters": params}
            r = await cli.post(f"/v1/tasks/{tasks[0]}/generate", json=warm)
            if r.status_code != 200:
                raise BenchError(f"warm-up request failed: {r.status_code} {r.text}")
            before = scrape((await cli.get("/metrics")).text)
            sem = asyncio.Semaphore(args.concurrency)

            async def one(j: int) -> tuple[float, int, dict]:
                """One streamed request: latency (s), HTTP status, and a body with generated_text, usage and
                ttft_s (time to the first streamed event, client-side)."""
                async with sem:
                    t0 = time.perf_counter()
                    body = {"inputs": texts[j], "parameters": params, "stream": True}
                    ttft, parts, final = None, [], None
                    async with cli.stream("POST", f"/v1/tasks/{tasks[j % len(tasks)]}/generate", json=body) as resp:
                        if resp.status_code != 200:
                            await resp.aread()
                            return time.perf_counter() - t0, resp.status_code, {"error": resp.text}
                        async for line in resp.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            event = json.loads(line[5:])
                            parts.append(event.get("text", ""))
                            if "finish_reason" in event:
                                final = event
                    lat = time.perf_counter() - t0
                    if final is None:
                        return lat, 599, {"error": "stream ended without a final event"}
                    return lat, 200, {"generated_text": "".join(parts), "usage": final["usage"], "ttft_s": ttft}

            load1, t0 = os.getloadavg()[0], time.perf_counter()
            results = await asyncio.gather(*(one(j) for j in range(args.num_requests)))
            wall = time.perf_counter() - t0
            after = scrape((await cli.get("/metrics")).text)
        finally:
            for task in uploaded:
                try:
                    await cli.delete(f"/v1/admin/prompts/{task}", headers=auth)
                except httpx.HTTPError as exc:
                    print(f"warning: could not delete task {task}: {exc!r}", file=sys.stderr)
    return {"wall": wall, "results": results, "before": before, "after": after, "load1": load1}


# ----------------------------------------------------------------------------------------------- baseline
def baseline_leg(loaded, prompts: list[torch.Tensor], texts: list[str], n: int, max_new: int) -> dict:
    """Requests ``0..n-1`` one at a time through HF ``generate`` with ``inputs_embeds`` (greedy). With
    ``inputs_embeds`` and no ``input_ids``, a decoder-only model's ``generate`` returns only the new tokens.
    Returns wall time (s), per-request latencies (s), new-token counts and texts (decoded as the server
    decodes)."""
    model, tok = loaded.model, loaded.tokenizer
    embed = model.get_input_embeddings()
    eos = set(loaded.eos_token_ids)

    def run(j: int, max_new_tokens: int) -> list[int]:
        ids = torch.tensor(tok(texts[j])["input_ids"])
        with torch.no_grad():
            x = torch.cat([prompts[j % len(prompts)].to(loaded.dtype), embed(ids)])[None]
            out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), None)
        return new if cut is None else new[: cut + 1]  # EOS counted, as the server counts it

    run(0, 2)  # warm-up, untimed
    lat, counts, gen_texts = [], [], []
    load1, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    for j in range(n):
        t1 = time.perf_counter()
        new = run(j, max_new)
        lat.append(time.perf_counter() - t1)
        counts.append(len(new))
        gen_texts.append(tok.decode([t for t in new if t not in eos], skip_special_tokens=True))
    wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": lat, "counts": counts, "texts": gen_texts, "load1": load1,
            "cores": (time.process_time() - cpu0) / wall}


# ----------------------------------------------------------------------------------------------- report
def masked_command(argv: list[str]) -> str:
    out, hide = [], False
    for a in argv:
        out.append("***" if hide else re.sub(r"^(--admin-token=).*", r"\1***", a))
        hide = a == "--admin-token"
    return "softprompt bench " + shlex.join(out)


def table_rows(res: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the printed table; units in the labels."""
    s, b = res["server"], res.get("baseline")
    rows = [("server tokens/s", f"{s['tokens_per_s']:.1f}")]
    if b:
        label = f"baseline tokens/s (sequential HF generate, {b['requests']} of {res['num_requests']} reqs)"
        rows += [(label, f"{b['tokens_per_s']:.1f}"), ("speed-up", f"{res['speedup']:.2f}x")]
    rows += [
        ("requests / concurrency / tasks",
         f"{res['num_requests']} / {res['concurrency']} / {res['num_tasks']}"),
        ("virtual / text / max new tokens",
         f"{res['virtual_tokens']} / {res['text_tokens']} / {res['max_new_tokens']}"),
        ("server wall time (s) / completion tokens", f"{s['wall_s']:.2f} / {s['completion_tokens']}"),
        ("latency p50 / p95 (s, client-side)", f"{s['latency_p50_s']:.3f} / {s['latency_p95_s']:.3f}"),
        ("TTFT p50 / p95 (s, client-side, first streamed event)",
         f"{s['ttft_p50_s']:.3f} / {s['ttft_p95_s']:.3f}"),
        ("engine steps / mean rows per step", f"{s['engine_steps']:.0f} / {s['mean_rows_per_step']:.1f}"),
        ("early stops (EOS) / failed requests, server", f"{s['early_stops']} / {s['failed_requests']}"),
    ]
    loads = f"{s['load_avg_1min_at_start']:.2f}"
    if b:
        rows += [("early stops (EOS), baseline", f"{b['early_stops']}"),
                 ("baseline latency p50 (s)", f"{b['latency_p50_s']:.3f}"),
                 ("server text == baseline text", f"{b['texts_equal_to_server']} / {b['requests']}"),
                 ("baseline CPU cores used (process CPU s / wall s)", f"{b['cpu_cores_used']:.2f}")]
        loads += f" / {b['load_avg_1min_at_start']:.2f}"
    rows.append(("load average (1 min) at start of each leg",
                 f"{loads}  (of {os.cpu_count()} CPUs; other work skews the figures)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table (and write ``--json``). Returns 0; 1 if requests failed; 2 if
    refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from server.config import Settings
    from server.model_loader import load_model

    try:
        preflight(args)
    except BenchError as exc:
        print(f"softprompt bench: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, cache_dir=Settings().cache_dir, device="cpu", dtype="float32")
    embed_w = loaded.model.get_input_embeddings().weight.detach()
    prompts = make_prompts(embed_w, args.num_tasks, args.virtual_tokens, args.seed)
    texts = make_texts(loaded.tokenizer, args.num_requests, args.text_tokens, random.Random(args.seed))
    print(f"model {loaded.model_id} (hidden {loaded.hidden_size}); {args.num_requests} requests over "
          f"{args.num_tasks} tasks, concurrency {args.concurrency}; running the server leg ...", flush=True)
    try:
        srv = asyncio.run(server_leg(args, prompts, texts))
    except (BenchError, httpx.HTTPError) as exc:
        print(f"softprompt bench: {exc!r} (server {args.server})", file=sys.stderr)
        return 2
    ok = [(lat, body) for lat, code, body in srv["results"] if code == 200]
    failed = len(srv["results"]) - len(ok)
    counts = [b["usage"]["completion_tokens"] for _, b in ok]
    srv_tokens, lats = sum(counts), [lat for lat, _ in ok]
    bsum = srv["after"]["batch"]["sum"] - srv["before"]["batch"]["sum"]
    steps = srv["after"]["batch"]["count"] - srv["before"]["batch"]["count"]
    res: dict = {
        "command": masked_command(argv), "model": loaded.model_id,
        **{k: getattr(args, k) for k in ("num_tasks", "num_requests", "concurrency", "virtual_tokens",
                                         "text_tokens", "max_new_tokens")},
        "server": {
            "wall_s": srv["wall"], "completion_tokens": srv_tokens, "tokens_per_s": srv_tokens / srv["wall"],
            "failed_requests": failed, "early_stops": sum(1 for c in counts if c < args.max_new_tokens),
            "latency_p50_s": percentile(lats, 0.5), "latency_p95_s": percentile(lats, 0.95),
            "ttft_p50_s": percentile([b["ttft_s"] for _, b in ok], 0.5),
            "ttft_p95_s": percentile([b["ttft_s"] for _, b in ok], 0.95),
            "engine_steps": steps, "mean_rows_per_step": bsum / steps if steps else math.nan,
            "load_avg_1min_at_start": srv["load1"],
        },
    }
    if not args.no_baseline:
        n = min(args.baseline_requests or args.num_requests, args.num_requests)
        print(f"server leg done ({srv['wall']:.1f} s); running the baseline on {n} requests ...", flush=True)
        base = baseline_leg(loaded, prompts, texts, n, args.max_new_tokens)
        same = sum(1 for j in range(n) if srv["results"][j][1] == 200
                   and srv["results"][j][2]["generated_text"] == base["texts"][j])
        res["baseline"] = {
            "requests": n, "wall_s": base["wall"], "generated_tokens": sum(base["counts"]),
            "tokens_per_s": sum(base["counts"]) / base["wall"],
            "early_stops": sum(1 for c in base["counts"] if c < args.max_new_tokens),
            "latency_p50_s": percentile(base["latencies"], 0.5), "texts_equal_to_server": same,
            "load_avg_1min_at_start": base["load1"], "cpu_cores_used": base["cores"],
        }
        res["speedup"] = res["server"]["tokens_per_s"] / res["baseline"]["tokens_per_s"]
    print("\n" + res["command"])
    rows = table_rows(res)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
