"""Read a PEFT adapter directory out of an uploaded zip or tar archive, in memory and defensively.

Nothing is ever extracted to disk: the archive is opened from :class:`io.BytesIO` with the standard library's
:mod:`zipfile` / :mod:`tarfile`, and only the few files a PEFT 0.21 ``save_pretrained`` directory holds
are read into memory (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``), plus
``adapter_model.bin`` so that the caller can refuse it by name (its bytes are never unpickled).

Layout accepted: those files at the archive root, or inside exactly one top-level folder (what
``zip -r task.zip task/`` or ``tar czf task.tgz task/`` make). Deeper nesting, absolute paths, ``..``
components, symlinks, hard links, devices, FIFOs and sparse members are refused with reason ``"bad_archive"``.
macOS ``__MACOSX/`` resource-fork trees are ignored.

Bomb safety: the sum of the *declared* uncompressed sizes of the kept files is checked against ``max_bytes``
before anything is decompressed, and bytes are counted again while reading, so a lying header cannot get past
the cap. A gzip-compressed tar is first decompressed with a hard output cap.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
import zlib

from prompt_store.errors import PromptError

#: Basenames read out of an archive. Everything else (at an allowed depth) is skipped unread.
KEPT_FILES: frozenset[str] = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}
)
#: An archive with more members than this is refused (a PEFT adapter directory has three).
MAX_MEMBERS: int = 1000
#: Bytes allowed in a tar stream beyond ``max_bytes``, for its 512-byte headers and padding.
TAR_OVERHEAD_BYTES: int = 64 * 1024
_CHUNK = 1 << 16


def _bad(message: str) -> PromptError:
    return PromptError(message, reason="bad_archive")


def _split_member_name(name: str) -> list[str]:
    """Split an archive member name into its path components, refusing unsafe names.

    Raises:
        PromptError: reason ``"bad_archive"`` for absolute paths, drive letters and ``..`` components.
    """
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) >= 2 and normalized[1] == ":"):
        raise _bad(f"archive member {name!r} has an absolute path; expected a relative path")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _bad(f"archive member {name!r} contains a '..' component; expected a path inside the archive")
    return parts


class _Collector:
    """Decide which members to keep, and enforce the one-folder layout and the byte cap."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.kept: dict[str, tuple[str, object]] = {}  # basename -> (folder, member handle)
        self.folders: set[str] = set()
        self.declared = 0

    def offer(self, name: str, size: int, handle: object) -> None:
        parts = _split_member_name(name)
        if not parts or parts[0] == "__MACOSX":
            return
        if len(parts) > 2:
            raise _bad(
                f"archive member {name!r} is nested {len(parts) - 1} folders deep; "
                "expected the adapter files at the root or inside exactly one top-level folder"
            )
        folder = parts[0] if len(parts) == 2 else ""
        if folder:
            self.folders.add(folder)
        base = parts[-1]
        if base not in KEPT_FILES:
            return
        if base in self.kept:
            raise _bad(
                f"archive holds {base} twice (in {self.kept[base][0] or '<root>'!r} and "
                f"{folder or '<root>'!r}); expected one adapter directory"
            )
        self.declared += size
        if self.declared > self.max_bytes:
            raise PromptError(
                f"archive declares {self.declared} uncompressed bytes in its adapter files; "
                f"the limit is {self.max_bytes} bytes",
                reason="too_large",
            )
        self.kept[base] = (folder, handle)

    def check_layout(self) -> None:
        if len(self.folders) > 1:
            raise _bad(
                f"archive has {len(self.folders)} top-level folders {sorted(self.folders)}; "
                "expected the adapter files at the root or inside exactly one top-level folder"
            )
        locations = {folder for folder, _ in self.kept.values()}
        if len(locations) > 1:
            raise _bad(
                "archive has adapter files both at the root and inside a folder; expected one location"
            )

    def read_all(self, open_member) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        total = 0
        for base, (_, handle) in self.kept.items():
            buf = bytearray()
            with open_member(handle) as stream:
                while True:
                    chunk = stream.read(_CHUNK)
                    if not chunk:
                        break
                    buf += chunk
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise PromptError(
                            f"archive adapter files expand to more than {self.max_bytes} bytes "
                            f"(read {total} so far, more than their headers declared)",
                            reason="too_large",
                        )
            out[base] = bytes(buf)
        return out


def _read_zip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _bad(f"archive has {len(infos)} members; the limit is {MAX_MEMBERS}")
        collector = _Collector(max_bytes)
        for info in infos:
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise _bad(f"archive member {info.filename!r} is a symlink; only regular files are accepted")
            if info.is_dir():
                _split_member_name(info.filename)
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type bits (e.g. Windows zips)
                raise _bad(
                    f"archive member {info.filename!r} has file mode {oct(mode)}; "
                    "only regular files are accepted"
                )
            collector.offer(info.filename, info.file_size, info)
        collector.check_layout()
        return collector.read_all(zf.open)


def _gunzip_capped(data: bytes, cap: int) -> bytes:
    """Decompress (possibly multi-member) gzip ``data``, refusing output over ``cap`` bytes."""
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits=31)
        out += d.decompress(rest, cap + 1 - len(out))
        if len(out) > cap or d.unconsumed_tail:
            raise PromptError(
                f"compressed tar expands to more than {cap} bytes; the limit is {cap} bytes",
                reason="too_large",
            )
        if not d.eof:
            raise _bad("gzip stream is truncated")
        rest = d.unused_data
        if rest and not rest.lstrip(b"\x00"):
            break  # trailing zero padding after the last member
    return bytes(out)


def _read_tar(data: bytes, max_bytes: int) -> dict[str, bytes]:
    cap = max_bytes + TAR_OVERHEAD_BYTES
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_capped(data, cap)
    elif len(data) > cap:
        raise PromptError(f"tar archive is {len(data)} bytes; the limit is {cap} bytes", reason="too_large")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = tf.getmembers()
        if len(members) > MAX_MEMBERS:
            raise _bad(f"archive has {len(members)} members; the limit is {MAX_MEMBERS}")
        collector = _Collector(max_bytes)
        for m in members:
            if m.isdir():
                _split_member_name(m.name)
                continue
            if m.issym() or m.islnk():
                raise _bad(
                    f"archive member {m.name!r} is a {'symlink' if m.issym() else 'hard link'} to "
                    f"{m.linkname!r}; only regular files are accepted"
                )
            if not m.isreg() or m.issparse():
                raise _bad(f"archive member {m.name!r} is not a regular file (tar type {m.type!r})")
            collector.offer(m.name, m.size, m)
        collector.check_layout()

        def open_member(member: tarfile.TarInfo):
            stream = tf.extractfile(member)
            if stream is None:  # pragma: no cover - regular members always have a stream
                raise _bad(f"archive member {member.name!r} cannot be read")
            return stream

        return collector.read_all(open_member)


def read_adapter_archive(filename: str, data: bytes, max_bytes: int) -> dict[str, bytes]:
    """Return the PEFT adapter files held by an uploaded archive, as ``{basename: bytes}``.

    Args:
        filename: the upload's file name; its extension picks the format: ``.zip``, or ``.tar.gz`` /
            ``.tgz`` / ``.tar`` (a gzip magic number is also detected for tars).
        data: the whole archive, in memory.
        max_bytes: cap, in bytes, on the total uncompressed size of the kept files (and, for a tar, on the
            decompressed tar stream plus :data:`TAR_OVERHEAD_BYTES`).

    Returns:
        A dict whose keys are a subset of :data:`KEPT_FILES` (basenames, folder stripped). It may lack
        ``adapter_config.json``; the caller (:func:`prompt_store.formats.parse_peft_files`) reports that.

    Raises:
        PromptError: reason ``"bad_archive"`` for corrupt archives, unsafe member paths or types, nesting
            deeper than one folder, several top-level folders, duplicate adapter files or an unknown
            extension; ``"too_large"`` when declared or actual uncompressed bytes exceed ``max_bytes``.
    """
    lower = filename.lower()
    try:
        if lower.endswith(".zip"):
            return _read_zip(data, max_bytes)
        if lower.endswith((".tar.gz", ".tgz", ".tar")):
            return _read_tar(data, max_bytes)
    except PromptError:
        raise
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
        ValueError,
    ) as exc:
        raise _bad(f"{filename!r} is not a readable archive: {type(exc).__name__}: {exc}") from exc
    raise _bad(f"archive name {filename!r} must end with .zip, .tar.gz, .tgz or .tar")
