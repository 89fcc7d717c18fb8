"""Atomic writes: all-or-nothing, and the permissions a plain write would give."""

import os

import pytest

from dgq.fsutil import atomic_dir, atomic_file


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
