"""Atomic outputs: a file or directory is either complete under its final name or absent.

Every stage builds its output in a hidden sibling (``.tmp-<name>-<host>-<pid>-<random>``) and
puts it in place only after the last byte is on disk (files and the parent directory fsynced).
A directory that already exists is swapped with the new one in one ``renameat2(RENAME_EXCHANGE)``
call, so a reader always finds one complete version under the final name; where the kernel or
file system lacks that call, two renames leave a window of microseconds in which the name is
absent (never half written). A crash leaves at worst a ``.tmp-*`` sibling, which no reader
mistakes for a finished output. Temporary siblings belong to their writer: the next write sweeps
only those whose writing process (on this host) is gone, never another live run's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
_RENAME_EXCHANGE = 2
_HOST = socket.gethostname().replace("-", "_")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty directory that becomes ``final`` when the block exits without error; an
    existing ``final`` is exchanged for it atomically and then removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = _tmp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists() and exchange(tmp, final):
            fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
            return
        if final.exists():  # no RENAME_EXCHANGE here: aside, then in
            old = _tmp_name(final)
            final.rename(old)
            tmp.rename(final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
        tmp.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> Path:
    """Write through a temp file (fsynced, ``mode`` set before any byte is written) + rename +
    fsync of the directory, so readers never see half a file and a crash never loses it."""
    path = Path(path)
    tmp = _written_temp(path, text, 0o600 if mode is None else mode)
    try:
        if mode is None:
            os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def create_exclusive(path: Path, text: str, mode: int = 0o600) -> bool:
    """Create ``path`` whole with ``text`` unless it exists: written and fsynced under a temp
    name, then hard-linked into place (fails if another creator won). False: it existed. A
    crash never leaves the final name empty or half written."""
    path = Path(path)
    tmp = _written_temp(path, text, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def write_json_atomic(path: Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str)
                             + "\n")


def read_json(path: Path, fix: str) -> Any | None:
    """A JSON record requant wrote, or None when there is none. One that cannot be read (a hand
    edit, a disk fault) is a ``StateFileError`` naming the file and ``fix``: never a traceback,
    never taken as empty."""
    from requant.errors import StateFileError

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path}: cannot be read ({exc}). {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}). "
                             f"{fix}") from None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one system call; False where the kernel or the file system
    cannot (the caller falls back to two renames)."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_stale(final: Path) -> None:
    """Remove temporaries of ``final`` whose writer is gone: same host, process not running.
    A live writer's (another run sharing the cache key) is left alone."""
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        owner = _owner(stale.name[len(TMP_PREFIX) + len(final.name) + 1:])
        if owner is not None and owner[0] == _HOST and not _alive(owner[1]):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _written_temp(final: Path, text: str, mode: int) -> Path:
    """``text`` on disk (fsynced) under a new temporary sibling of ``final``, created with
    ``mode`` before any byte is written; removed again if writing fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _tmp_name(final: Path) -> Path:
    return final.parent / f"{TMP_PREFIX}{final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner(suffix: str) -> tuple[str, int] | None:
    parts = suffix.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_RENAMEAT2: Any = None


def _renameat2() -> Any:
    global _RENAMEAT2
    if _RENAMEAT2 is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _RENAMEAT2 = getattr(libc, "renameat2", False)
        if _RENAMEAT2:
            _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                   ctypes.c_uint]
            _RENAMEAT2.restype = ctypes.c_int
    return _RENAMEAT2 or None


@contextmanager
def flushing(root: Path) -> Iterator[None]:
    """Write the files now under ``root`` back to disk on a thread while the block runs (a
    checkpoint's save is flushed while it is verified), waiting for it at the end: the fsync
    that ``atomic_directory`` does before its rename then finds them already on disk."""
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            _fsync_tree(root)
        except BaseException as exc:  # seen by the caller below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=flush, name="requant-flush", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if errors:
        raise errors[0]


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
