"""Sending a workload's requests over HTTP: closed loop (at most N in flight) or open loop (timed arrivals),
and reading Server-Sent Events. Shared by the server leg and the vLLM leg."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from .stats import RequestRecord
from .workload import Workload


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def announce(scenario: str, system: str, what: str) -> float:
    """Print the start of a leg with the load average (other work on the machine skews every figure)."""
    load1 = load_average()
    print(f"[{scenario}] {system}: {what}; load average {load1:.2f} of {os.cpu_count()} CPUs", flush=True)
    return load1


async def sse_events(resp: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` of each ``data:`` line of an SSE stream; ``event`` is ``message`` unless an
    ``event:`` line set it for the current event."""
    event = "message"
    async for line in resp.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()
        elif not line.strip():
            event = "message"


def client(base_url: str, connections: int, timeout: float,
           transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """An async client with a connection pool of ``connections`` (``transport``: for tests)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, limits=limits, transport=transport)


async def drive(workload: Workload, send: Callable[[int], Awaitable[RequestRecord]]) -> tuple[list, float]:
    """Send every request of ``workload`` through ``send(j)``; returns (records in request order, wall s).

    Closed loop: at most ``workload.concurrency`` in flight. Open loop (``workload.arrivals``): request ``j``
    starts ``arrivals[j]`` s after the start (still capped by the concurrency, set it high). A ``send`` that
    raises becomes a failed record (status 599) instead of ending the leg.
    """
    sem = asyncio.Semaphore(workload.concurrency)
    t0 = time.perf_counter()

    async def one(j: int) -> RequestRecord:
        if workload.arrivals is not None:
            await asyncio.sleep(max(0.0, t0 + workload.arrivals[j] - time.perf_counter()))
        async with sem:
            start = time.perf_counter()
            try:
                return await send(j)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                return RequestRecord(599, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")

    records = await asyncio.gather(*(one(j) for j in range(workload.num_requests)))
    return list(records), time.perf_counter() - t0
