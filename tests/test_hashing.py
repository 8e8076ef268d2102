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


def test_digests_started_ahead_are_the_digests_and_a_file_changed_since_is_hashed_again(
        tmp_path):
    from requant.hashing import _AHEAD, hash_ahead

    for name, size in (("a.safetensors", 3 << 20), ("b.safetensors", 1 << 20), ("c.json", 10)):
        (tmp_path / name).write_bytes(os.urandom(size))
    hash_ahead(tmp_path, ["a.safetensors", "b.safetensors", "c.json"])
    # b changes after its digest was started (another size, so another identity)
    (tmp_path / "b.safetensors").write_bytes(b"changed")
    got = hash_files(tmp_path, ["a.safetensors", "b.safetensors", "c.json"])
    want = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
            for n in ("a.safetensors", "b.safetensors", "c.json")}
    assert got == want
    # what was used is gone; the stale one is never used (its identity is not the file's now)
    assert not any(str(tmp_path) in key[0] and key[0].endswith(("a.safetensors", "c.json"))
                   for key in _AHEAD)
