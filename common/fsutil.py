"""Atomic file, folder and file-group writes: a failed or interrupted job leaves nothing half-written.

New files and folders get the permissions a plain ``open``/``mkdir`` would give under the process umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path


def check_writable_parent(path: Path) -> None:
    """Raise a clear error when ``path`` cannot be created (missing or read-only parent)."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {path}: folder {parent} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(is_dir: bool) -> int:
    """The permissions ``open``/``mkdir`` would give under the process umask (mkstemp/mkdtemp
    create 0600/0700, which would leave results readable by their owner only)."""
    return (0o777 if is_dir else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only if the block succeeds."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, _default_mode(True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it into place on success."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, _default_mode(False))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_files(files: Mapping[Path, bytes]) -> None:
    """Write a group of files so a reader finds all of them from this call or none of them.

    Every file goes to a temporary sibling, is fsynced, then all are renamed into place, the first one
    last (the file readers look for first, e.g. an engine before its metadata). On any failure the
    temporaries and the files already renamed are removed, so no file is left beside another call's
    companion.
    """
    with contextlib.ExitStack() as stack:
        temps: dict[Path, str] = {}
        for path, data in files.items():
            path = Path(path)
            check_writable_parent(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            stack.callback(_unlink_missing_ok, tmp)
            os.chmod(tmp, _default_mode(False))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            temps[path] = tmp
        done = []
        try:
            for path, tmp in reversed(temps.items()):
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                _unlink_missing_ok(path)
            raise


def _unlink_missing_ok(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def emit_json(result, out: str | os.PathLike | None) -> str:
    """A measurement script's result: indented JSON written atomically to ``out`` (when given) and
    returned for printing."""
    import json

    text = json.dumps(result, indent=2) + "\n"
    if out:
        with atomic_file(out, "w") as f:
            f.write(text)
    return text
