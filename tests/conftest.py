"""Fixtures shared by the server tests: the tiny and the real model, soft prompts, and an app client.

Helpers that tests import (references, engine drivers, prompt makers) live in ``tests/server/srv_helpers.py``;
this file puts that folder on ``sys.path`` so the import works whatever pytest's import mode is.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
# tests/server and tests/prompt_store have no __init__.py. pytest's default (prepend) import mode puts tests/ on
# sys.path for this file; when the repository root is not on sys.path too (e.g. `.venv/bin/pytest`), those
# folders would then shadow the real `server` / `prompt_store` packages as namespace packages. Put the root first.
sys.path.insert(0, str(_TESTS.parent))
sys.path.append(str(_TESTS / "server"))  # for `import srv_helpers`

from srv_helpers import (  # noqa: E402
    EOS_ID,
    TINY_CONTEXT,
    TINY_HIDDEN,
    build_tiny_model,
    make_prompt,
    make_settings,
    wrap_loaded,
)

from server.config import Settings  # noqa: E402
from server.model_loader import LoadedModel, convert_gguf, default_gguf_path, load_model  # noqa: E402

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The cached safetensors conversion of the default SmolLM2 GGUF (about 40 s the first time)."""
    return convert_gguf(default_gguf_path(), Settings().cache_dir)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir: Path):
    """SmolLM2's tokenizer (no BOS added; pad token == EOS token == 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_loaded(smol_tokenizer) -> LoadedModel:
    """A random 2-layer Llama (hidden 64, context 256) with SmolLM2's tokenizer, fp32 on the CPU."""
    model = build_tiny_model(len(smol_tokenizer), seed=0)
    loaded = wrap_loaded(model, smol_tokenizer)
    assert loaded.hidden_size == TINY_HIDDEN and loaded.max_context == TINY_CONTEXT
    return loaded


@pytest.fixture(scope="session")
def tiny_eos_loaded(tiny_loaded: LoadedModel) -> LoadedModel:
    """The tiny model with its LM-head row for EOS (id 2) scaled by 3, so that greedy decoding really emits EOS
    after a few steps for some inputs (tests find such inputs by computing references, never by hard-coding)."""
    import copy

    model = copy.deepcopy(tiny_loaded.model)
    model.lm_head.weight[EOS_ID] *= 3.0
    return wrap_loaded(model, tiny_loaded.tokenizer)


@pytest.fixture(scope="session")
def smol_loaded(smol_dir: Path) -> LoadedModel:
    """The real SmolLM2-135M-Instruct, fp32 on the CPU."""
    return load_model(None, cache_dir=Settings().cache_dir, device="cpu", dtype="float32")


@pytest.fixture
def prompt_factory() -> Callable[..., object]:
    """``make(task, tensor)`` -> a registered :class:`prompt_store.registry.SoftPrompt` (fresh registry each)."""
    return make_prompt


@pytest.fixture
def rand_prompt() -> Callable[..., object]:
    """``make(task, n, scale=1.0, seed=0, hidden=64)`` -> SoftPrompt of ``n`` random virtual tokens."""

    def make(task: str, n: int, scale: float = 1.0, seed: int = 0, hidden: int = TINY_HIDDEN):
        g = torch.Generator().manual_seed(seed)
        return make_prompt(task, torch.randn(n, hidden, generator=g) * scale)

    return make


def app_settings(prompts: Path | None, **overrides) -> Settings:
    """Settings for a test app: watched prompt directory, admin token ADMIN_TOKEN (see ``make_settings``)."""
    return make_settings(prompts, **{"watch": True, "admin_token": ADMIN_TOKEN, **overrides})


@pytest.fixture
def prompts_dir(tmp_path: Path) -> Path:
    d = tmp_path / "prompts"
    d.mkdir()
    return d


@pytest.fixture
def make_client(tiny_loaded: LoadedModel, prompts_dir: Path) -> Iterator[Callable[..., object]]:
    """``make(loaded=None, prompts=<prompts_dir>, **settings)`` -> a started ``TestClient`` (lifespan run);
    every client is closed (engine and watcher stopped) at the end of the test."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with contextlib.ExitStack() as stack:

        def make(loaded: LoadedModel | None = None, prompts: Path | None | str = "default", **overrides):
            settings = app_settings(prompts_dir if prompts == "default" else prompts, **overrides)
            app = create_app(settings, loaded=loaded or tiny_loaded)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def client(make_client):
    """A started app on the tiny model, an empty watched prompt directory and admin token ADMIN_TOKEN."""
    return make_client()


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
