"""Content fingerprints: the threaded file hashing gives exactly the one-at-a-time digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from requant.hashing import hash_files


def test_hash_files_on_threads_gives_each_files_own_sha256_in_name_order(tmp_path: Path):
    sizes = {"b.safetensors": 9 << 20, "a.bin": 1, "sub/c.json": 0, "d.txt": 3 << 20}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))
    (tmp_path / ".hidden").write_text("not content")
    got = hash_files(tmp_path)
    assert list(got) == sorted(sizes)  # the order a fingerprint of this dict relies on
    assert got == {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in sizes}
    assert hash_files(tmp_path, ["d.txt", "a.bin"]) == {k: got[k] for k in ("a.bin", "d.txt")}
