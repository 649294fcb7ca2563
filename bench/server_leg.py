"""The softprompt server over HTTP: preflight, task upload / delete through the admin API, the streamed load.

Tasks are uploaded as ``bench-00000``, ``bench-00001``, ... (``PUT /v1/admin/prompts/{task}``, a one-tensor
safetensors file), with at most ``upload_concurrency`` uploads in flight, and deleted the same way when a
scenario ends. Requests are ``POST /v1/tasks/{task}/generate`` with ``"stream": true`` and greedy decoding, so
that time to first token (TTFT) is measured per request, client-side, as the time to the first Server-Sent
Event; latency is the time to the last.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

from . import prom
from .driver import announce, client, drive, sse_events
from .stats import LegResult, RequestRecord
from .workload import PromptBank, Workload, task_name


class BenchError(RuntimeError):
    """A refusal with a message for the user (server unreachable, bad token, failed upload)."""


def _error_message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text


def preflight(server: str, admin_token: str) -> None:
    """Refuse early (before the model loads) if the server is unreachable, not ready, or refuses the token."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    try:
        with httpx.Client(base_url=server.rstrip("/"), timeout=10) as cli:
            r = cli.get("/ready")
            if r.status_code != 200:
                raise BenchError(f"server {server} is not ready: GET /ready -> {r.status_code} {r.text}")
            r = cli.get("/v1/admin/prompts", headers=auth)
    except httpx.HTTPError as exc:
        raise BenchError(f"server {server} is not reachable ({exc!r}); start it with "
                         "`softprompt serve --admin-token TOKEN --port PORT --prompts DIR` (or --memory-prompts "
                         "instead of --prompts: the bench uploads its tasks)") from exc
    if r.status_code in (401, 403):
        raise BenchError(f"admin access refused ({r.status_code}): {_error_message(r)}; "
                         "pass the server's --admin-token")


class ServerTarget:
    """A running softprompt server and the bench tasks uploaded to it (indices into a :class:`PromptBank`)."""

    def __init__(self, url: str, admin_token: str, bank: PromptBank, *, timeout: float,
                 upload_concurrency: int = 8, server_pid: int | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.auth = {"Authorization": f"Bearer {admin_token}"}
        self.bank = bank
        self.timeout = timeout
        self.upload_concurrency = upload_concurrency
        self.uploaded: set[int] = set()
        self.rss = prom.RssReader(self.url, server_pid)
        self.transport = transport  # tests inject an httpx.MockTransport

    def _client(self, connections: int, timeout: float | None = None) -> httpx.AsyncClient:
        return client(self.url, connections, timeout or self.timeout, self.transport)

    # ------------------------------------------------------------------------------------------- tasks
    async def _upload(self, cli: httpx.AsyncClient, i: int) -> None:
        from safetensors.torch import save

        task = task_name(i)
        files = {"file": (f"{task}.safetensors", save({"prompt_embeddings": self.bank[i]}),
                          "application/octet-stream")}
        r = await cli.put(f"/v1/admin/prompts/{task}", headers=self.auth, files=files)
        if r.status_code not in (200, 201):
            raise BenchError(f"upload of {task} failed: {r.status_code} {_error_message(r)}")
        self.uploaded.add(i)

    async def _bounded(self, fn, items: list[int]) -> None:
        sem = asyncio.Semaphore(self.upload_concurrency)

        async def one(i: int) -> None:
            async with sem:
                await fn(i)

        await asyncio.gather(*(one(i) for i in items))

    async def ensure_tasks(self, num_tasks: int) -> int:
        """Upload tasks ``0..num_tasks-1`` not yet uploaded; returns how many were added."""
        todo = [i for i in range(num_tasks) if i not in self.uploaded]
        if todo:
            async with self._client(self.upload_concurrency + 2) as cli:
                await self._bounded(lambda i: self._upload(cli, i), todo)
        return len(todo)

    async def delete_all(self) -> None:
        """Delete every uploaded bench task (warnings, not errors, for the ones that fail)."""
        async def delete(i: int) -> None:
            try:
                r = await cli.delete(f"/v1/admin/prompts/{task_name(i)}", headers=self.auth)
                if r.status_code not in (200, 204, 404):
                    print(f"warning: delete of {task_name(i)} -> {r.status_code}", file=sys.stderr)
            except httpx.HTTPError as exc:
                print(f"warning: could not delete task {task_name(i)}: {exc!r}", file=sys.stderr)
            self.uploaded.discard(i)

        if self.uploaded:
            async with self._client(self.upload_concurrency + 2) as cli:
                await self._bounded(delete, sorted(self.uploaded))

    # ------------------------------------------------------------------------------------------- metrics
    async def metrics(self) -> dict:
        """The parsed ``/metrics`` samples (empty when unavailable)."""
        try:
            async with self._client(2, 30) as cli:
                r = await cli.get("/metrics")
            return prom.parse(r.text) if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    async def resident_bytes(self) -> tuple[int | None, str]:
        return self.rss.read(await self.metrics())

    # ------------------------------------------------------------------------------------------- load
    async def run(self, workload: Workload, scenario: str, system: str = "server") -> LegResult:
        """Upload the workload's tasks if needed, warm up (one untimed request on the base model, so no task's
        prompt is cached by the warm-up), then send the workload. Engine figures from ``/metrics`` (steps, rows
        per step, step seconds / tokens by kind) go into the result's ``extra``."""
        await self.ensure_tasks(workload.num_tasks)
        params = {"max_new_tokens": workload.max_new_tokens, "temperature": 0.0}
        conns = min(workload.concurrency, workload.num_requests) + 4
        async with self._client(conns) as cli:
            r = await cli.post("/v1/generate", json={"inputs": workload.texts[0], "parameters": params})
            if r.status_code != 200:
                raise BenchError(f"warm-up request failed: {r.status_code} {_error_message(r)}")

            async def send(j: int) -> RequestRecord:
                t0 = time.perf_counter()
                body = {"inputs": workload.texts[j], "parameters": params, "stream": True}
                ttft, parts, final = None, [], None
                url = f"/v1/tasks/{task_name(workload.tasks[j])}/generate"
                async with cli.stream("POST", url, json=body) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        return RequestRecord(resp.status_code, time.perf_counter() - t0,
                                             error=f"HTTP {resp.status_code}: {_error_message(resp)[:200]}")
                    async for event, data in sse_events(resp):
                        if event == "error":
                            return RequestRecord(599, time.perf_counter() - t0, error=f"stream error: {data[:200]}")
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        obj = json.loads(data)
                        parts.append(obj.get("text", ""))
                        if "finish_reason" in obj:
                            final = obj
                lat = time.perf_counter() - t0
                if final is None:
                    return RequestRecord(599, lat, ttft, error="stream ended without a final event")
                return RequestRecord(200, lat, ttft, int(final["usage"]["completion_tokens"]), "".join(parts))

            before = prom.snapshot(await self.metrics())
            load1 = announce(scenario, system, f"{workload.num_requests} requests over {workload.num_tasks} tasks "
                             f"({workload.distribution}), " + ("Poisson arrivals" if workload.arrivals
                                                               else f"concurrency {workload.concurrency}"))
            records, wall = await drive(workload, send)
            after = prom.snapshot(await self.metrics())
        return LegResult(system, records, wall, load1, workload.max_new_tokens,
                         extra={"engine": prom.leg_delta(before, after)})
