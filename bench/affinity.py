"""Task-affine routing measured: two real ``softprompt serve`` replicas (default model) behind nginx running
``docker/nginx/softprompt.conf``, N requests over T example tasks, once with the committed consistent hash on the
task and once with the hash line removed (plain round robin), fresh replicas for each.

Printed per mode: the affinity fraction (the sum over tasks of the requests on that task's busiest replica, over
all requests: 1.0 = every task on one replica), requests and distinct tasks per replica, and each replica's
prompt-KV cache (``softprompt_prompt_kv_cached``, ``softprompt_prompt_kv_bytes``) and token positions computed
(``softprompt_step_positions_total``). ``--prompt-kv-cache-bytes`` passes a budget to the replicas (default: the
server's, 1 GiB, which holds every example prompt).

    .venv/bin/python -m bench.affinity [--requests 200] [--tasks 10] [--concurrency 8]

Also the helpers the nginx test uses: :func:`render_config` (the committed config with other replica addresses,
listen port and log path), :func:`ketama_owner` (which replica nginx's ring gives a key), :class:`Nginx` (nginx as
an unprivileged subprocess with everything under one directory).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from . import prom
from .procs import EXAMPLES, REPO, ServerProcess, copy_prompts, count_by_label, free_port, metric_sum

CONF = REPO / "docker" / "nginx" / "softprompt.conf"
REQUESTS_TOTAL = "softprompt_requests_total"
HASH_LINE = re.compile(r"^[ \t]*hash[ \t]+\$softprompt_task[ \t]+consistent;[ \t]*\n", re.M)


def nginx_binary() -> str | None:
    """The nginx executable (Debian installs it in /usr/sbin, which a non-root PATH may lack), or None."""
    return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


# ----------------------------------------------------------------------------------------------------- config
def render_config(text: str, servers: list[str], listen: str, access_log: Path, round_robin: bool = False) -> str:
    """``text`` (the committed config) with each upstream block's ``server`` lines replaced by ``servers`` (keeping
    the parameters of the block's first server line), ``listen 80;`` by ``listen <listen>;`` and the access-log path
    by ``access_log``; ``round_robin`` also drops the consistent-hash line (the comparison run). Every substitution
    must apply, so a changed layout fails loudly instead of testing something else."""
    blocks = 0

    def upstream(m: re.Match) -> str:
        nonlocal blocks
        blocks += 1
        body = m.group(2)
        lines = re.findall(r"^([ \t]*)server[ \t]+\S+([^;\n]*);[ \t]*\n", body, flags=re.M)
        if not lines:
            raise ValueError(f"no server line in upstream {m.group(1)}")
        indent, params = lines[0]
        new = "".join(f"{indent}server {s}{params};\n" for s in servers)
        body = re.sub(r"^[ \t]*server[ \t]+\S+[^;\n]*;[ \t]*\n", "", body, flags=re.M)
        return f"upstream {m.group(1)} {{\n{new}{body}}}"

    out = re.sub(r"upstream[ \t]+(\S+)[ \t]*\{\n(.*?)^\}", upstream, text, flags=re.M | re.S)
    if blocks != 2:
        raise ValueError(f"expected 2 upstream blocks, found {blocks}")
    out, n = re.subn(r"^([ \t]*)listen[ \t]+80;", rf"\1listen {listen};", out, flags=re.M)
    if n != 1:
        raise ValueError("expected one `listen 80;`")
    out, n = re.subn(r"^([ \t]*access_log[ \t]+)/var/log/nginx/softprompt\.access\.log", rf"\g<1>{access_log}", out,
                     flags=re.M)
    if n != 1:
        raise ValueError("expected one `access_log /var/log/nginx/softprompt.access.log`")
    if round_robin:
        out, n = HASH_LINE.subn("", out)
        if n != 1:
            raise ValueError("expected one `hash $softprompt_task consistent;`")
    return out


def ketama_owner(servers: list[str], key: str) -> str:
    """The server nginx's ``hash <key> consistent`` picks for ``key`` while every server is up, as
    ngx_http_upstream_hash_module computes it: 160 points per server (weight 1), point i at
    crc32(host \\0 port prev) with prev the previous point's hash as 4 little-endian bytes (0 at first); the key at
    crc32(key); the first point at or after it, wrapping around."""
    points: list[tuple[int, str]] = []
    for s in servers:
        host, _, port = s.rpartition(":")
        base = host.encode() + b"\0" + port.encode()
        prev = 0
        for _ in range(160):
            prev = zlib.crc32(base + prev.to_bytes(4, "little"))
            points.append((prev, s))
    points.sort()
    h = zlib.crc32(key.encode())
    return next((s for ph, s in points if ph >= h), points[0][1])


class Nginx:
    """``nginx -c <dir>/nginx.conf -p <dir> -g 'daemon off;'`` with pid, logs and temp paths in ``run_dir``, the
    rendered config included in a minimal ``http { }``; no root needed. A context manager: stopped on exit."""

    def __init__(self, run_dir: Path, servers: list[str], conf: Path = CONF, round_robin: bool = False,
                 port: int | None = None):
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx not found (Debian: apt-get install -y nginx)")
        self.binary, self.dir = binary, Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log, self.error_log = self.dir / "access.log", self.dir / "error.log"
        (self.dir / "softprompt.conf").write_text(
            render_config(conf.read_text(), servers, f"127.0.0.1:{self.port}", self.access_log, round_robin))
        temp = "".join(f"    {k}_temp_path {self.dir / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
        (self.dir / "nginx.conf").write_text(
            f"worker_processes 1;\npid {self.dir / 'nginx.pid'};\nerror_log {self.error_log} info;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\n{temp}    include {self.dir / 'softprompt.conf'};\n}}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> Nginx:
        with open(self.dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-e", str(self.error_log),
                 "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n"
                                   f"{(self.dir / 'stderr.log').read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not listening on {self.port} after {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def affinity_fraction(per_replica: list[dict[str, float]], tasks: list[str]) -> float:
    """Σ over tasks of the requests on that task's busiest replica, over all requests (1.0: perfect affinity)."""
    total = sum(c.get(t, 0) for c in per_replica for t in tasks)
    return sum(max(c.get(t, 0) for c in per_replica) for t in tasks) / total if total else float("nan")


# ----------------------------------------------------------------------------------------------------- bench
INPUTS = {"date-format": "2024-07-09", "topic": "Storms expected across the north coast tonight",
          "unit-convert": "5 km to m", "extract-name": "Yesterday Maria Lopez opened the new library."}


def run_mode(mode: str, tasks: list[str], args: argparse.Namespace, work: Path) -> dict:
    """Fresh replicas and nginx; ``args.requests`` requests over ``tasks``; the figures from each replica."""
    extra = ["--torch-threads", "1", "--log-level", "warning"]
    if args.prompt_kv_cache_bytes is not None:
        extra += ["--prompt-kv-cache-bytes", str(args.prompt_kv_cache_bytes)]
    with contextlib.ExitStack() as stack:
        replicas = []
        for i in range(2):
            prompts = copy_prompts(work / mode / f"prompts{i}", tasks)
            replicas.append(stack.enter_context(ServerProcess(prompts, work / mode / f"replica{i}.log", extra)))
        for r in replicas:
            r.start()
        servers = [f"127.0.0.1:{r.port}" for r in replicas]
        nginx = stack.enter_context(Nginx(work / mode / "nginx", servers, round_robin=mode == "round-robin"))
        rng = random.Random(args.seed)
        plan = [tasks[i % len(tasks)] for i in range(args.requests)]
        rng.shuffle(plan)

        def send(http: httpx.Client, task: str) -> int:
            body = {"inputs": INPUTS[task.split("-prefix")[0].split("-ptuning")[0]],
                    "parameters": {"max_new_tokens": args.max_new_tokens}}
            return http.post(f"{nginx.url}/v1/tasks/{task}/generate", json=body, timeout=300).status_code

        t0 = time.monotonic()
        with httpx.Client(limits=httpx.Limits(max_connections=args.concurrency)) as http, \
                ThreadPoolExecutor(args.concurrency) as pool:
            statuses = list(pool.map(lambda t: send(http, t), plan))
        wall = time.monotonic() - t0
        samples = [r.metrics() for r in replicas]
    per_task = [{k: v for k, v in count_by_label(s, REQUESTS_TOTAL, "task").items() if k in tasks}
                for s in samples]
    return {
        "mode": mode, "wall_s": wall, "non_200": sum(1 for s in statuses if s != 200),
        "affinity": affinity_fraction(per_task, tasks),
        "predicted_ok": mode != "consistent-hash" or all(
            per_task[servers.index(ketama_owner(servers, t))].get(t, 0) == plan.count(t) for t in tasks),
        "replicas": [{
            "requests": int(sum(pt.values())),
            "tasks": sum(1 for v in pt.values() if v),
            "prompt_kv_cached": prom.value(s, "softprompt_prompt_kv_cached"),
            "prompt_kv_bytes": prom.value(s, "softprompt_prompt_kv_bytes"),
            "positions": metric_sum(s, "softprompt_step_positions_total"),
        } for s, pt in zip(samples, per_task, strict=True)],
    }


def report(res: dict) -> str:
    lines = [f"{res['mode']}: affinity fraction {res['affinity']:.3f}; {res['non_200']} non-200; "
             f"wall {res['wall_s']:.1f} s" + ("" if res["predicted_ok"] else "; NOT where the ring says")]
    for i, r in enumerate(res["replicas"]):
        kv_mb = (r["prompt_kv_bytes"] or 0) / 1e6
        lines.append(f"  replica {i}: {r['requests']} requests over {r['tasks']} tasks; prompt_kv_cached "
                     f"{r['prompt_kv_cached']:.0f} ({kv_mb:.1f} MB prompt KV); {r['positions']:.0f} positions computed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=10, help="example tasks used (at most 12)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--prompt-kv-cache-bytes", type=int, default=None)
    ap.add_argument("--modes", default="consistent-hash,round-robin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write logs and configs here (default: a temp dir)")
    args = ap.parse_args(argv)
    if nginx_binary() is None:
        print("nginx not found: apt-get install -y nginx", file=sys.stderr)
        return 2
    examples = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
    tasks = examples[: args.tasks]
    print(f"{args.requests} requests over {len(tasks)} tasks ({', '.join(tasks)}), concurrency {args.concurrency}, "
          f"max_new_tokens {args.max_new_tokens}, 2 replicas")
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="affinity-")))
        results = [run_mode(m, tasks, args, work) for m in args.modes.split(",")]
    for res in results:
        print(report(res))
    return 0 if all(r["non_200"] == 0 and r["predicted_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
