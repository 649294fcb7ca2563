"""``softprompt serve`` as a process: the engine loop on the main thread, HTTP on another; a clean SIGTERM exit, a
SIGTERM drain with a request in flight and a separate admin listener, and exit 1 when the port is taken. Uses the
default model (installed by ``make test``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

SERVE = [sys.executable, "-m", "softprompt_cli", "serve", "--host", "127.0.0.1", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--kv-cache-bytes", str(16 * 1024**2), "--prompt-kv-cache-bytes", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, token: str = "") -> subprocess.Popen:
    """``softprompt serve`` with ``args``, its output to the file ``log`` (a pipe nobody reads could fill up and
    block the server)."""
    with open(log, "wb") as out:
        return subprocess.Popen([*SERVE, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "SOFTPROMPT_ADMIN_TOKEN": token})


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.5)


def test_serve_answers_then_exits_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    proc = _start(["--port", str(port)], log)
    try:
        _wait_ready(proc, port, log)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=60,
                       json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_drains_a_stream_and_admin_has_its_own_listener(tmp_path):
    port, admin_port = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    proc = _start(["--port", str(port), "--admin-port", str(admin_port), "--drain-timeout", "1",
                   "--prompts", str(prompts)], log, token="t0k")
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": "Bearer t0k"}
    events: list = []

    def stream() -> None:
        body = {"inputs": "Count from 1 to 500: 1, 2, 3, 4, 5,", "stream": True, "parameters": {"max_new_tokens": 300}}
        with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=60) as r:
            events.extend(json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:"))

    try:
        _wait_ready(proc, port, log)
        assert httpx.get(f"{base}/v1/admin/prompts", headers=auth).status_code == 404
        assert httpx.get(f"{admin}/v1/admin/prompts", headers=auth).json() == {"prompts": [], "total_bytes": 0}
        assert httpx.get(f"{admin}/ready").status_code == 200
        reader = threading.Thread(target=stream)
        reader.start()
        end = time.monotonic() + 60
        while not events:
            assert time.monotonic() < end, "no token streamed"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 503
        r = httpx.post(f"{base}/v1/generate", json={"inputs": "Hi"}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and r.headers["retry-after"]
        reader.join(30)
        assert events[-1]["finish_reason"] == "shutdown"  # cut by the 1 s drain timeout, told why
        assert 0 < events[-1]["usage"]["completion_tokens"] < 300
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_exits_1_when_the_port_is_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([*SERVE, "--port", str(port)], capture_output=True, timeout=180,
                              env={**os.environ, "SOFTPROMPT_ADMIN_TOKEN": ""})
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    assert b"address already in use" in proc.stderr.lower() or b"errno 98" in proc.stderr.lower()


def test_serve_exits_1_when_the_prompt_store_is_unreachable(tmp_path):
    """A start-up that fails (here: an S3 endpoint nobody listens on) ends the process with 1, not a loop that
    nothing can reach (Kubernetes then restarts it instead of waiting out the startup probe)."""
    env = {**os.environ, "SOFTPROMPT_ADMIN_TOKEN": "", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([*SERVE, "--port", str(_free_port()), "--prompts", "s3://nowhere/prompts"],
                          capture_output=True, timeout=180, env=env)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, out[-2000:]
    assert "startup failed" in out.lower() and time.monotonic() - t0 < 120
