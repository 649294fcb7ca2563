"""Real ``softprompt serve`` processes on loopback for the reliability harnesses (``bench.loadtest``,
``bench.faults``), plus the small pure helpers they share: reading ``/metrics``, checking ``Retry-After``,
and target lines.

A :class:`ServerProcess` runs in its own process group (so that every child goes with it), writes its stdout and
stderr to a log file, and is always stopped on exit of its ``with`` block (SIGTERM, then SIGKILL of the group).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from . import prom

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "prompts"
ADMIN_TOKEN = "bench-admin-token"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_prompts(dst: Path, names: list[str]) -> Path:
    """Copy the example prompts ``names`` (PEFT adapter directories of ``examples/prompts``) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(EXAMPLES / name, dst / name)
    return dst


def raw_prompt_bytes(example: str) -> bytes:
    """A RAW prompt (one-tensor safetensors file, key ``prompt_embeddings``) made from an example adapter's
    tensor: what ``PUT /v1/admin/prompts/{task}`` accepts as a ``.safetensors`` upload."""
    from safetensors.numpy import load_file, save

    tensors = load_file(str(EXAMPLES / example / "adapter_model.safetensors"))
    (tensor,) = tensors.values()
    return save({"prompt_embeddings": tensor})


# --------------------------------------------------------------------------------------------- checks
def retry_after_ok(value: str | None) -> bool:
    """True when a ``Retry-After`` header value is a positive integer number of seconds (``"1"``, ``"30"``)."""
    if value is None:
        return False
    v = value.strip()
    return v.isdigit() and int(v) > 0


def metric_sum(samples: dict, name: str, **labels: str) -> float | None:
    """Sum of every sample named ``name`` whose labels include ``labels``; ``None`` when no sample matches."""
    want = set(labels.items())
    vals = [v for (n, lab), v in samples.items() if n == name and want <= set(lab)]
    return sum(vals) if vals else None


def count_by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    """Sum of the samples named ``name`` grouped by the value of ``label`` (e.g. ``softprompt_requests_total`` by
    ``status``)."""
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        if n == name:
            key = dict(lab).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def target_line(name: str, ok: bool, detail: str) -> str:
    """One ``PASS``/``FAIL`` line of a target."""
    return f"{'PASS' if ok else 'FAIL'}  {name}: {detail}"


# --------------------------------------------------------------------------------------------- processes
class ServerProcess:
    """``softprompt serve`` on 127.0.0.1 in its own process group, logging to ``log_path`` (appended).

    Args:
        prompts: the prompt directory (``--prompts``).
        log_path: file that receives the server's stdout and stderr (appended across restarts).
        args: extra ``softprompt serve`` flags.
        port: the port (default: a free one, kept across restarts).
        tree: the source tree whose ``server`` code runs (default: this checkout); e.g. a ``git archive`` of a
            known-good commit, to tell a harness problem from a server change in progress.
    """

    def __init__(self, prompts: Path, log_path: Path, args: list[str] | None = None, port: int | None = None,
                 tree: Path | None = None):
        self.prompts = prompts
        self.log_path = log_path
        self.args = list(args or [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self.tree = Path(tree or REPO).resolve()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, ready_timeout: float = 180.0) -> float:
        """Start the server and wait for ``GET /ready`` = 200; returns the seconds that took.

        Raises:
            RuntimeError: the process exited, or was not ready within ``ready_timeout`` s (the log's tail in
                the message).
        """
        cmd = [sys.executable, "-m", "softprompt_cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--prompts", str(self.prompts), "--admin-token", ADMIN_TOKEN, *self.args]
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            env = {**os.environ, "PYTHONPATH": str(self.tree)}
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.tree, env=env)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > ready_timeout:
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill9(self) -> None:
        """SIGKILL the server's process group and reap it."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def sigterm(self) -> None:
        """Send SIGTERM to the server process only (its own shutdown handling), without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the group; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.sigterm()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        self._signal_group(signal.SIGKILL)  # stray children of the group, if any
        return self.proc.returncode

    def metrics(self, timeout: float = 10.0) -> dict:
        """The parsed ``/metrics`` samples (see :func:`bench.prom.parse`)."""
        r = httpx.get(self.url + "/metrics", timeout=timeout)
        r.raise_for_status()
        return prom.parse(r.text)

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process, bytes: ``process_resident_memory_bytes``, else VmRSS."""
        try:
            v = prom.value(self.metrics(), prom.RSS)
        except httpx.HTTPError:
            v = None
        if v is not None:
            return int(v)
        return prom.proc_rss_bytes(self.pid) if self.pid else None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
