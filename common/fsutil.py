"""Safe output writes: claimed, atomic, and never over something the project did not write.

Every output path is *claimed* before it is written (:func:`claim_output`): an exclusive
``flock`` on a lock file beside it, so a second process writing the same path fails at once with
:class:`OutputBusyError` instead of silently replacing the first one's result. The claim is taken
before a long job starts (calibration, export, engine build) and held until its result is in place.

Everything temporary lives beside its target under one recognisable prefix, :data:`TMP_PREFIX`:
``.dgq-tmp.<name>.lock`` (the lock) and ``.dgq-tmp.<name>.<8 random characters>`` (the folder or
file being written, the old version being replaced). They are removed on every exit path the
process survives; after a kill, the next process that claims the same ``<name>`` removes them
(only the claim's holder creates them, so whatever is there while it holds the claim is stale).

``overwrite`` replaces only what an ``owned(path)`` test recognises (an export folder by its
manifest, a recipe by its header, ...); anything else is refused with :class:`NotOwnedError`.

New files and folders get the permissions a plain ``open``/``mkdir`` would give under the process umask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from common.errors import DGQError

try:
    import fcntl
except ImportError:  # Windows: claims fall back to exclusive creation of the lock file
    fcntl = None

log = logging.getLogger(__name__)

# The prefix of every temporary file or folder the project creates beside an output.
TMP_PREFIX = ".dgq-tmp."
# tempfile's random part: 8 characters of [a-z0-9_]. A lock file ends in ".lock" (4 characters), so
# the temporaries of target "a" never match those of target "a.b" or "a.lock".
_TOKEN = r"[a-z0-9_]{8}"

Owned = Callable[[Path], bool]


class OutputBusyError(DGQError, FileExistsError):
    """Another process is writing the same output path right now."""


class NotOwnedError(DGQError, FileExistsError):
    """``overwrite`` was asked for a path the project did not write (a user's file or folder)."""


def check_writable_parent(path: Path) -> None:
    """Raise a clear error when ``path`` cannot be created (missing or read-only parent)."""
    parent = Path(os.path.abspath(Path(path).expanduser())).parent
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


def output_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute without resolving links (``.`` becomes the folder's own name)."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.name:
        raise ValueError(f"cannot write to {p}: it is the file system root")
    return p


def is_temporary(name: str) -> bool:
    """True for a name the project gives its temporaries (readers of a folder skip them)."""
    return name.startswith(TMP_PREFIX)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporaries of output ``path`` beside it (not its lock file)."""
    path = output_path(path)
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{path.name}.") + _TOKEN)
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return [path.parent / n for n in sorted(names) if pattern.fullmatch(n)]


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


def _lock_path(path: Path) -> Path:
    return path.parent / f"{TMP_PREFIX}{path.name}.lock"


def _lock(path: Path) -> int:
    """Open and exclusively lock ``path``'s lock file; raise :class:`OutputBusyError` when another
    process holds it. A kill releases a ``flock``, so a lock file left behind is simply reused."""
    lock = _lock_path(path)
    busy = OutputBusyError(
        f"{path} is being written by another process (it holds {lock.name}); wait for it to finish or "
        "choose another output path"
    )
    while True:
        if fcntl is None:
            try:
                return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, _default_mode(False))
            except FileExistsError:
                raise busy from None
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, _default_mode(False))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy from None
        # The previous holder unlinks the file before it unlocks: a lock taken on an unlinked file
        # claims nothing, so check that the name still points at the locked file.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(path))
    os.close(fd)


# Claims this process holds: absolute path -> nesting depth (a command claims its output before the
# work, the writer inside claims it again).
_HELD: dict[Path, int] = {}


def check_replaceable(path: Path, overwrite: bool, owned: Owned | None, what: str = "file or folder") -> None:
    """Raise unless ``path`` is free, or ``overwrite`` is set and ``owned(path)`` recognises it."""
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
    if owned is not None and not owned(path):
        raise NotOwnedError(
            f"{path} exists and is not {'an' if what[:1] in 'aeiou' else 'a'} {what} written by dgq; --overwrite "
            "replaces only what dgq wrote, so move or delete it yourself, or choose another output path"
        )


@contextlib.contextmanager
def claim_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    owned: Owned | None = None,
    what: str = "file or folder",
    parents: bool = True,
) -> Iterator[Path]:
    """Hold output ``path`` for this process for the block; yields its absolute path.

    Creates missing parent folders (``parents``; else a missing one is an error), refuses an
    unwritable one, takes the claim (or raises
    :class:`OutputBusyError`), removes stale temporaries of ``path``, and checks that ``path`` is
    free or replaceable (:func:`check_replaceable`). Claiming a path this process already holds
    nests (only the checks run again).
    """
    path = output_path(path)
    if path in _HELD:
        check_replaceable(path, overwrite, owned, what)
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    if parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"cannot create the folder {path.parent} for {path}: {err.strerror}") from err
    check_writable_parent(path)
    fd = _lock(path)
    _HELD[path] = 1
    try:
        for stale in stale_temporaries(path):
            log.info("removing %s, left by an interrupted run", stale)
            _remove(stale)
        check_replaceable(path, overwrite, owned, what)
        yield path
    finally:
        del _HELD[path]
        _unlock(path, fd)


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside output ``near`` (which the caller has claimed), removed on exit."""
    near = output_path(near)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{near.name}.", dir=near.parent))
    try:
        yield tmp
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, overwrite: bool = False, owned: Owned | None = None, what: str = "file or folder"
) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only if the block succeeds.

    ``overwrite`` replaces an existing ``path`` that ``owned`` recognises (anything when ``owned`` is
    None); see :func:`claim_output`.
    """
    with claim_output(path, overwrite, owned, what) as path:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
        os.chmod(tmp, _default_mode(True))
        try:
            yield tmp
            if os.path.lexists(path):
                # Move the old version aside under the temporary prefix (a kill from here on leaves
                # only names the next claim removes), put the new one in place, drop the old one.
                hold = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
                os.rename(path, hold / "old")
                os.rename(tmp, path)
                _remove(hold)
            else:
                os.rename(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "wb", overwrite: bool = True, owned: Owned | None = None
) -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it into place on success.

    ``overwrite`` (default True: results such as images and reports are rewritten) and ``owned`` as
    for :func:`atomic_dir`.
    """
    with claim_output(path, overwrite, owned) as path:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        os.chmod(tmp, _default_mode(False))
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            _unlink_missing_ok(tmp)
            raise


def atomic_files(files: Mapping[Path, bytes]) -> None:
    """Write a group of files so a reader finds all of them from this call or none of them.

    Every file goes to a temporary sibling, is fsynced, then all are renamed into place, the first one
    last (the file readers look for first, e.g. an engine before its metadata). On any failure the
    temporaries and the files already renamed are removed, so no file is left beside another call's
    companion. Each path is claimed (:func:`claim_output`) for the call; existing files are replaced.
    """
    with contextlib.ExitStack() as stack:
        for path in files:
            stack.enter_context(claim_output(path, overwrite=True))
        temps: dict[Path, str] = {}
        for path, data in files.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
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


__all__ = [
    "TMP_PREFIX",
    "NotOwnedError",
    "OutputBusyError",
    "atomic_dir",
    "atomic_file",
    "atomic_files",
    "check_replaceable",
    "check_writable_parent",
    "claim_output",
    "emit_json",
    "is_temporary",
    "output_path",
    "scratch_dir",
    "stale_temporaries",
]
