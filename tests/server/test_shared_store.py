"""Two replicas on one S3 bucket (moto's S3 server on loopback), each a separate app with its own store, registry
and engine on a live uvicorn server: uploads and deletes through one are served, or gone, on the other within
5 s; a corrupt object written straight into the bucket is skipped and counted on both (issue 11, part 3)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import safetensors.torch
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import make_settings

from server.app import create_app

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

TOKEN = "shared-store-admin-token"
BUCKET = "softprompt-shared"
POLL_S = 1.0
CONVERGE_S = 5.0


@pytest.fixture
def s3_url(monkeypatch) -> Iterator[str]:
    """A moto S3 server on a free loopback port, found by botocore through AWS_ENDPOINT_URL; a new, empty bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    bucket = f"{BUCKET}-{uuid.uuid4().hex[:8]}"  # moto keeps its buckets per process, across servers
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    try:
        yield f"s3://{bucket}/replicas"
    finally:
        server.stop()


@pytest.fixture
def replicas(tiny_loaded) -> Iterator:
    """``start(url)`` -> base URL of a fresh app (own settings, store, registry, engine) on a live uvicorn server."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(url: str) -> str:
        settings = make_settings(url, watch=True, admin_token=TOKEN, prompts_poll_interval=POLL_S,
                                 log_level="warning")
        app = create_app(settings, loaded=tiny_loaded)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on", timeout_graceful_shutdown=3))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "replica did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, _ in started:
        server.should_exit = True
    for server, thread in started:
        thread.join(15)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)


def load_errors(http: httpx.Client, base: str, reason: str) -> float:
    text = http.get(f"{base}/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "softprompt_prompt_load_errors"
               for s in fam.samples if s.name.endswith("_total") and s.labels.get("reason") == reason)


def wait_until(predicate, what: str, timeout: float = CONVERGE_S + 1.0) -> float:
    """Seconds until ``predicate()`` held (polled every 20 ms); fails past ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_two_replicas_share_one_bucket(s3_url, replicas, record_property):
    a, b = replicas(s3_url), replicas(s3_url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    t = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    with httpx.Client(timeout=30, headers=auth) as http:
        # upload through A; B serves it (same version) within 5 s
        r = http.put(f"{a}/v1/admin/prompts/shared-qa",
                     files={"file": ("qa.safetensors", safetensors.torch.save({"p": t}))})
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["version"], body["persisted"]) == (1, True)
        upload_s = wait_until(lambda: http.get(f"{b}/v1/admin/prompts/shared-qa").status_code == 200,
                              "B serves A's upload")
        got = http.get(f"{b}/v1/admin/prompts/shared-qa").json()
        assert (got["version"], got["sha256"]) == (1, body["sha256"])
        gen = http.post(f"{b}/v1/tasks/shared-qa/generate",
                        json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert gen.status_code == 200 and gen.json()["usage"]["virtual_tokens"] == 4, gen.text
        # a replacement through B: version 2 on both
        t2 = torch.randn(6, 64, generator=torch.Generator().manual_seed(12))
        r = http.put(f"{b}/v1/admin/prompts/shared-qa",
                     files={"file": ("qa.safetensors", safetensors.torch.save({"p": t2}))})
        assert (r.status_code, r.json()["version"]) == (200, 2)
        wait_until(lambda: http.get(f"{a}/v1/admin/prompts/shared-qa").json().get("version") == 2,
                   "A serves B's replacement")
        # delete through B; A stops serving within 5 s
        assert http.delete(f"{b}/v1/admin/prompts/shared-qa").status_code == 200
        delete_s = wait_until(lambda: http.get(f"{a}/v1/admin/prompts/shared-qa").status_code == 404,
                              "A drops B's delete")
        gone = http.post(f"{a}/v1/tasks/shared-qa/generate", json={"inputs": "hi"})
        assert gone.status_code == 404

        # a corrupt object written straight into the bucket, with a manifest naming it: skipped and counted on
        # both, never served
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        junk = b"\x00 this is not a safetensors file"
        root = s3_url.removeprefix("s3://")
        manifest = (
            '{"format": 1, "task": "broken", "version": 1, "object": "objects/broken/junk.safetensors", '
            f'"object_bytes": {len(junk)}, "object_sha256": "{hashlib.sha256(junk).hexdigest()}", '
            f'"sha256": "{"0" * 64}", "peft_type": "RAW", "written_at": 0}}'
        )
        before = {base: load_errors(http, base, "bad_safetensors") for base in (a, b)}
        fs.pipe_file(f"{root}/objects/broken/junk.safetensors", junk)
        fs.pipe_file(f"{root}/manifests/broken/0000000001.live.json", manifest.encode())
        for base in (a, b):
            wait_until(lambda base=base: load_errors(http, base, "bad_safetensors") == before[base] + 1,
                       f"{base} counts the corrupt object")
            assert http.get(f"{base}/v1/admin/prompts/broken").status_code == 404
        time.sleep(POLL_S * 1.5)  # later polls do not count it again
        assert [load_errors(http, base, "bad_safetensors") for base in (a, b)] == [before[a] + 1, before[b] + 1]

    print(f"\nshared store convergence (poll {POLL_S} s): upload A->B {upload_s:.2f} s, delete B->A {delete_s:.2f} s")
    record_property("upload_convergence_s", round(upload_s, 3))
    record_property("delete_convergence_s", round(delete_s, 3))
    assert upload_s <= CONVERGE_S and delete_s <= CONVERGE_S


def test_bad_url_scheme_is_one_line_error():
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'gs' in 'gs://b/p'; expected a directory path"):
        make_settings("gs://b/p")


def test_memory_url_keeps_the_admin_rules(make_client, admin_headers):
    """A URL store is a persistent store: uploads are accepted (no 409 no_prompt_dir) and reported persisted."""
    import fsspec

    client = make_client(prompts="memory://shared-admin-test/prefix", prompts_poll_interval=0.1)
    try:
        t = torch.randn(3, 64, generator=torch.Generator().manual_seed(13))
        r = client.put("/v1/admin/prompts/mem", headers=admin_headers,
                       files={"file": ("m.safetensors", safetensors.torch.save({"p": t}))})
        assert r.status_code == 201 and r.json()["persisted"] is True, r.text
        assert client.delete("/v1/admin/prompts/mem", headers=admin_headers).json() == {"task": "mem",
                                                                                         "deleted": True}
    finally:
        fsspec.filesystem("memory").rm("/shared-admin-test", recursive=True)


def test_two_serve_processes_share_one_bucket(s3_url, tmp_path):
    """The same convergence check with two real ``softprompt serve`` processes (SmolLM2-135M, hidden size 576)."""
    serve = [sys.executable, "-m", "softprompt_cli", "serve", "--host", "127.0.0.1", "--max-num-seqs", "4",
             "--max-num-batched-tokens", "64", "--kv-cache-bytes", str(16 * 1024**2), "--prompt-kv-cache-bytes", "0",
             "--prompts", s3_url, "--prompts-poll-interval", str(POLL_S), "--log-level", "warning"]
    procs, bases = [], []
    try:
        for name in ("a", "b"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with open(tmp_path / f"{name}.log", "wb") as out:
                procs.append(subprocess.Popen([*serve, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                              env={**os.environ, "SOFTPROMPT_ADMIN_TOKEN": TOKEN}))
            bases.append(f"http://127.0.0.1:{port}")

        def ready(base: str) -> bool:
            try:
                return httpx.get(f"{base}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        for proc, base in zip(procs, bases, strict=True):
            wait_until(lambda base=base, proc=proc: proc.poll() is None and ready(base), f"{base} ready", 180)
        a, b = bases
        t = torch.randn(4, 576, generator=torch.Generator().manual_seed(21))
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            r = http.put(f"{a}/v1/admin/prompts/proc-qa",
                         files={"file": ("qa.safetensors", safetensors.torch.save({"p": t}))})
            assert r.status_code == 201, r.text
            upload_s = wait_until(lambda: http.get(f"{b}/v1/admin/prompts/proc-qa").status_code == 200,
                                  "process B serves A's upload")
            assert http.post(f"{b}/v1/tasks/proc-qa/generate",
                             json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
            assert http.delete(f"{b}/v1/admin/prompts/proc-qa").status_code == 200
            delete_s = wait_until(lambda: http.get(f"{a}/v1/admin/prompts/proc-qa").status_code == 404,
                                  "process A drops B's delete")
        print(f"\ntwo processes (poll {POLL_S} s): upload A->B {upload_s:.2f} s, delete B->A {delete_s:.2f} s")
        assert upload_s <= CONVERGE_S and delete_s <= CONVERGE_S
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_missing_bucket_is_an_error_never_an_empty_store(s3_url, tiny_loaded):
    """A typo in the bucket, or a bucket removed under running replicas, must not read as "no prompts": that would
    make every replica drop every task without a word."""
    import s3fs

    from prompt_store.location import open_store
    from prompt_store.registry import PromptRegistry

    limits = tiny_loaded.prompt_limits(128, 16 * 1024 * 1024)
    missing = open_store("s3://no-such-bucket-here/p", PromptRegistry(), limits, poll_interval=POLL_S)
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        missing.scan()
    errors: list = []
    store = open_store(s3_url, PromptRegistry(), limits, poll_interval=POLL_S,
                       on_error=lambda entry, exc: errors.append(type(exc).__name__))
    t = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    store.upload("qa", "qa.safetensors", safetensors.torch.save({"p": t}))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3_url.removeprefix("s3://").split("/")[0]
    fs.rm(bucket, recursive=True)
    with pytest.raises(FileNotFoundError):
        store.scan()
    assert store.get("qa") is not None and torch.equal(store.get("qa").embeddings, t)  # still served
