"""docker/nginx/softprompt.conf, run for real: nginx in front of two live replicas on the tiny model.

Every test starts its own replicas (uvicorn servers in this process, each with its own prompt directory holding the
same RAW prompts), renders the committed config with their addresses and a free listen port (only the upstream
``server`` lines, ``listen`` and the access-log path change: ``bench.affinity.render_config``), and runs
``nginx -c <conf> -p <tmpdir> -g 'daemon off;'`` as a subprocess (``bench.affinity.Nginx``), so no root is needed.

Checked: every request of one task lands on one replica (each replica's own ``softprompt_requests_total`` by task),
on the replica nginx's ketama ring says, both replicas get tasks; a stream arrives event by event; a 429's
``Retry-After`` passes through and the 429 is not retried on the other replica; when a replica is gone its tasks
fail over (a POST that never reached a replica is retried) and with none left nginx answers 503 in the server's
error shape; the admin API is not proxied; the file also passes ``nginx -t`` inside Debian's stock nginx.conf.

Skipped only when no nginx binary is installed (``make test`` installs Debian's).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from srv_helpers import TINY_HIDDEN, make_settings, rand_tensor, raw_bytes

from bench.affinity import CONF, Nginx, affinity_fraction, ketama_owner, nginx_binary
from server.app import create_app

NGINX = nginx_binary()

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="no nginx binary on PATH or in /usr/sbin (Debian: apt-get install -y nginx; make test "
    "installs it)"
)

ADMIN_TOKEN = "nginx-test-admin-token"
NUM_TASKS = 8
NUM_REQUESTS = 40
REQUESTS_TOTAL = "softprompt_requests_total"


# ----------------------------------------------------------------------------------------------------- processes
@dataclass
class Replica:
    url: str
    addr: str  # host:port, as written in the upstream block
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def engine(self):
        return self.app.state.sp.engine

    def requests_by_task(self, status: str | None = "200") -> Counter:
        """``softprompt_requests_total`` summed by task (only ``status`` when given) from this replica's /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).raise_for_status().text
        out: Counter = Counter()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == REQUESTS_TOTAL and (status is None or s.labels["status"] == status):
                    out[s.labels["task"]] += int(s.value)
        return out

    def gauge(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).raise_for_status().text
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), f"replica {self.addr} did not stop"


@dataclass
class Cluster:
    replicas: list[Replica]
    url: str  # nginx
    access_log: Path
    error_log: Path

    @property
    def servers(self) -> list[str]:
        return [r.addr for r in self.replicas]

    def owner(self, task: str) -> Replica:
        addr = ketama_owner(self.servers, task)
        return next(r for r in self.replicas if r.addr == addr)


def tasks_on_both(servers: list[str], per_replica: int) -> list[str]:
    """``per_replica`` task names the ketama ring puts on each server, interleaved (``task-00``, ``task-01``, ...
    in order): the test then covers both replicas whatever ports they got."""
    picked: dict[str, list[str]] = {s: [] for s in servers}
    for i in range(1000):
        name = f"task-{i:02d}"
        owner = picked[ketama_owner(servers, name)]
        if len(owner) < per_replica:
            owner.append(name)
        if all(len(v) == per_replica for v in picked.values()):
            return [t for pair in zip(*picked.values(), strict=True) for t in pair]
    raise AssertionError("no task split found")


@pytest.fixture
def cluster(tiny_loaded, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``start(tasks, n=2, **settings)`` -> :class:`Cluster`: ``n`` live replicas (each its own prompt directory
    with RAW prompts for ``tasks``, 4 virtual tokens each) behind nginx running the committed config."""
    replicas: list[Replica] = []
    proxies: list[Nginx] = []

    def start(tasks: list[str], n: int = 2, **overrides) -> Cluster:
        mine: list[Replica] = []
        for _ in range(n):
            prompts = tmp_path / f"replica{len(replicas)}"
            prompts.mkdir()
            for j, task in enumerate(tasks):
                (prompts / f"{task}.safetensors").write_bytes(raw_bytes(rand_tensor(4, seed=j, hidden=TINY_HIDDEN)))
            settings = make_settings(prompts, **{"watch": False, "admin_token": ADMIN_TOKEN, "log_level": "warning",
                                                 **overrides})
            app = create_app(settings, loaded=tiny_loaded)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                   lifespan="on", timeout_graceful_shutdown=3))
            thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                      name=f"replica-{port}")
            thread.start()
            replica = Replica(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", app, server, thread)
            replicas.append(replica)
            mine.append(replica)
            deadline = time.monotonic() + 60
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "replica did not start"
                time.sleep(0.02)
            assert httpx.get(replica.url + "/ready", timeout=10).json()["prompts"] == len(tasks)

        proxy = Nginx(tmp_path / f"nginx{len(proxies)}", [r.addr for r in mine])
        proxies.append(proxy)
        proxy.start()
        return Cluster(mine, proxy.url, proxy.access_log, proxy.error_log)

    yield start
    for proxy in proxies:
        proxy.stop()
    for r in replicas:
        r.server.should_exit = True
    for r in replicas:
        r.thread.join(15)


def generate(http: httpx.Client, base: str, task: str, text: str, n: int = 3, **kw) -> httpx.Response:
    return http.post(f"{base}/v1/tasks/{task}/generate",
                     json={"inputs": text, "parameters": {"max_new_tokens": n}, **kw}, timeout=60)


# ----------------------------------------------------------------------------------------------------- tests
def test_every_request_of_a_task_lands_on_one_replica(cluster, record_property):
    # The task names depend on the replicas' ports (the ring is built from their addresses), so start the replicas
    # with a superset of names and pick, from the ring, 4 tasks per replica among them.
    names = [f"task-{i:02d}" for i in range(40)]
    c = cluster(names)
    tasks = tasks_on_both(c.servers, NUM_TASKS // 2)
    assert set(tasks) <= set(names)
    plan = [tasks[i % NUM_TASKS] for i in range(NUM_REQUESTS)]
    with httpx.Client() as http, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda t: generate(http, c.url, t, f"request for {t}"), plan))
    for task, r in zip(plan, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["task"] == task and r.json()["usage"]["completion_tokens"] == 3

    counts = [r.requests_by_task() for r in c.replicas]
    per_task = {t: [cnt[t] for cnt in counts] for t in tasks}
    print("\nrequests per task on (replica 0, replica 1):", per_task)
    sent = Counter(plan)
    for t in tasks:
        assert sum(per_task[t]) == sent[t] == NUM_REQUESTS // NUM_TASKS
        assert sorted(per_task[t]) == [0, sent[t]], f"task {t} split across replicas: {per_task[t]}"
        owner = c.replicas.index(c.owner(t))
        assert per_task[t][owner] == sent[t], f"task {t} not on the replica nginx's ring gives ({c.owner(t).addr})"
    fraction = affinity_fraction(counts, tasks)
    tasks_per_replica = [sum(1 for t in tasks if cnt[t]) for cnt in counts]
    print(f"affinity fraction {fraction:.3f}; tasks per replica {tasks_per_replica}; "
          f"requests per replica {[sum(cnt[t] for t in tasks) for cnt in counts]}")
    record_property("affinity_fraction", fraction)
    assert fraction == 1.0
    assert tasks_per_replica == [NUM_TASKS // 2, NUM_TASKS // 2]
    # nothing but these requests reached the replicas
    assert sum(sum(cnt.values()) for cnt in counts) == NUM_REQUESTS

    # nginx's access log names the same replica for each task
    upstream_of: dict[str, set[str]] = defaultdict(set)
    for line in c.access_log.read_text().splitlines():
        m = re.search(r'task="([^"]*)" upstream=(\S+) upstream_status=(\S+)', line)
        assert m, line
        upstream_of[m.group(1)].add(m.group(2))
        assert m.group(3) == "200", line
    assert {t: upstream_of[t] for t in tasks} == {t: {c.owner(t).addr} for t in tasks}


def test_other_routes_are_balanced_over_both_replicas(cluster):
    c = cluster(["alpha"])
    with httpx.Client() as http:
        listing = http.get(c.url + "/v1/tasks", timeout=10)
        assert listing.status_code == 200 and [t["task"] for t in listing.json()["tasks"]] == ["alpha"]
        for i in range(6):  # one at a time: least_conn with no open request falls back to round robin
            r = http.post(c.url + "/v1/generate", json={"inputs": f"base {i}", "parameters": {"max_new_tokens": 2}},
                          timeout=60)
            assert r.status_code == 200 and r.json()["task"] is None
    per_replica = [r.requests_by_task()["_base"] for r in c.replicas]
    assert sum(per_replica) == 6 and min(per_replica) >= 1, per_replica


def slow_down(monkeypatch, replicas: list[Replica], seconds: float) -> None:
    """Every engine step of ``replicas`` takes ``seconds`` more: one token per ``seconds`` (the tiny model is too
    fast to watch a stream)."""
    for replica in replicas:
        real = replica.engine.runner._forward

        def slow(rows, real=real):
            time.sleep(seconds)
            return real(rows)

        monkeypatch.setattr(replica.engine.runner, "_forward", slow)


def test_a_stream_arrives_event_by_event(cluster, monkeypatch):
    c = cluster(["alpha"])
    slow_down(monkeypatch, c.replicas, 0.06)
    body = {"inputs": "stream me", "parameters": {"max_new_tokens": 12}, "stream": True}

    def events(base: str) -> list[tuple[float, dict]]:
        out = []
        with httpx.Client() as http, http.stream("POST", f"{base}/v1/tasks/alpha/generate", json=body,
                                                 timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            t0 = time.monotonic()
            for line in r.iter_lines():
                if line.startswith("data:"):
                    out.append((time.monotonic() - t0, json.loads(line[5:])))
        return out

    direct = events(c.owner("alpha").url)
    proxied = events(c.url)
    assert [e for _, e in proxied] == [e for _, e in direct]  # the same events, none merged or lost
    assert len(proxied) >= 4 and proxied[-1][1]["usage"]["completion_tokens"] == 12
    times = [t for t, _ in proxied]
    print(f"\nevent arrival times through nginx (s): {[round(t, 2) for t in times]}")
    # Held back by the proxy, they would arrive together at the end; here each arrives as it is generated.
    assert times[-1] - times[0] >= 0.3, times
    assert len({round(t, 2) for t in times}) >= 4, times


def test_a_client_that_leaves_cancels_the_generation_on_the_replica(cluster, monkeypatch):
    c = cluster(["alpha"])
    owner = c.owner("alpha")
    slow_down(monkeypatch, c.replicas, 0.05)  # 200 tokens would take 10 s
    body = {"inputs": "leave early", "parameters": {"max_new_tokens": 200}, "stream": True}
    t0 = time.monotonic()
    with httpx.Client() as http, http.stream("POST", f"{c.url}/v1/tasks/alpha/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # the first event: hang up
    while owner.requests_by_task(status="499")["alpha"] != 1:
        assert time.monotonic() - t0 < 5, "the replica did not see the client leave"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while owner.gauge("softprompt_running_requests") != 0:  # its row is freed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert owner.requests_by_task(status=None) == Counter({"alpha": 1})  # counted once, as 499


def test_429_passes_through_with_retry_after_and_is_not_retried(cluster):
    c = cluster(["alpha"], max_waiting=1)
    owner = c.owner("alpha")
    other = next(r for r in c.replicas if r is not owner)
    engine = owner.engine
    gate, held = threading.Event(), threading.Event()
    real_step = engine.step

    def step():
        plan = real_step()
        if not held.is_set():
            held.set()
            gate.wait(30)
        return plan

    engine.step = step
    results: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        with httpx.Client() as http:
            results[name] = generate(http, c.url, "alpha", name)

    try:
        first = threading.Thread(target=send, args=("first",))
        first.start()
        assert held.wait(30)  # the first request is admitted; the engine is held inside its step
        second = threading.Thread(target=send, args=("second",))
        second.start()
        deadline = time.monotonic() + 10
        while engine._inbox.qsize() != 1:  # the second waits: the queue (max_waiting=1) is full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with httpx.Client() as http:
            r = generate(http, c.url, "alpha", "third")
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"  # the replica's own value (no completion seen yet), passed through
    finally:
        gate.set()
    first.join(60)
    second.join(60)
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert owner.requests_by_task(status=None) == Counter({"alpha": 3})
    assert other.requests_by_task(status=None) == Counter()  # the 429 was not passed on to the other replica


def test_a_replica_down_moves_only_its_tasks_and_none_left_is_a_503(cluster):
    c = cluster([f"task-{i:02d}" for i in range(40)])
    tasks = tasks_on_both(c.servers, 2)
    gone, kept = c.replicas
    gone.stop()
    with httpx.Client() as http:
        for t in tasks:  # POSTs refused by the stopped replica are passed on (nothing was sent), no 502
            r = generate(http, c.url, t, "failover")
            assert r.status_code == 200, r.text
    assert kept.requests_by_task() == Counter({t: 1 for t in tasks})
    kept.stop()
    with httpx.Client() as http:
        r = generate(http, c.url, tasks[0], "nobody home")
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "no_replica" and r.headers["retry-after"] == "5"


def test_admin_api_is_not_proxied(cluster):
    c = cluster(["alpha"])
    with httpx.Client() as http:
        for method in ("GET", "PUT", "DELETE"):
            r = http.request(method, c.url + "/v1/admin/prompts/alpha",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert "--admin-port" in r.json()["error"]["message"]
    assert all(sum(rep.requests_by_task(status=None).values()) == 0 for rep in c.replicas)
    for rep in c.replicas:  # the replicas still have it: only the proxy refused
        assert httpx.get(rep.url + "/v1/admin/prompts/alpha", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                         timeout=10).json()["task"] == "alpha"


@pytest.mark.skipif(not Path("/etc/nginx/nginx.conf").is_file(), reason="no Debian nginx.conf in /etc/nginx")
def test_the_file_passes_nginx_t_inside_debians_stock_config(tmp_path: Path):
    """What docker/nginx/README.md tells an operator to do: the file in conf.d, the default site removed."""
    etc = tmp_path / "etc"
    shutil.copytree("/etc/nginx", etc, symlinks=True)
    (etc / "sites-enabled" / "default").unlink(missing_ok=True)
    shutil.copy(CONF, etc / "conf.d" / "softprompt.conf")
    (tmp_path / "log").mkdir()
    for path in [etc / "nginx.conf", etc / "conf.d" / "softprompt.conf"]:
        text = path.read_text().replace("/etc/nginx", str(etc)).replace("/var/log/nginx", str(tmp_path / "log"))
        path.write_text(text.replace("/run/nginx.pid", str(tmp_path / "nginx.pid")))
    out = subprocess.run([NGINX, "-t", "-c", str(etc / "nginx.conf"), "-p", str(tmp_path), "-e",
                          str(tmp_path / "log" / "error.log")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    problems = [line for line in out.stderr.splitlines()
                if re.search(r"\[(warn|emerg|alert|crit)\]", line) and '"user" directive' not in line]
    assert not problems, out.stderr
