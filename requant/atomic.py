"""Atomic outputs: a directory is either complete under its final name or absent.

Every stage builds its output in a hidden sibling directory and renames it into place only after
the last file is written. A crash, a kill or an exception leaves at worst a ``.tmp-*`` directory,
which no reader mistakes for a finished checkpoint, and which the next write sweeps away.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty directory that becomes ``final`` when the block exits without error.

    An existing ``final`` is replaced: it is renamed aside first and removed only after the new
    one is in place, so there is no moment at which neither exists.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{TMP_PREFIX}{final.name}-old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Write JSON through a temp file + rename, so readers never see half a document."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    with tmp.open("w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def _sweep_stale(final: Path) -> None:
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
