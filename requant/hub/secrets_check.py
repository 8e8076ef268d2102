"""Nothing secret leaves in a commit: every file of a candidate commit is searched for the
worker's secret values and for credential-shaped text before anything is uploaded (and in a dry
run, so the dry run shows the refusal a publish would meet).

The worker's secrets are the Hub token the publish uses, the values of every environment
variable named like a secret (``requant.secret_scan.SECRET_KEY``) and of those the profile lists
in ``hub.secret_env``. Each value is searched for as bytes in every file, weights included;
the credential patterns in every file of at most ``PATTERN_SCAN_BYTES`` and in the JSON header
of every safetensors file (the only part of a weights file that is text).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from requant.errors import SecretInCommit
from requant.secret_scan import SECRET_KEY, SECRET_VALUE

PATTERN_SCAN_BYTES = 64 << 20
_CHUNK = 16 << 20
_MIN_SECRET = 8  # shorter values ("1", "true") would match everywhere and protect nothing


def worker_secrets(token: str | None, names: Iterable[str] = (),
                   env: Mapping[str, str] | None = None) -> list[bytes]:
    env = os.environ if env is None else env
    named = {k for k in env if SECRET_KEY.search(k)} | set(names)
    values = {token or "", *(env.get(k, "") for k in named)}
    return sorted(v.encode() for v in values if len(v) >= _MIN_SECRET)


def refuse_secrets(files: Iterable[tuple[str, Path]], texts: Mapping[str, str],
                   secrets: list[bytes]) -> None:
    """Raise SecretInCommit naming the first file (repo path) that holds a secret."""
    for name, text in texts.items():
        _check(name, text.encode(), secrets, patterns=True)
    for name, path in files:
        size = path.stat().st_size
        if size <= PATTERN_SCAN_BYTES:
            _check(name, path.read_bytes(), secrets, patterns=True)
            continue
        if path.suffix == ".safetensors":
            _check(name, _safetensors_header(path), secrets, patterns=True)
        _scan_large(name, path, secrets)


def _check(name: str, data: bytes, secrets: list[bytes], patterns: bool) -> None:
    for value in secrets:
        if value in data:
            raise SecretInCommit(name, "one of the worker's secret values")
    if patterns and (m := SECRET_VALUE.search(data.decode("latin-1"))):
        kind = m.group(0)[:3] + "..." if len(m.group(0)) > 3 else "?"
        raise SecretInCommit(name, f"text shaped like a credential ({kind})")


def _scan_large(name: str, path: Path, secrets: list[bytes]) -> None:
    if not secrets:
        return
    overlap = max(len(s) for s in secrets) - 1
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            _check(name, tail + chunk, secrets, patterns=False)
            tail = chunk[-overlap:] if overlap else b""


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(min(length, PATTERN_SCAN_BYTES))
