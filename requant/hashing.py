"""Content fingerprints: what makes two runs "the same" is their inputs' bytes, not their names."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
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
    """sha256 of each regular file under ``root`` (or of the given relative names), sorted."""
    root = Path(root)
    if names is None:
        names = (
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    return {name: sha256_file(root / name) for name in sorted(names)}


def fingerprint(payload: Any) -> str:
    """A stable hash of JSON-able data: key order and whitespace never change it."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
