from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from requant.atomic import (
    TMP_PREFIX,
    atomic_directory,
    create_exclusive,
    read_json,
    write_json_atomic,
)
from requant.errors import StateFileError

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


def _kill_after(step: str, final: Path, version: str) -> subprocess.CompletedProcess:
    """Replace ``final`` in a child process that SIGKILLs itself right after ``step``: the
    exchange of the two directories (before the old one is removed), or the hard link of a
    created file (before its temp name is removed)."""
    script = textwrap.dedent(f"""
        import os, shutil, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import requant.atomic as atomic
        step, final = {step!r}, Path({str(final)!r})
        die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        if step == "exchange":
            atomic.shutil.rmtree = die
            with atomic.atomic_directory(final) as tmp:
                (tmp / "v").write_text({version!r})
        else:
            real_link = os.link
            def link_then_die(a, b):
                real_link(a, b)
                die()
            atomic.os.link = link_then_die
            atomic.create_exclusive(final, {version!r})
    """)
    return subprocess.run([sys.executable, "-c", script], check=False)


def test_kill_9_right_after_the_exchange_leaves_the_new_version_and_the_old_is_swept_later(
        tmp_path):
    final = tmp_path / "checkpoint"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("old")
    assert _kill_after("exchange", final, "new").returncode == -signal.SIGKILL
    assert (final / "v").read_text() == "new"
    (stale,) = [p for p in tmp_path.iterdir() if p.name != "checkpoint"]
    assert (stale / "v").read_text() == "old"  # the old version, under a temp name
    with atomic_directory(final) as tmp:  # its writer is dead: the next write sweeps it
        (tmp / "v").write_text("newer")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_kill_9_after_linking_a_created_file_leaves_it_whole(tmp_path):
    final = tmp_path / "router.token"
    assert _kill_after("link", final, "secret-token").returncode == -signal.SIGKILL
    assert final.read_text() == "secret-token"
    assert create_exclusive(final, "other") is False and final.read_text() == "secret-token"


def test_a_live_writers_temporary_directory_is_never_swept_by_another_write(tmp_path):
    """Two runs sharing a cache key: one must not delete the other's work in progress."""
    final = tmp_path / "baseline"
    with atomic_directory(final) as mine:
        (mine / "partial").write_text("still writing")
        with atomic_directory(final) as theirs:  # the other run finishes first
            (theirs / "v").write_text("theirs")
        assert (mine / "partial").is_file()
    assert (final / "partial").is_file()  # the last complete write wins, whole


def test_replacing_a_directory_never_leaves_its_name_missing(tmp_path):
    final = tmp_path / "decision"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("0")
    misses, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if not (final / "v").is_file():
                misses.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 200):
            with atomic_directory(final) as tmp:
                (tmp / "v").write_text(str(i))
    finally:
        stop.set()
        thread.join(10)
    assert misses == [] and (final / "v").read_text() == "199"


def test_read_json_names_a_corrupt_record_and_the_fix(tmp_path):
    path = tmp_path / "state.json"
    assert read_json(path, "Delete it.") is None
    path.write_text("{not json")
    with pytest.raises(StateFileError, match=r"state\.json: not valid JSON .* Delete it\."):
        read_json(path, "Delete it.")
