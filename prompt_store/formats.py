"""Soft-prompt file formats: parsing and validation, with no pickle ever loaded.

Two forms are accepted, both holding one tensor of shape ``[num_virtual_tokens, hidden_size]``:

* **RAW**: a single ``.safetensors`` file holding exactly one tensor (any key name).
* **PEFT**: a directory as written by PEFT 0.21 ``PeftModel.save_pretrained(dir)`` for PROMPT_TUNING or
  P_TUNING: ``adapter_config.json`` plus ``adapter_model.safetensors`` (header metadata ``{"format": "pt"}``)
  whose one key ``prompt_embeddings`` has shape
  ``[num_virtual_tokens * num_transformer_submodules, token_dim]`` (``num_transformer_submodules`` is 1 for
  causal LMs). For P_TUNING that tensor is the prompt encoder's
  *output*, served exactly like prompt tuning. Uploads carry this directory in a zip or tar archive.

``adapter_model.bin`` / ``.pt`` / ``.pth`` / ``.pkl`` are pickles and are refused by name, never opened.
All errors are :class:`prompt_store.errors.PromptError` with a ``reason`` code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from prompt_store.archive import read_adapter_archive
from prompt_store.errors import PromptError

MIB = 1024 * 1024
TASK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # used with fullmatch: no trailing newline slips in
#: File name suffixes of pickle formats; refused without being read.
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".pkl")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".zip", ".tar.gz", ".tgz", ".tar")
ACCEPTED_UPLOADS = (
    ".safetensors (one tensor), or .zip / .tar.gz / .tgz / .tar holding a PEFT adapter directory"
)
#: Cap, in bytes, on ``adapter_config.json`` (PEFT writes under 2 KB).
MAX_CONFIG_BYTES: int = 1 * MIB
#: Extra bytes an archive may hold beyond ``Limits.max_bytes``, for the config and README next to the tensor.
ARCHIVE_SLACK_BYTES: int = 2 * MIB
ALLOWED_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
SUPPORTED_PEFT_TYPES: tuple[str, ...] = ("PROMPT_TUNING", "P_TUNING")
PEFT_KEY = "prompt_embeddings"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"


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


@dataclass(frozen=True)
class Limits:
    """What a soft prompt must fit: the served model's width and the size caps.

    Attributes:
        hidden_size: the model's embedding width; every prompt must be ``[n, hidden_size]``.
        max_virtual_tokens: the largest ``n`` (number of virtual tokens) accepted.
        max_bytes: cap, in bytes, on a safetensors file or upload (16 MiB by default).
        model_dtype: the served model's dtype, or None. When given, values must also stay finite once cast to
            it (an fp32 value of 1e5 is finite but is inf in float16, and would turn every logit NaN).
    """

    hidden_size: int
    max_virtual_tokens: int = 128
    max_bytes: int = 16 * MIB
    model_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for field in ("hidden_size", "max_virtual_tokens", "max_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{field} must be a positive int; got {value!r}")


@dataclass(frozen=True)
class ParsedPrompt:
    """A validated soft prompt, not yet registered.

    Attributes:
        embeddings: ``[num_virtual_tokens, hidden_size]``, CPU, contiguous, dtype as stored
            (float16 / bfloat16 / float32), owning its memory.
        peft_type: ``"PROMPT_TUNING"``, ``"P_TUNING"`` (PEFT directory) or ``"RAW"`` (one safetensors file).
        config: the parsed ``adapter_config.json`` for PEFT, ``None`` for RAW.
    """

    embeddings: torch.Tensor
    peft_type: str
    config: dict | None = None

    @property
    def num_virtual_tokens(self) -> int:
        """Number of virtual tokens, ``embeddings.shape[0]``."""
        return int(self.embeddings.shape[0])


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def validate_embeddings(t: torch.Tensor, limits: Limits) -> torch.Tensor:
    """Check a prompt tensor against ``limits`` and return it as a contiguous CPU tensor.

    Checks, in order: a :class:`torch.Tensor`; exactly 2-D ``[num_virtual_tokens, hidden_size]``; dtype
    float16, bfloat16 or float32 (kept as is); width ``== limits.hidden_size``;
    ``1 <= n <= limits.max_virtual_tokens``; every value finite.

    Returns:
        The tensor detached, on CPU and contiguous (the same object when it already is).

    Raises:
        PromptError: ``"bad_kind"`` (not a tensor), ``"bad_shape"`` (message names the expected ``[n, H]`` and
            the actual shape, e.g. ``expected shape [n, 576], got [8, 640]``), ``"bad_dtype"``,
            ``"non_finite"`` (message gives the NaN and inf counts).
    """
    if not isinstance(t, torch.Tensor):
        raise PromptError(f"expected a torch.Tensor, got {type(t).__name__}", reason="bad_kind")
    hidden, max_n = limits.hidden_size, limits.max_virtual_tokens
    if t.ndim != 2:
        raise PromptError(
            f"expected a 2-D tensor [num_virtual_tokens, hidden_size] = [n, {hidden}], "
            f"got a {t.ndim}-D tensor of shape {_shape(t)}",
            reason="bad_shape",
        )
    if t.dtype not in ALLOWED_DTYPES:
        raise PromptError(
            f"expected dtype float16, bfloat16 or float32, got {str(t.dtype).removeprefix('torch.')}",
            reason="bad_dtype",
        )
    if t.shape[1] != hidden:
        raise PromptError(
            f"expected shape [n, {hidden}], got {_shape(t)}: the prompt was made for a model with hidden "
            f"size {t.shape[1]}, this model's is {hidden}",
            reason="bad_shape",
        )
    if not 1 <= t.shape[0] <= max_n:
        raise PromptError(
            f"expected 1 to {max_n} virtual tokens, got {t.shape[0]} (shape {_shape(t)})", reason="bad_shape"
        )
    t = t.detach().to("cpu").contiguous()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise PromptError(
            f"expected all values finite, got {n_nan} NaN and {n_inf} inf among {t.numel()} values "
            f"(shape {_shape(t)})",
            reason="non_finite",
        )
    if limits.model_dtype is not None and limits.model_dtype != t.dtype:
        n_over = int((~torch.isfinite(t.to(limits.model_dtype))).sum())
        if n_over:
            raise PromptError(
                f"expected values that fit the model's dtype {str(limits.model_dtype).removeprefix('torch.')}, "
                f"got {n_over} values that overflow it (max |value| {float(t.abs().max()):.3g})",
                reason="non_finite",
            )
    return t


def _check_size(nbytes: int, cap: int, what: str) -> None:
    if nbytes == 0:
        raise PromptError(f"{what} is empty: expected 1 to {cap} bytes, got 0", reason="empty")
    if nbytes > cap:
        raise PromptError(f"{what} is {nbytes} bytes; the limit is {cap} bytes", reason="too_large")


def parse_safetensors_bytes(data: bytes, limits: Limits, *, key: str | None = None) -> torch.Tensor:
    """Parse safetensors bytes into one validated prompt tensor ``[num_virtual_tokens, hidden_size]``.

    Args:
        data: the whole file (safetensors format: 8-byte header length, JSON header, raw little-endian data).
        limits: see :class:`Limits`; ``len(data)`` is checked against ``limits.max_bytes`` first.
        key: ``None`` for the RAW form, which must hold exactly one tensor under any key; for PEFT,
            ``"prompt_embeddings"``, which must exist (other keys are ignored).

    Returns:
        A CPU tensor owning its memory, checked by :func:`validate_embeddings`.

    Raises:
        PromptError: ``"empty"``, ``"too_large"`` (names both byte counts), ``"bad_safetensors"`` (unparsable,
            wrong tensor count or missing key, listing the keys found), or any reason of
            :func:`validate_embeddings`.
    """
    _check_size(len(data), limits.max_bytes, "safetensors data")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as exc:  # the Rust parser raises SafetensorError; unknown dtypes raise others
        raise PromptError(f"not a valid safetensors file: {exc}", reason="bad_safetensors") from exc
    if key is None:
        if len(tensors) != 1:
            raise PromptError(
                f"expected exactly 1 tensor in a raw prompt file, got {len(tensors)} "
                f"(keys {sorted(tensors)})",
                reason="bad_safetensors",
            )
        (t,) = tensors.values()
    else:
        if key not in tensors:
            raise PromptError(
                f"expected tensor key {key!r} in the safetensors file, found keys {sorted(tensors)}",
                reason="bad_safetensors",
            )
        t = tensors[key]
    return validate_embeddings(t, limits).clone()


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

    Requires a JSON object whose ``peft_type`` is ``"PROMPT_TUNING"`` or ``"P_TUNING"``; ``task_type``, when
    present and not null, must be ``"CAUSAL_LM"``; ``num_transformer_submodules``, when present and not null,
    must be 1; ``num_virtual_tokens`` / ``token_dim``, when present, must be integers.

    Raises:
        PromptError: ``"empty"`` / ``"too_large"`` (over :data:`MAX_CONFIG_BYTES`), ``"bad_config"`` (not
            UTF-8 JSON, not an object, bad field types), ``"unsupported_peft_type"`` (PREFIX_TUNING: "not
            supported yet"; LORA and the rest: lists the supported types; or task_type not CAUSAL_LM).
    """
    _check_size(len(data), MAX_CONFIG_BYTES, PEFT_CONFIG)
    try:
        config = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"{PEFT_CONFIG} is not valid UTF-8 JSON: {exc}", reason="bad_config") from exc
    if not isinstance(config, dict):
        raise PromptError(
            f"{PEFT_CONFIG} must be a JSON object, got a JSON {type(config).__name__}", reason="bad_config"
        )
    peft_type = config.get("peft_type")
    supported = " or ".join(SUPPORTED_PEFT_TYPES)
    if peft_type == "PREFIX_TUNING":
        raise PromptError(
            "peft_type PREFIX_TUNING is not supported yet (prompt tuning and p-tuning are); "
            f"expected {supported}",
            reason="unsupported_peft_type",
        )
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise PromptError(
            f"peft_type {peft_type!r} is not supported; expected {supported}", reason="unsupported_peft_type"
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
    _config_int(config, "num_virtual_tokens")
    _config_int(config, "token_dim")
    return config


def parse_peft_files(files: Mapping[str, bytes], limits: Limits) -> ParsedPrompt:
    """Parse the files of a PEFT 0.21 adapter directory into a :class:`ParsedPrompt`.

    Args:
        files: basename -> bytes. Uses ``adapter_config.json`` and ``adapter_model.safetensors`` (key
            ``prompt_embeddings``, ``[num_virtual_tokens, token_dim]``). ``adapter_model.bin`` only matters by
            its presence; its bytes are never read.
        limits: see :class:`Limits`.

    Raises:
        PromptError: ``"pickle_refused"`` (only ``adapter_model.bin`` is there), ``"missing_file"``,
            ``"bad_config"`` (the config's ``num_virtual_tokens`` / ``token_dim`` disagree with the tensor's
            shape; both named), or any reason of :func:`parse_peft_config` / :func:`parse_safetensors_bytes`.
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
    t = parse_safetensors_bytes(files[PEFT_WEIGHTS], limits, key=PEFT_KEY)
    n_cfg = _config_int(config, "num_virtual_tokens")
    if n_cfg is not None and n_cfg != t.shape[0]:
        raise PromptError(
            f"{PEFT_CONFIG} says num_virtual_tokens={n_cfg}, but {PEFT_KEY} has {t.shape[0]} rows "
            f"(shape {_shape(t)})",
            reason="bad_config",
        )
    dim_cfg = _config_int(config, "token_dim")
    if dim_cfg is not None and dim_cfg != t.shape[1]:
        raise PromptError(
            f"{PEFT_CONFIG} says token_dim={dim_cfg}, but {PEFT_KEY} has width {t.shape[1]} "
            f"(shape {_shape(t)})",
            reason="bad_config",
        )
    return ParsedPrompt(embeddings=t, peft_type=config["peft_type"], config=config)


def _read_capped(path: Path, cap: int) -> bytes:
    """Read a file after checking its size by ``stat``; re-check while reading in case it grew."""
    _check_size(path.stat().st_size, cap, str(path))
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    _check_size(len(data), cap, str(path))
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
        _check_size(len(data), cap, f"upload {filename!r}")
        return parse_peft_files(read_adapter_archive(filename, data, cap), limits)
    if name.endswith(PICKLE_SUFFIXES):
        raise PromptError(
            f"upload {filename!r} is a pickle file and is never loaded; expected {ACCEPTED_UPLOADS}",
            reason="pickle_refused",
        )
    raise PromptError(
        f"upload {filename!r} is of an unaccepted kind; expected {ACCEPTED_UPLOADS}", reason="bad_kind"
    )
