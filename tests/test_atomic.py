from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from requant.atomic import TMP_PREFIX, atomic_directory, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_exception_inside_block_leaves_neither_final_nor_temp(tmp_path):
    final = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("oneshot crashed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_success_replaces_an_existing_directory_whole(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "stale").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("new")
    assert (final / "a").read_text() == "new"
    assert not (final / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_process_killed_mid_write_leaves_no_final_directory(tmp_path):
    final = tmp_path / "checkpoint"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from requant.atomic import atomic_directory
        with atomic_directory(__import__("pathlib").Path({str(final)!r})) as tmp:
            (tmp / "model-00001.safetensors").write_bytes(b"x" * 1024)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(name.startswith(TMP_PREFIX) for name in leftovers)
    # The next write sweeps the debris of the crashed one.
    with atomic_directory(final) as tmp:
        (tmp / "ok").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_json_write_is_whole_or_absent(tmp_path):
    path = write_json_atomic(tmp_path / "decision.json", {"b": 2, "a": 1})
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["decision.json"]
