"""Uploaded archives: layout rules, unsafe members and zip/gzip bombs (case C7)."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest
import torch

from prompt_store.archive import read_adapter_archive
from prompt_store.errors import PromptError
from prompt_store.formats import Limits, parse_upload

MIB = 1024 * 1024


def refused(reason: str, fn, *args) -> str:
    with pytest.raises(PromptError) as info:
        fn(*args)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


def test_zip_at_root_and_in_one_folder(limits, peft_files, make_zip):
    t = torch.randn(8, 64)
    files = peft_files(t)
    for prefix in ("", "my-task/"):
        members = {prefix + k: v for k, v in files.items()}
        members[prefix + "README.md"] = b"# card"
        members[prefix + "notes.txt"] = b"ignored"
        data = make_zip(members)
        got = read_adapter_archive("a.zip", data, MIB)
        assert set(got) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert got["adapter_config.json"] == files["adapter_config.json"]
        assert torch.equal(parse_upload("A.ZIP", data, limits).embeddings, t)


def test_tar_gz_tgz_and_plain_tar(limits, peft_files, make_tar):
    t = torch.randn(8, 64)
    members = {"x/" + k: v for k, v in peft_files(t).items()}
    for name, gz in (("a.tar.gz", True), ("a.tgz", True), ("a.tar", False)):
        assert torch.equal(parse_upload(name, make_tar(members, gz=gz), limits).embeddings, t)


def test_macosx_tree_is_ignored(limits, peft_files, make_zip):
    t = torch.randn(2, 64)
    members = {"task/" + k: v for k, v in peft_files(t).items()}
    members["__MACOSX/task/._adapter_config.json"] = b"\x00\x05\x16\x07"
    assert torch.equal(parse_upload("a.zip", make_zip(members), limits).embeddings, t)


def test_archive_without_adapter_config(limits, peft_files, make_zip):
    files = peft_files(torch.randn(8, 64))
    del files["adapter_config.json"]
    msg = refused("missing_file", parse_upload, "a.zip", make_zip(files), limits)
    assert "adapter_config.json" in msg and "adapter_model.safetensors" in msg


def test_archive_with_only_a_pickle(limits, make_zip):
    data = make_zip(
        {"adapter_config.json": b'{"peft_type": "PROMPT_TUNING"}', "adapter_model.bin": b"\x80\x04"}
    )
    refused("pickle_refused", parse_upload, "a.zip", data, limits)


@pytest.mark.parametrize(
    "name",
    [
        "../evil/adapter_config.json",
        "a/../../adapter_config.json",
        "/etc/adapter_config.json",
        "C:/x/adapter_config.json",
        "..\\adapter_config.json",
    ],
)
def test_zip_unsafe_paths(make_zip, name):
    msg = refused("bad_archive", read_adapter_archive, "a.zip", make_zip({name: b"{}"}), MIB)
    assert repr(name) in msg


def test_zip_symlink_member():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("adapter_model.safetensors")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert "symlink" in refused("bad_archive", read_adapter_archive, "a.zip", buf.getvalue(), MIB)


def test_zip_device_member():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = (stat.S_IFCHR | 0o600) << 16
        zf.writestr(info, "{}")
    assert "only regular files" in refused("bad_archive", read_adapter_archive, "a.zip", buf.getvalue(), MIB)


def _tar_with(info: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.addfile(info)
    return buf.getvalue()


def test_tar_symlink_hardlink_and_device():
    sym = tarfile.TarInfo("task/adapter_model.safetensors")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    msg = refused("bad_archive", read_adapter_archive, "a.tgz", _tar_with(sym), MIB)
    assert "symlink" in msg and "/etc/passwd" in msg
    hard = tarfile.TarInfo("adapter_config.json")
    hard.type, hard.linkname = tarfile.LNKTYPE, "other"
    assert "hard link" in refused("bad_archive", read_adapter_archive, "a.tar.gz", _tar_with(hard), MIB)
    dev = tarfile.TarInfo("adapter_config.json")
    dev.type = tarfile.CHRTYPE
    assert "not a regular file" in refused("bad_archive", read_adapter_archive, "a.tgz", _tar_with(dev), MIB)


def test_tar_unsafe_path(make_tar):
    data = make_tar({"../../evil/adapter_config.json": b"{}"})
    assert "'..'" in refused("bad_archive", read_adapter_archive, "a.tgz", data, MIB)


def test_nesting_and_several_folders(make_zip, make_tar):
    msg = refused(
        "bad_archive", read_adapter_archive, "a.zip", make_zip({"a/b/adapter_config.json": b"{}"}), MIB
    )
    assert "nested 2 folders deep" in msg
    data = make_zip({"a/adapter_config.json": b"{}", "b/adapter_model.safetensors": b"x"})
    assert "2 top-level folders" in refused("bad_archive", read_adapter_archive, "a.zip", data, MIB)
    data = make_tar({"adapter_config.json": b"{}", "a/adapter_config.json": b"{}"})
    assert "twice" in refused("bad_archive", read_adapter_archive, "a.tgz", data, MIB)


def test_zip_bomb_declared_size_is_refused_before_reading(make_zip):
    data = make_zip({"adapter_model.safetensors": bytes(20 * MIB)})  # 20 MiB of zeros, ~20 KB compressed
    assert len(data) < 100_000
    msg = refused("too_large", read_adapter_archive, "a.zip", data, 1 * MIB)
    assert str(20 * MIB) in msg and str(MIB) in msg


def test_zip_with_lying_sizes_is_refused(make_zip):
    data = bytearray(make_zip({"adapter_model.safetensors": bytes(2 * MIB)}))
    # Rewrite the declared uncompressed size (local header offset 22, central directory offset 24) to 100.
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 22 : local + 26] = (100).to_bytes(4, "little")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")
    with pytest.raises(PromptError) as info:
        read_adapter_archive("a.zip", bytes(data), 1 * MIB)
    assert info.value.reason in ("bad_archive", "too_large")


def test_gzip_tar_bomb(make_tar):
    data = make_tar({"adapter_model.safetensors": bytes(20 * MIB)})
    assert len(data) < 100_000
    msg = refused("too_large", read_adapter_archive, "a.tar.gz", data, 1 * MIB)
    assert "expands to more than" in msg


def test_upload_archive_too_large_compressed(make_zip):
    small = Limits(hidden_size=64, max_bytes=1000)
    refused("too_large", parse_upload, "a.zip", bytes(4 * MIB), small)


def test_corrupt_archives(make_tar):
    refused("bad_archive", read_adapter_archive, "a.zip", b"PK\x03\x04 this is not a zip", MIB)
    refused("bad_archive", read_adapter_archive, "a.tgz", make_tar({"adapter_config.json": b"{}"})[:40], MIB)
    refused("bad_archive", read_adapter_archive, "a.tar", b"\x01" * 1024, MIB)
    refused("bad_archive", read_adapter_archive, "a.rar", b"Rar!", MIB)
