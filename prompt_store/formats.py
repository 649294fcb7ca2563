"""Soft-prompt file formats: what a prompt directory entry or an upload may be, and loading it (never a pickle).

Accepted, each validated against :class:`~prompt_store.tensors.Limits`:

* **RAW**: a single ``.safetensors`` file holding exactly one tensor ``[num_virtual_tokens, hidden_size]`` of
  input embeddings (any key name).
* **PEFT**: a directory as written by PEFT 0.21 ``PeftModel.save_pretrained(dir)`` for PROMPT_TUNING, P_TUNING
  or PREFIX_TUNING (:mod:`prompt_store.peft`). Uploads carry this directory in a zip or tar archive.

``adapter_model.bin`` / ``.pt`` / ``.pth`` / ``.pkl`` are pickles and are refused by name, never opened.
All errors are :class:`prompt_store.errors.PromptError` with a ``reason`` code. The tensor checks live in
:mod:`prompt_store.tensors`, the PEFT ones in :mod:`prompt_store.peft`; both are re-exported here.
"""

from __future__ import annotations

import re
from pathlib import Path

from prompt_store.archive import read_adapter_archive
from prompt_store.errors import PromptError
from prompt_store.peft import (
    MAX_CONFIG_BYTES,
    PEFT_CONFIG,
    PEFT_KEY,
    PEFT_PICKLE,
    PEFT_WEIGHTS,
    SUPPORTED_PEFT_TYPES,
    parse_peft_config,
    parse_peft_files,
)
from prompt_store.tensors import (
    ALLOWED_DTYPES,
    MIB,
    PREFIX_TUNING,
    Limits,
    ParsedPrompt,
    check_size,
    parse_safetensors_bytes,
    validate_embeddings,
)

TASK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # used with fullmatch: no trailing newline slips in
#: File name suffixes of pickle formats; refused without being read.
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".pkl")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".zip", ".tar.gz", ".tgz", ".tar")
ACCEPTED_UPLOADS = (
    ".safetensors (one tensor), or .zip / .tar.gz / .tgz / .tar holding a PEFT adapter directory"
)
#: Extra bytes an archive may hold beyond ``Limits.max_bytes``, for the config and README next to the tensor.
ARCHIVE_SLACK_BYTES: int = 2 * MIB

__all__ = [
    "ACCEPTED_UPLOADS", "ALLOWED_DTYPES", "ARCHIVE_SLACK_BYTES", "ARCHIVE_SUFFIXES", "MAX_CONFIG_BYTES", "MIB",
    "PEFT_CONFIG", "PEFT_KEY", "PEFT_PICKLE", "PEFT_WEIGHTS", "PICKLE_SUFFIXES", "PREFIX_TUNING",
    "SUPPORTED_PEFT_TYPES", "TASK_NAME_RE", "Limits", "ParsedPrompt", "load_path", "parse_peft_config",
    "parse_peft_files", "parse_safetensors_bytes", "parse_upload", "validate_embeddings", "validate_task_name",
]


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise.

    A task name matches :data:`TASK_NAME_RE` (``^[a-z0-9][a-z0-9_.-]{0,63}$``: 1 to 64 characters, lower case,
    no ``/``, cannot start with ``.``, so ``"."``, ``".."`` and ``"../x"`` are refused) and must not end with
    ``.safetensors`` (that suffix marks the raw file form in the prompt directory).

    Raises:
        PromptError: reason ``"bad_name"``, naming the pattern and the given name.
    """
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name) or name.endswith(".safetensors"):
        raise PromptError(
            f"task name must match {TASK_NAME_RE.pattern} and not end with '.safetensors'; got {name!r}",
            reason="bad_name",
        )
    return name


def _read_capped(path: Path, cap: int) -> bytes:
    """Read a file after checking its size by ``stat``; re-check while reading in case it grew."""
    check_size(path.stat().st_size, cap, str(path))
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    check_size(len(data), cap, str(path))
    return data


def load_path(path: Path, limits: Limits) -> ParsedPrompt:
    """Load a soft prompt from disk: a RAW ``.safetensors`` file or a PEFT adapter directory.

    Sizes are checked with ``stat`` before any read (``limits.max_bytes`` for tensors,
    :data:`MAX_CONFIG_BYTES` for the config). Symlinks are followed.

    Raises:
        PromptError: ``"missing_file"`` (path absent), ``"pickle_refused"`` (``.bin`` / ``.pt`` / ``.pth`` /
            ``.pkl``), ``"bad_kind"`` (any other file), or any reason of :func:`parse_safetensors_bytes` /
            :func:`parse_peft_files`.
        OSError: when the file system fails while reading (e.g. permissions).
    """
    path = Path(path)
    if path.is_dir():
        files: dict[str, bytes] = {}
        if (path / PEFT_PICKLE).exists():
            files[PEFT_PICKLE] = b""  # presence marker only: the pickle is never opened
        if (path / PEFT_CONFIG).is_file():
            files[PEFT_CONFIG] = _read_capped(path / PEFT_CONFIG, MAX_CONFIG_BYTES)
        if (path / PEFT_WEIGHTS).is_file():
            files[PEFT_WEIGHTS] = _read_capped(path / PEFT_WEIGHTS, limits.max_bytes)
        return parse_peft_files(files, limits)
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise PromptError(
            f"{path} is a pickle file and is never loaded; expected a .safetensors file or a PEFT adapter "
            "directory saved with safe_serialization=True",
            reason="pickle_refused",
        )
    if not path.exists():
        raise PromptError(f"{path} does not exist", reason="missing_file")
    if not path.is_file() or not name.endswith(".safetensors"):
        raise PromptError(f"{path} is not a .safetensors file or a PEFT adapter directory", reason="bad_kind")
    t = parse_safetensors_bytes(_read_capped(path, limits.max_bytes), limits)
    return ParsedPrompt(embeddings=t, peft_type="RAW", config=None)


def parse_upload(filename: str, data: bytes, limits: Limits) -> ParsedPrompt:
    """Parse an uploaded soft prompt; the kind is told by ``filename``'s extension (case-insensitive).

    * ``.safetensors``: RAW, exactly one tensor ``[num_virtual_tokens, hidden_size]``.
    * ``.zip`` / ``.tar.gz`` / ``.tgz`` / ``.tar``: an archive holding a PEFT adapter directory, at the root
      or inside exactly one top-level folder (see :func:`prompt_store.archive.read_adapter_archive`); its
      uncompressed adapter files may total ``limits.max_bytes + ARCHIVE_SLACK_BYTES``.
    * ``.bin`` / ``.pt`` / ``.pth`` / ``.pkl``: refused as pickles.

    Raises:
        PromptError: ``"empty"`` (zero bytes, checked first), ``"too_large"``, ``"pickle_refused"``,
            ``"bad_kind"`` (other extensions; names the accepted kinds), ``"bad_archive"``, or any reason of
            :func:`parse_safetensors_bytes` / :func:`parse_peft_files`.
    """
    name = (filename or "").lower()
    if len(data) == 0:
        raise PromptError(f"upload {filename!r} is empty: expected 1 or more bytes, got 0", reason="empty")
    if name.endswith(".safetensors"):
        return ParsedPrompt(embeddings=parse_safetensors_bytes(data, limits), peft_type="RAW", config=None)
    if name.endswith(ARCHIVE_SUFFIXES):
        cap = limits.max_bytes + ARCHIVE_SLACK_BYTES
        check_size(len(data), cap, f"upload {filename!r}")
        return parse_peft_files(read_adapter_archive(filename, data, cap), limits)
    if name.endswith(PICKLE_SUFFIXES):
        raise PromptError(
            f"upload {filename!r} is a pickle file and is never loaded; expected {ACCEPTED_UPLOADS}",
            reason="pickle_refused",
        )
    raise PromptError(
        f"upload {filename!r} is of an unaccepted kind; expected {ACCEPTED_UPLOADS}", reason="bad_kind"
    )
