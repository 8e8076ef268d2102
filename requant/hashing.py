"""Content fingerprints: what makes two runs "the same" is their inputs' bytes, not their names."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
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
        digests = pool.map(lambda name: sha256_file(root / name), ordered)
        return dict(zip(ordered, digests, strict=True))


def fingerprint(payload: Any) -> str:
    """A stable hash of JSON-able data: key order and whitespace never change it."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
