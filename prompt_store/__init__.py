"""Soft-prompt files: formats, validation, an in-memory registry, and a hot-reloading directory store.

This package never imports :mod:`server`; the server wires its metrics in through callbacks.
"""

from prompt_store.errors import REASONS, PromptError
from prompt_store.formats import (
    TASK_NAME_RE,
    Limits,
    ParsedPrompt,
    load_path,
    parse_peft_config,
    parse_peft_files,
    parse_safetensors_bytes,
    parse_upload,
    validate_embeddings,
    validate_task_name,
)
from prompt_store.registry import PromptRegistry, SoftPrompt, tensor_sha256
from prompt_store.store import PromptStore

__all__ = [
    "REASONS",
    "TASK_NAME_RE",
    "Limits",
    "ParsedPrompt",
    "PromptError",
    "PromptRegistry",
    "PromptStore",
    "SoftPrompt",
    "load_path",
    "parse_peft_config",
    "parse_peft_files",
    "parse_safetensors_bytes",
    "parse_upload",
    "tensor_sha256",
    "validate_embeddings",
    "validate_task_name",
]
