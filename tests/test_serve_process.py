"""``softprompt serve`` as a process: the engine loop on the main thread, HTTP on another; a clean SIGTERM exit,
and exit 1 when the port is taken. Uses the default model (installed by ``make test``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

SERVE = [sys.executable, "-m", "softprompt_cli", "serve", "--host", "127.0.0.1", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--kv-cache-bytes", str(16 * 1024**2), "--prompt-kv-cache-bytes", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_exits_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([*SERVE, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "SOFTPROMPT_ADMIN_TOKEN": ""})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=60,
                       json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
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
