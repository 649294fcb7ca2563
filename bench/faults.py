"""``make faults``: fault scenarios against real server processes on loopback, each a named scenario.

Every scenario starts its own ``softprompt serve`` (own process group, own temporary prompt directory, stderr and
stdout in ``<workdir>/<scenario>.log``), prints its figures and one ``PASS``/``FAIL`` line per target, and stops
its server. ``--only NAME`` (repeatable) picks scenarios; ``--out FILE`` writes every result as JSON; the exit
status is 1 when a target is missed.

- ``kill9_upload``: a task at version 1 serves; uploads of a new version (``PUT /v1/admin/prompts/{task}``) are
  cut by ``kill -9`` at spread moments (before, during and after the response); after each restart the task
  serves the previous or the new prompt (the new one if the upload had been answered 200/201), answers a
  generate request with 200, and the prompt directory holds exactly its task entries (no stray files); the
  version never goes back across a restart;
- ``corrupt_file``: a half-written safetensors file and a garbage file under new task names, and an existing
  task's file truncated in place, while the server hot-reloads: the bad ones are 404, the existing task keeps its
  prompt, ``softprompt_prompt_load_errors_total`` grows by 3; after a restart on the same directory the bad files
  are still skipped and counted (3);
- ``replace_delete_inflight``, ``disconnects``, ``sigterm_drain``: see :mod:`bench.faults_inflight`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .procs import ServerProcess, copy_prompts, metric_sum, raw_prompt_bytes, target_line

LOAD_ERRORS = "softprompt_prompt_load_errors_total"


@dataclass
class Result:
    """One scenario's outcome: ``checks`` are ``(target, met, detail)``; ``figures`` are printed and saved."""

    name: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def check(self, target: str, met: bool, detail: str) -> bool:
        """Record a target and print its line; returns ``met``."""
        self.checks.append((target, bool(met), detail))
        print("  " + target_line(target, bool(met), detail), flush=True)
        return bool(met)

    def note(self, key: str, value: object) -> None:
        """Record and print a figure."""
        self.figures[key] = value
        print(f"  {key}: {value}", flush=True)

    @property
    def passed(self) -> bool:
        """True when at least one target was checked and every one was met."""
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "figures": self.figures,
                "checks": [{"target": t, "met": ok, "detail": d} for t, ok, d in self.checks]}


@dataclass
class Env:
    """Where a scenario works: ``workdir`` (prompt dirs and logs), ``tree`` (server source), ``seed``."""

    workdir: Path
    tree: Path | None = None
    seed: int = 0

    def server(self, name: str, prompts: Path, args: list[str] | None = None) -> ServerProcess:
        """A (not yet started) server for scenario ``name``, logging to ``<workdir>/<name>.log``."""
        return ServerProcess(prompts, self.workdir / f"{name}.log", args, tree=self.tree)


# --------------------------------------------------------------------------------------------- helpers
def generate(url: str, task: str | None, text: str = "2024-07-09", max_new_tokens: int = 2,
             timeout: float = 60.0) -> httpx.Response:
    """One greedy non-streamed generate request (``task=None``: the base model)."""
    path = f"/v1/tasks/{task}/generate" if task else "/v1/generate"
    body = {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    return httpx.post(url + path, json=body, timeout=timeout)


def prompt_meta(srv: ServerProcess, task: str) -> tuple[int, dict]:
    """``GET /v1/admin/prompts/{task}``: (status, JSON body or ``{}``)."""
    r = httpx.get(f"{srv.url}/v1/admin/prompts/{task}", headers=srv.auth, timeout=30)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {}


def upload(srv: ServerProcess, task: str, data: bytes, timeout: float = 60.0) -> httpx.Response:
    """``PUT /v1/admin/prompts/{task}`` with ``data`` as a ``.safetensors`` file."""
    files = {"file": (f"{task}.safetensors", data, "application/octet-stream")}
    return httpx.put(f"{srv.url}/v1/admin/prompts/{task}", headers=srv.auth, files=files, timeout=timeout)


def stray_entries(directory: Path, expected: set[str]) -> list[str]:
    """What a crash must not leave in a prompt directory: entries under task names other than ``expected``, and
    dot-entries named after an expected task (``.victim.tmp-...``; the store's own files such as
    ``.versions.json`` are not strays)."""
    tasks = {e.removesuffix(".safetensors") for e in expected}
    return sorted(e for e in os.listdir(directory) if e not in expected and (
        not e.startswith(".") or any(e.startswith(f".{t}.") for t in tasks)))


def load_errors(srv: ServerProcess) -> tuple[float, dict]:
    """``softprompt_prompt_load_errors_total``: (sum over reasons, {reason: count})."""
    samples = srv.metrics()
    by_reason = {dict(lab).get("reason", ""): v for (n, lab), v in samples.items() if n == LOAD_ERRORS}
    return metric_sum(samples, LOAD_ERRORS) or 0.0, by_reason


# --------------------------------------------------------------------------------------------- kill9_upload
def kill9_upload(env: Env, rounds: int = 10) -> Result:
    """``kill -9`` during uploads of a new version, ``rounds`` times, restarting after each."""
    res = Result("kill9_upload")
    prompts = copy_prompts(env.workdir / "kill9_upload", ["topic"])
    old, new = raw_prompt_bytes("date-format"), raw_prompt_bytes("unit-convert")
    (prompts / "victim.safetensors").write_bytes(old)
    expected = {"topic", "victim.safetensors"}
    with env.server("kill9_upload", prompts) as srv:
        srv.start()
        _, meta = prompt_meta(srv, "victim")
        sha = {"old": meta.get("sha256")}
        t0 = time.perf_counter()
        r = upload(srv, "kill9-probe", new)
        upload_s = time.perf_counter() - t0
        sha["new"] = r.json().get("sha256") if r.status_code in (200, 201) else None
        httpx.delete(f"{srv.url}/v1/admin/prompts/kill9-probe", headers=srv.auth, timeout=30)
        res.note("sha256", sha)
        res.note("upload_s (one upload, unhurt)", round(upload_s, 4))
        fractions = [0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.5, None][:rounds]  # None: after the response
        rounds_out, bad, version_bad = [], [], []
        for k, frac in enumerate(fractions):
            _, meta = prompt_meta(srv, "victim")
            cur, cur_version = meta.get("sha256"), meta.get("version") or 0
            data, want = (new, sha["new"]) if cur == sha["old"] else (old, sha["old"])
            answer: dict = {}

            def send(data: bytes = data, answer: dict = answer) -> None:
                try:
                    answer["status"] = upload(srv, "victim", data, timeout=30).status_code
                except httpx.HTTPError as exc:
                    answer["error"] = type(exc).__name__
            th = threading.Thread(target=send)
            th.start()
            if frac is None:
                th.join()
            else:
                time.sleep(frac * upload_s)
            srv.kill9()
            th.join()
            after_kill = sorted(os.listdir(prompts))
            ready_s = srv.start()
            st, meta = prompt_meta(srv, "victim")
            got = meta.get("sha256")
            gen = generate(srv.url, "victim")
            strays = stray_entries(prompts, expected)
            which = "new" if got == want else "previous" if got == cur else f"other ({got})"
            accepted = answer.get("status") in (200, 201)
            ok = st == 200 and got in (cur, want) and gen.status_code == 200 and not strays \
                and (not accepted or got == want)
            row = {"round": k, "delay_s": None if frac is None else round(frac * upload_s, 4),
                   "upload_answer": answer.get("status", answer.get("error")), "serves": which,
                   "version": f"{cur_version} -> {meta.get('version')}", "admin_status": st,
                   "generate_status": gen.status_code,
                   "dir_after_kill": after_kill, "strays_after_restart": strays, "restart_s": round(ready_s, 1)}
            rounds_out.append(row)
            print(f"  round {k}: {row}", flush=True)
            if not ok:
                bad.append(k)
            v = meta.get("version") or 0
            if v < cur_version or (which == "new" and v <= cur_version):
                version_bad.append(k)
        res.figures["rounds"] = rounds_out
        n = len(fractions)
        res.check("after each kill -9 the task serves the previous or the new prompt (200)", not bad,
                  f"{n - len(bad)}/{n} rounds good" + (f"; bad rounds {bad}" if bad else ""))
        res.check("an upload answered 200/201 before the kill is the one served", all(
            r["serves"] == "new" for r in rounds_out if r["upload_answer"] in (200, 201)),
            f"{sum(r['upload_answer'] in (200, 201) for r in rounds_out)} answered uploads")
        res.check("no stray files under task names after restart", all(not r["strays_after_restart"]
                                                                        for r in rounds_out),
                  str(sorted({s for r in rounds_out for s in r["strays_after_restart"]})))
        res.check("versions persist: never back after a restart, up when the new prompt serves", not version_bad,
                  f"bad rounds {version_bad}" if version_bad else "every round")
    return res


# --------------------------------------------------------------------------------------------- corrupt_file
def _wait_errors(srv: ServerProcess, at_least: float, timeout: float) -> tuple[float, float]:
    t0 = time.monotonic()
    while True:
        total, _ = load_errors(srv)
        if total >= at_least or time.monotonic() - t0 > timeout:
            return total, time.monotonic() - t0
        time.sleep(0.1)


def corrupt_file(env: Env) -> Result:
    """Half-written, garbage and truncated prompt files in a watched directory, then a restart on it."""
    res = Result("corrupt_file")
    prompts = copy_prompts(env.workdir / "corrupt_file", ["topic"])
    good = raw_prompt_bytes("date-format")
    (prompts / "victim.safetensors").write_bytes(good)
    with env.server("corrupt_file", prompts) as srv:
        srv.start()
        _, meta = prompt_meta(srv, "victim")
        before, _ = load_errors(srv)
        bad_files = {"half-task.safetensors": good[: len(good) // 2],
                     "garbage-task.safetensors": random.Random(env.seed).randbytes(4096),
                     "victim.safetensors": good[: len(good) * 3 // 4]}
        for name, data in bad_files.items():
            with open(prompts / name, "wb") as f:  # in place, not atomic: what a crashed copy leaves
                f.write(data)
        total, waited = _wait_errors(srv, before + 3, 20.0)
        time.sleep(1.5)  # and no double counting afterwards
        total, by_reason = load_errors(srv)
        res.note("load_errors before/after", f"{before:g} -> {total:g} (by reason {by_reason}; "
                 f"reached +3 after {waited:.2f} s)")
        codes = {t: generate(srv.url, t).status_code for t in ("half-task", "garbage-task", "victim", "topic")}
        _, meta_after = prompt_meta(srv, "victim")
        res.note("generate status while running", codes)
        res.check("new bad files not served (404)", codes["half-task"] == 404 and codes["garbage-task"] == 404,
                  f"half-task {codes['half-task']}, garbage-task {codes['garbage-task']}")
        res.check("truncated task keeps its previous prompt", codes["victim"] == 200
                  and meta_after.get("sha256") == meta.get("sha256"),
                  f"generate {codes['victim']}, sha256 {str(meta_after.get('sha256'))[:12]} vs "
                  f"{str(meta.get('sha256'))[:12]} before")
        res.check("load errors counted once per bad file", total - before == 3, f"+{total - before:g} (want +3)")
        srv.stop()
        srv.start()
        total2, by_reason2 = load_errors(srv)
        codes2 = {t: generate(srv.url, t).status_code for t in ("half-task", "garbage-task", "victim", "topic")}
        res.note("after restart: load_errors", f"{total2:g} (by reason {by_reason2}); generate status {codes2}")
        res.check("after restart the bad files are skipped (404) and the good task serves",
                  all(codes2[t] == 404 for t in ("half-task", "garbage-task", "victim")) and codes2["topic"] == 200,
                  str(codes2))
        res.check("after restart the bad files are counted", total2 == 3, f"{total2:g} (want 3)")
    return res


# --------------------------------------------------------------------------------------------- CLI
def scenarios() -> dict:
    """Scenario name -> function(env) -> :class:`Result`."""
    from .faults_inflight import disconnects, replace_delete_inflight, sigterm_drain

    return {"kill9_upload": kill9_upload, "corrupt_file": corrupt_file,
            "replace_delete_inflight": replace_delete_inflight, "disconnects": disconnects,
            "sigterm_drain": sigterm_drain}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; returns the exit status (0: every target met)."""
    table = scenarios()
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(table), help="run only this scenario (repeatable)")
    ap.add_argument("--server-tree", type=Path, help="run the server from this source tree (default: this checkout)")
    ap.add_argument("--workdir", type=Path, help="prompt directories and server logs (default: a new temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="softprompt-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = Env(workdir, a.server_tree, a.seed)
    print(f"work directory (prompt dirs, server logs): {workdir}", flush=True)
    results = []
    for name in a.only or list(table):
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            res = table[name](env)
        except Exception as exc:  # a scenario that cannot run is a failed scenario, the others still run
            res = Result(name)
            res.check("scenario ran", False, f"{type(exc).__name__}: {str(exc)[-1500:]}")
        res.figures["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"{'PASS' if res.passed else 'FAIL'} {name} ({res.figures['wall_s']} s; log {workdir / name}.log)",
              flush=True)
        results.append(res)
    if a.out:
        a.out.write_text(json.dumps([r.as_dict() for r in results], indent=2, default=str))
    print("summary: " + ", ".join(f"{r.name} {'PASS' if r.passed else 'FAIL'}" for r in results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
