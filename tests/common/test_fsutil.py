"""Atomic writes: all-or-nothing, and the permissions a plain write would give."""

import os
from pathlib import Path

import pytest

from common.fsutil import (
    TMP_PREFIX,
    NotOwnedError,
    OutputBusyError,
    atomic_dir,
    atomic_file,
    atomic_files,
    claim_output,
    stale_temporaries,
)


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


# ---- claims, ownership and temporaries ----------------------------------------------------------


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_replaces_only_what_the_owner_test_recognises(tmp_path):
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "kept.txt").write_text("the user's")
    with (
        pytest.raises(NotOwnedError, match=r"userdata exists and is not a recipe written by dgq"),
        atomic_dir(user, overwrite=True, owned=lambda p: False, what="recipe") as d,
    ):
        (d / "x").write_text("1")
    assert (user / "kept.txt").read_text() == "the user's" and _names(tmp_path) == ["userdata"]
    with atomic_dir(user, overwrite=True, owned=lambda p: (p / "kept.txt").is_file()) as d:
        (d / "x").write_text("1")
    assert _names(user) == ["x"] and _names(tmp_path) == ["userdata"]


def test_replacing_a_file_with_a_folder_leaves_no_old_copy(tmp_path):
    (tmp_path / "out").write_text("a file")
    with atomic_dir(tmp_path / "out", overwrite=True) as d:
        (d / "x").write_text("1")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["x"]


def test_temporaries_live_beside_the_target_under_one_prefix(tmp_path):
    seen = []
    with atomic_dir(tmp_path / "out") as d:
        seen += _names(tmp_path)
        with atomic_file(d / "f.json", "w") as f:
            seen += [f"out/{n}" for n in _names(d)]
            f.write("{}")
    assert len(seen) == 4 and all(n.removeprefix("out/").startswith(TMP_PREFIX) for n in seen), seen
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["f.json"]


def test_a_claim_removes_stale_temporaries_it_owns_and_only_those(tmp_path):
    mine = [tmp_path / f"{TMP_PREFIX}out.abcd1234", tmp_path / f"{TMP_PREFIX}out.lock"]
    others = [tmp_path / f"{TMP_PREFIX}out.b.abcd1234", tmp_path / f"{TMP_PREFIX}out.abcd1234x", tmp_path / "keep"]
    mine[0].mkdir()
    (mine[0] / "half.onnx").write_bytes(b"x" * 10)
    mine[1].write_text("")  # a lock file left by a killed run: reused, then removed
    for p in others:
        p.write_text("")
    assert stale_temporaries(tmp_path / "out") == [mine[0]]
    with atomic_file(tmp_path / "out", "w") as f:
        f.write("new")
    assert _names(tmp_path) == sorted(["out", *(p.name for p in others)])


_HOLDER = """
import sys, time
from common.fsutil import claim_output
with claim_output(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_process_cannot_claim_a_held_output(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(OutputBusyError, match=r"out is being written by another process"),
            atomic_file(out, "w") as f,
        ):
            f.write("second")
        assert not out.exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    with atomic_file(out, "w") as f:  # released: the claim is free again, and the lock file is gone
        f.write("second")
    assert _names(tmp_path) == ["out"] and out.read_text() == "second"


def test_claims_nest_within_one_process(tmp_path):
    with claim_output(tmp_path / "out") as held, atomic_dir(tmp_path / "out") as d:
        assert held == tmp_path / "out"
        (d / "x").write_text("1")
    assert _names(tmp_path) == ["out"]
