"""PEFT adapter directories: ``adapter_config.json`` checks and the ``prompt_embeddings`` tensor.

As written by PEFT 0.21 ``PeftModel.save_pretrained(dir)`` (``safe_serialization=True``, the default):
``adapter_config.json`` plus ``adapter_model.safetensors`` (header metadata ``{"format": "pt"}``) whose one key
``prompt_embeddings`` holds

* PROMPT_TUNING / P_TUNING: ``[num_virtual_tokens * num_transformer_submodules, token_dim]`` input embeddings
  (``num_transformer_submodules`` is 1 for causal LMs; for P_TUNING the prompt encoder's *output*);
* PREFIX_TUNING: ``[num_virtual_tokens, num_layers * 2 * num_key_value_heads * head_dim]``, the per-layer keys and
  values. PEFT saves the *projected* prefix when ``prefix_projection`` is true (the MLP's output, not its
  weights), so both forms are served alike. For grouped-query models PEFT writes the KV head count as
  ``num_attention_heads`` and ``token_dim = num_key_value_heads * head_dim`` (``tests/prompt_store`` checks this
  against PEFT itself).

``adapter_model.bin`` is a pickle and is refused by name, never opened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from prompt_store.errors import PromptError
from prompt_store.tensors import PREFIX_TUNING, Limits, ParsedPrompt, check_size, parse_safetensors_bytes, shape_str

MIB = 1024 * 1024
#: Cap, in bytes, on ``adapter_config.json`` (PEFT writes under 2 KB).
MAX_CONFIG_BYTES: int = 1 * MIB
SUPPORTED_PEFT_TYPES: tuple[str, ...] = ("PROMPT_TUNING", "P_TUNING", PREFIX_TUNING)
PEFT_KEY = "prompt_embeddings"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"


def _config_int(config: dict, name: str) -> int | None:
    value = config.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise PromptError(
            f"adapter_config.json {name} must be an integer, got {value!r}", reason="bad_config"
        )
    return value


def parse_peft_config(data: bytes) -> dict[str, Any]:
    """Parse and check a PEFT 0.21 ``adapter_config.json``; return the whole dict unchanged.

    Requires a JSON object whose ``peft_type`` is one of :data:`SUPPORTED_PEFT_TYPES`; ``task_type``, when
    present and not null, must be ``"CAUSAL_LM"``; ``num_transformer_submodules``, when present and not null,
    must be 1; ``num_virtual_tokens``, ``token_dim``, ``num_layers`` and ``num_attention_heads``, when present,
    must be integers.

    Raises:
        PromptError: ``"empty"`` / ``"too_large"`` (over :data:`MAX_CONFIG_BYTES`), ``"bad_config"`` (not
            UTF-8 JSON, not an object, bad field types), ``"unsupported_peft_type"`` (LORA and the rest: lists
            the supported types; or task_type not CAUSAL_LM).
    """
    check_size(len(data), MAX_CONFIG_BYTES, PEFT_CONFIG)
    try:
        config = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, integers over 4300 digits, deep nesting
        raise PromptError(f"{PEFT_CONFIG} is not valid UTF-8 JSON: {str(exc)[:200]}", reason="bad_config") from exc
    if not isinstance(config, dict):
        raise PromptError(
            f"{PEFT_CONFIG} must be a JSON object, got a JSON {type(config).__name__}", reason="bad_config"
        )
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise PromptError(
            f"peft_type {peft_type!r} is not supported; expected {', '.join(SUPPORTED_PEFT_TYPES)}",
            reason="unsupported_peft_type",
        )
    task_type = config.get("task_type")
    if task_type is not None and task_type != "CAUSAL_LM":
        raise PromptError(
            f"task_type {task_type!r} is not supported; expected 'CAUSAL_LM'", reason="unsupported_peft_type"
        )
    subs = _config_int(config, "num_transformer_submodules")
    if subs is not None and subs != 1:
        raise PromptError(
            f"num_transformer_submodules must be 1 for a causal LM, got {subs}",
            reason="unsupported_peft_type",
        )
    for name in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
        _config_int(config, name)
    return config


def _check_prefix_config(config: dict, limits: Limits) -> None:
    """The config's model shape (``num_layers``, ``num_attention_heads`` = KV heads, ``token_dim`` = KV heads x head
    size; all required) must be the served model's: the tensor's width alone cannot tell 4 layers x 1 KV head from
    2 layers x 2 KV heads."""
    if limits.prefix_width is None:
        raise PromptError("prefix-tuning prompts need the model's KV shape, which this loader was not given",
                          reason="unsupported_peft_type")
    expected = {
        "num_layers": limits.num_layers,
        "num_attention_heads": limits.num_key_value_heads,  # PEFT stores the KV head count here
        "token_dim": limits.num_key_value_heads * limits.head_dim,
    }
    missing = [name for name in expected if config.get(name) is None]
    if missing:
        raise PromptError(
            f"{PEFT_CONFIG} of a PREFIX_TUNING adapter must give {', '.join(missing)} (PEFT writes them); this "
            "model needs " + ", ".join(f"{k}={v}" for k, v in expected.items()),
            reason="bad_config",
        )
    for name, want in expected.items():
        got = _config_int(config, name)
        if got != want:
            raise PromptError(
                f"{PEFT_CONFIG} says {name}={got}, this model needs {name}={want} (num_layers "
                f"{limits.num_layers}, num_key_value_heads {limits.num_key_value_heads}, head_dim "
                f"{limits.head_dim}): the prefix was trained for another model",
                reason="bad_shape",
            )


def parse_peft_files(files: Mapping[str, bytes], limits: Limits) -> ParsedPrompt:
    """Parse the files of a PEFT 0.21 adapter directory into a :class:`ParsedPrompt`.

    Args:
        files: basename -> bytes. Uses ``adapter_config.json`` and ``adapter_model.safetensors`` (key
            ``prompt_embeddings``). ``adapter_model.bin`` only matters by its presence; its bytes are never read.
        limits: see :class:`Limits`; a PREFIX_TUNING adapter needs its KV shape.

    Raises:
        PromptError: ``"pickle_refused"`` (only ``adapter_model.bin`` is there), ``"missing_file"``,
            ``"bad_config"`` (the config's ``num_virtual_tokens`` / ``token_dim`` disagree with the tensor's
            shape, both named; a prefix config without its model shape), ``"bad_shape"`` (a prefix made for
            another model's layers, KV heads or head size), or any reason of :func:`parse_peft_config` /
            :func:`prompt_store.tensors.parse_safetensors_bytes`.
    """
    needs = f"a PEFT adapter directory needs {PEFT_CONFIG} and {PEFT_WEIGHTS}"
    if PEFT_WEIGHTS not in files and PEFT_PICKLE in files:
        raise PromptError(
            f"{PEFT_PICKLE} is a pickle and is never loaded; save with safe_serialization=True ({needs})",
            reason="pickle_refused",
        )
    missing = [name for name in (PEFT_CONFIG, PEFT_WEIGHTS) if name not in files]
    if missing:
        raise PromptError(
            f"{needs}; missing {', '.join(missing)}, found {sorted(files)}", reason="missing_file"
        )
    config = parse_peft_config(files[PEFT_CONFIG])
    prefix = config["peft_type"] == PREFIX_TUNING
    if prefix:
        _check_prefix_config(config, limits)
    t = parse_safetensors_bytes(files[PEFT_WEIGHTS], limits, key=PEFT_KEY, prefix=prefix)
    n_cfg = _config_int(config, "num_virtual_tokens")
    if n_cfg is not None and n_cfg != t.shape[0]:
        raise PromptError(
            f"{PEFT_CONFIG} says num_virtual_tokens={n_cfg}, but {PEFT_KEY} has {t.shape[0]} rows "
            f"(shape {shape_str(t)})",
            reason="bad_config",
        )
    dim_cfg = _config_int(config, "token_dim")
    if not prefix and dim_cfg is not None and dim_cfg != t.shape[1]:
        raise PromptError(
            f"{PEFT_CONFIG} says token_dim={dim_cfg}, but {PEFT_KEY} has width {t.shape[1]} "
            f"(shape {shape_str(t)})",
            reason="bad_config",
        )
    return ParsedPrompt(embeddings=t, peft_type=config["peft_type"], config=config)
