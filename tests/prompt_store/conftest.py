"""Fixtures for the prompt_store tests: limits, tensors, archives and real PEFT adapters."""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prompt_store.formats import Limits

HIDDEN = 64


@pytest.fixture
def limits() -> Limits:
    """Limits for the tiny test model: hidden size 64, 2 layers, 2 KV heads of size 16 (prefix width 128), 128
    virtual tokens, 16 MiB."""
    return Limits(hidden_size=HIDDEN, num_layers=2, num_key_value_heads=2, head_dim=HIDDEN // 4)


@pytest.fixture
def raw_bytes() -> Callable[..., bytes]:
    """Return ``make(t, key="prompt")``: a one-tensor safetensors file as bytes."""

    def make(t: torch.Tensor, key: str = "prompt") -> bytes:
        return safetensors.torch.save({key: t.contiguous()})

    return make


@pytest.fixture
def peft_files() -> Callable[..., dict[str, bytes]]:
    """Return ``make(t, **config_overrides)``: {basename: bytes} of a synthetic PEFT PROMPT_TUNING dir."""

    def make(t: torch.Tensor, **overrides) -> dict[str, bytes]:
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": int(t.shape[0]),
            "token_dim": int(t.shape[-1]),
            "num_transformer_submodules": 1,
        }
        config.update(overrides)
        return {
            "adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": safetensors.torch.save(
                {"prompt_embeddings": t.contiguous()}, metadata={"format": "pt"}
            ),
        }

    return make


@pytest.fixture
def make_zip() -> Callable[..., bytes]:
    """Return ``make({member_name: bytes})``: a deflated zip archive as bytes."""

    def make(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    return make


@pytest.fixture
def make_tar() -> Callable[..., bytes]:
    """Return ``make({member_name: bytes}, gz=True)``: a (gzipped) tar archive of regular files as bytes."""

    def make(members: dict[str, bytes], gz: bool = True) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    return make


@pytest.fixture
def wait_for() -> Callable[..., float]:
    """Return ``wait(predicate, timeout=2.0)``: poll every 20 ms; elapsed seconds, or fail at the deadline."""

    def wait(predicate: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> float:
        start = time.monotonic()
        while True:
            if predicate():
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                pytest.fail(f"{what} not reached within {timeout} s")
            time.sleep(0.02)

    return wait


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT 0.21 ``save_pretrained`` directories for a tiny random LlamaForCausalLM (hidden 64).

    Keys: ``"PROMPT_TUNING"`` (8 virtual tokens), ``"P_TUNING"`` (6, MLP encoder), ``"PREFIX_TUNING"`` (5),
    ``"PREFIX_PROJECTION"`` (7, with ``prefix_projection``).
    """
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    configs = {
        "PROMPT_TUNING": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "P_TUNING": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=32),
        "PREFIX_TUNING": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "PREFIX_PROJECTION": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prefix_projection=True,
                                                encoder_hidden_size=24),
    }
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name, pcfg in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 deprecation noise inside peft
            model = get_peft_model(LlamaForCausalLM(cfg), pcfg)
            out[name] = root / name.lower()
            model.save_pretrained(str(out[name]))
    return out
