"""Fixtures of the training tests: a fresh tiny model per test (PEFT wraps it while training), data files, and
a greedy reference that never calls PEFT ``generate`` (design notes, section 2)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from srv_helpers import build_tiny_model, wrap_loaded  # tests/conftest.py puts tests/server on sys.path

from server.model_loader import LoadedModel


@pytest.fixture
def fresh_tiny(smol_tokenizer) -> LoadedModel:
    """A new random 2-layer Llama (hidden 64, context 256, seed 0) with SmolLM2's tokenizer, fp32, CPU."""
    return wrap_loaded(build_tiny_model(len(smol_tokenizer), seed=0), smol_tokenizer)


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """``write(rows, name="data.jsonl")``: rows are dicts (dumped as JSON) or raw strings (written as is)."""

    def write(rows: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return write


@pytest.fixture
def km_data(write_jsonl) -> Path:
    """48 rows ``{"input": "<n> km", "output": "<n>000 m"}``."""
    return write_jsonl([{"input": f"{n} km", "output": f"{n}000 m"} for n in range(3, 51)], "km.jsonl")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests run tiny models, where one intra-op thread is as fast as two on an idle machine and many times
    faster on a busy one (oversubscribed threads spin); the previous count is restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
