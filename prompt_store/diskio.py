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
import threading
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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (e.g. ``0o022``), read without changing it where the OS allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting it to ``0o077`` for an instant
    (restrictive, so a file another thread creates meanwhile is never more open than intended) and back.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def plain_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666 & ~umask`` (``0o644`` under umask 022)."""
    return 0o666 & ~current_umask()


def plain_dir_mode() -> int:
    """The mode a plain ``mkdir`` gives a new directory: ``0o777 & ~umask`` (``0o755`` under umask 022). Also the
    mode a linker gives a new executable or shared object (a ``.so`` built into a ``tempfile.mkstemp`` file would
    otherwise keep ``0o711``, not loadable by other users)."""
    return 0o777 & ~current_umask()


def apply_plain_modes(path: Path, *, recursive: bool = True) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it (see :func:`plain_file_mode`).

    For files made by tools that create them private (``tempfile.mkstemp`` / ``mkdtemp``: 0600 / 0700; some
    library writers do the same), so that another user the umask lets in can read them. A directory gets
    :func:`plain_dir_mode` and, with ``recursive``, everything under it its plain mode too. Symlinks are left
    alone (never followed).

    Raises:
        OSError: a ``chmod`` failed (e.g. the path is owned by another user).
    """
    file_mode, dir_mode = plain_file_mode(), plain_dir_mode()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    if not recursive:
        return
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


def write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it. Its mode is a plain ``open``'s:
    ``0o666 & ~umask``.

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


def replace_file(directory: Path, name: str, data: bytes) -> Path:
    """Atomically (re)write ``<directory>/<name>`` with ``data``: temporary file, fsync, rename, directory fsync.

    ``name`` may be a dot-name (``".versions.json"``); the temporary file is ``.<name without its dot>.tmp-<hex>``
    (matched by :data:`OWN_TEMP_RE`, so a crash's leftover is removed by the next scan). Readers see the old
    content or the new, never a mix.

    Returns:
        The final path.

    Raises:
        OSError: the write failed; the previous file is untouched and the temporary file removed.
    """
    final = directory / name
    tmp = directory / _temp_name(name.lstrip("."), "tmp")
    try:
        write_file(tmp, data)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return final


def write_raw(directory: Path, task: str, data: bytes) -> Path:
    """Write RAW safetensors bytes to ``<directory>/<task>.safetensors`` atomically; remove ``<task>/``.

    Returns:
        The final path.

    Raises:
        OSError: the write failed; the previous entry is untouched and the temporary file removed.
    """
    final = replace_file(directory, f"{task}{RAW_SUFFIX}", data)
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
