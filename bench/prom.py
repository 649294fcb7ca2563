"""Reading the server's Prometheus ``/metrics``: engine-step counters, batch sizes, resident memory.

Metrics this module reads (each one optional; a missing one becomes ``None`` and the report says ``n/a``):

- ``softprompt_batch_size`` histogram (``_sum`` / ``_count``): rows per engine step;
- ``softprompt_step_seconds_total{kind}`` and ``softprompt_step_tokens_total{kind}`` (or, the same counter
  under the name the engine exports it, ``softprompt_step_positions_total{kind}``) counters, kind in
  ``prefill`` (every row of the step still in prefill), ``decode`` and ``mixed``;
- ``process_resident_memory_bytes`` (prometheus-client's process collector). When the server does not export
  it and runs on this machine, the resident set size is read from ``/proc/PID/status`` instead, the PID being
  given (``--server-pid``) or found as the process listening on the server's port.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

BATCH = "softprompt_batch_size"
STEP_SECONDS = "softprompt_step_seconds_total"
STEP_TOKENS = ("softprompt_step_tokens_total", "softprompt_step_positions_total")  # first one present wins
RSS = "process_resident_memory_bytes"
STEP_KINDS = ("prefill", "decode", "mixed")


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition: ``{(name, sorted label pairs): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    """One sample's value (labels matched exactly), or ``None`` when absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def first_value(samples: dict, names: tuple[str, ...], **labels: str) -> float | None:
    """The value of the first of ``names`` present with ``labels``, or ``None``."""
    return next((v for n in names if (v := value(samples, n, **labels)) is not None), None)


def snapshot(samples: dict) -> dict:
    """The figures the bench diffs across a leg."""
    return {
        "batch_sum": value(samples, BATCH + "_sum"),
        "batch_count": value(samples, BATCH + "_count"),
        "step_seconds": {k: value(samples, STEP_SECONDS, kind=k) for k in STEP_KINDS},
        "step_tokens": {k: first_value(samples, STEP_TOKENS, kind=k) for k in STEP_KINDS},
        "rss_bytes": value(samples, RSS),
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _counter_diff(before: dict, after: dict) -> dict:
    """Per-kind increase of a labelled counter. A kind first seen after the leg started was 0 before (a
    labelled counter appears on first use) when the counter itself existed before; with no sample of it at all
    before or after, the increase is unknown (``None``)."""
    known = any(v is not None for v in before.values()) or any(v is not None for v in after.values())
    out = {}
    for k in STEP_KINDS:
        b, a = before.get(k), after.get(k)
        out[k] = (a - (b or 0.0)) if a is not None else (0.0 if known else None)
    return out


def leg_delta(before: dict, after: dict) -> dict:
    """Engine figures over one leg: steps, mean rows per step, and seconds / tokens per step kind."""
    steps = _diff(before["batch_count"], after["batch_count"])
    rows = _diff(before["batch_sum"], after["batch_sum"])
    return {
        "engine_steps": steps,
        "mean_rows_per_step": rows / steps if steps else None,
        "step_seconds": _counter_diff(before["step_seconds"], after["step_seconds"]),
        "step_tokens": _counter_diff(before["step_tokens"], after["step_tokens"]),
    }


# --------------------------------------------------------------------------------------- resident memory
def proc_rss_bytes(pid: int) -> int | None:
    """VmRSS of a local process (bytes), or ``None`` if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    return inodes


def find_local_server_pid(url: str) -> int | None:
    """The PID of the process listening on ``url``'s port when the host is this machine, else ``None``."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(pid_dir.name)
        except OSError:
            continue
    return None


class RssReader:
    """Resident memory of the server: from ``/metrics`` when exported, else from ``/proc`` for a local PID."""

    def __init__(self, server_url: str, pid: int | None = None) -> None:
        self.server_url = server_url
        self.pid = pid
        self._looked_up = pid is not None

    def read(self, samples: dict) -> tuple[int | None, str]:
        """(bytes or None, source): source is ``metrics``, ``/proc/PID`` or ``n/a``."""
        v = value(samples, RSS)
        if v is not None:
            return int(v), "metrics"
        if not self._looked_up:
            self.pid = find_local_server_pid(self.server_url)
            self._looked_up = True
        if self.pid is not None and (rss := proc_rss_bytes(self.pid)) is not None:
            return rss, f"/proc/{self.pid}"
        return None, "n/a"
