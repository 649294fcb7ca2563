"""Atomic, fsynced writes of prompt entries into a prompt directory (used by :class:`PromptStore`).

Readers that list the directory while a write is in progress see either the old entry or the new one, never a
half-written file under a task's name: new content is written under a dot-name (``.<task>.tmp-<16 hex>``),
which the store ignores, fsynced, and renamed into place. Callers hold the store lock.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

import safetensors.torch

from prompt_store.formats import PEFT_CONFIG, PEFT_KEY, PEFT_PICKLE, PEFT_WEIGHTS, ParsedPrompt

RAW_SUFFIX = ".safetensors"
#: Names of this module's temporary entries; :meth:`PromptStore.scan` removes leftovers matching it.
OWN_TEMP_RE = re.compile(r"\.[a-z0-9][a-z0-9_.-]{0,63}\.(tmp|old)-[0-9a-f]{16}")  # used with fullmatch


def _temp_name(task: str, kind: str) -> str:
    return f".{task}.{kind}-{secrets.token_hex(8)}"


def signature(path: Path) -> tuple | None:
    """Cheap change detector for an entry: (mtime ns, size, inode) of the file, or of a PEFT dir's files.

    Returns ``None`` when the path does not exist (symlinks are followed).
    """
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    parts: list[tuple] = [("", st.st_mtime_ns, st.st_ino)]
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PICKLE):
        try:
            s = (path / name).stat()
        except OSError:
            continue
        parts.append((name, s.st_mtime_ns, s.st_size, s.st_ino))
    return tuple(parts)


def write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it.

    Raises:
        OSError: ``FileExistsError`` if the path exists, or any write error.
    """
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and unlinks inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_entry(path: Path) -> None:
    """Remove a file, a symlink or a directory tree; a tree is first renamed to a dot-name, then deleted."""
    if path.is_dir() and not path.is_symlink():
        doomed = path
        if not path.name.startswith("."):
            doomed = path.with_name(_temp_name(path.name, "old"))
            os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def write_raw(directory: Path, task: str, data: bytes) -> Path:
    """Write RAW safetensors bytes to ``<directory>/<task>.safetensors`` atomically; remove ``<task>/``.

    Returns:
        The final path.

    Raises:
        OSError: the write failed; the previous entry is untouched and the temporary file removed.
    """
    final = directory / f"{task}{RAW_SUFFIX}"
    tmp = directory / _temp_name(task, "tmp")
    try:
        write_file(tmp, data)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.path.lexists(directory / task):
        remove_entry(directory / task)
    return final


def write_peft(directory: Path, task: str, parsed: ParsedPrompt) -> Path:
    """Write a PEFT adapter directory ``<directory>/<task>/`` atomically; remove ``<task>.safetensors``.

    Writes ``adapter_config.json`` (``parsed.config``) and ``adapter_model.safetensors`` re-serialized from
    ``parsed.embeddings`` (key ``prompt_embeddings``, metadata ``{"format": "pt"}``, as PEFT 0.21 writes it)
    into ``.<task>.tmp-<hex>/``; then renames an existing ``<task>`` to ``.<task>.old-<hex>``, renames the new
    one into place and deletes the old one.

    Returns:
        The final directory path.

    Raises:
        OSError: the write failed; the previous entry is restored and the temporary directory removed.
    """
    final = directory / task
    tmp = directory / _temp_name(task, "tmp")
    old: Path | None = None
    try:
        tmp.mkdir()
        write_file(tmp / PEFT_CONFIG, json.dumps(parsed.config, indent=2, sort_keys=True).encode() + b"\n")
        weights = safetensors.torch.save({PEFT_KEY: parsed.embeddings}, metadata={"format": "pt"})
        write_file(tmp / PEFT_WEIGHTS, weights)
        fsync_dir(tmp)
        if os.path.lexists(final):
            old = directory / _temp_name(task, "old")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        remove_entry(old)
    (directory / f"{task}{RAW_SUFFIX}").unlink(missing_ok=True)
    return final
