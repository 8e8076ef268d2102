"""Content fingerprints: what makes two runs "the same" is their inputs' bytes, not their names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """sha256 of each regular file under ``root`` (or of the given relative names), sorted.

    Files are hashed on several threads (hashlib drops the GIL while it hashes a chunk): a
    local 8B model's four weight shards took 14 s one after another on a GPU box, a share of
    every run that identifies a local folder by its bytes (docs/quantization.md)."""
    root = Path(root)
    if names is None:
        names = (
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    ordered = sorted(names)
    workers = max(1, min(8, os.cpu_count() or 1, len(ordered)))
    with ThreadPoolExecutor(workers) as pool:
        digests = pool.map(lambda name: _ahead_or_now(root / name), ordered)
        return dict(zip(ordered, digests, strict=True))


#: Digests started early (``hash_ahead``), by the file's identity when they started.
_AHEAD: dict[tuple[str, int, int, int], Future[str]] = {}
_AHEAD_LOCK = threading.Lock()


def hash_ahead(root: Path, names: Iterable[str]) -> None:
    """Start hashing these files now, each on a daemon thread, so that a later ``hash_files``
    of them waits for less or nothing: the flow starts a local source's weights (15 s for 16 GB
    on a GPU box) while it imports torch and checks its inputs (docs/quantization.md, "The
    whole flow on a GPU box"). A digest is used only if the file's path, size, mtime and inode
    are still those it was started with; a process that exits does not wait for it."""
    for name in names:
        path = Path(root) / name
        try:
            key = _identity(path)
        except OSError:
            continue
        with _AHEAD_LOCK:
            if key in _AHEAD:
                continue
            future: Future[str] = Future()
            _AHEAD[key] = future
        threading.Thread(target=_fill, args=(future, path), daemon=True,
                         name=f"hash-ahead {name}").start()


def _fill(future: Future[str], path: Path) -> None:
    try:
        future.set_result(sha256_file(path))
    except BaseException as exc:  # handed to whoever waits; they hash again
        future.set_exception(exc)


def _ahead_or_now(path: Path) -> str:
    try:
        key = _identity(path)
    except OSError:
        return sha256_file(path)  # raises the same error as before, where it belongs
    with _AHEAD_LOCK:
        future = _AHEAD.pop(key, None)
    if future is not None:
        with contextlib.suppress(Exception):
            digest = future.result()
            if _identity(path) == key:  # not changed while it was hashed
                return digest
    return sha256_file(path)


def _identity(path: Path) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def fingerprint(payload: Any) -> str:
    """A stable hash of JSON-able data: key order and whitespace never change it."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
