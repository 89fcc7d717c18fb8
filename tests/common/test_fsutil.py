"""Atomic writes: all-or-nothing, and the permissions a plain write would give."""

import os

import pytest

from common.fsutil import atomic_dir, atomic_file, atomic_files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_and_dir_get_umask_permissions(tmp_path):
    with atomic_file(tmp_path / "a.json", "w") as f:
        f.write("{}")
    with atomic_dir(tmp_path / "folder") as d:
        (d / "x").write_text("1")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json", "w") as f:
        f.write("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder") as d:
        (d / "x").write_text("1")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_write_the_group_with_umask_permissions(tmp_path):
    files = {tmp_path / "a.engine": b"plan", tmp_path / "a.engine.json": b"{}"}
    old = os.umask(0o027)  # not the usual 022, so a fixed 0o644 would show
    try:
        atomic_files(files)
    finally:
        os.umask(old)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a.engine": b"plan", "a.engine.json": b"{}"}
    assert [p.stat().st_mode & 0o777 for p in files] == [0o640, 0o640]


def test_atomic_files_failure_leaves_no_file_of_the_group(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        if len(renamed) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_files({tmp_path / "a.engine": b"plan", tmp_path / "a.engine.json": b"{}"})
    assert renamed == ["a.engine.json", "a.engine"]  # the first file goes in last
    assert list(tmp_path.iterdir()) == []  # the renamed metadata and both temporaries are gone
