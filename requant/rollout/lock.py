"""One rollout of a target at a time, however it was started.

The promote deployment's own concurrency limit covers runs started by the automation or by
``rollout.trigger=deployment``, but not an inline promote (a subflow on the GPU worker) nor a
``requant promote`` from a shell. Every promote therefore takes, for its target:
- an exclusive ``flock`` on ``<state_dir>/<target>/rollout.lock``: released by the kernel when
  the holder dies, ``kill -9`` included, so a crash never leaves the target locked;
- the Prefect global concurrency limit ``requant-rollout-<target>`` (one slot, created by
  scripts/prefect_apply.sh), which spans hosts sharing one Prefect server. It is not created
  here: a promote killed with ``kill -9`` keeps its slot until Prefect's lease (300 s) runs
  out, so on one host the flock alone recovers at once. Where it does not exist (the embedded
  default), the flock alone serialises, and nothing is asked of Prefect (which would warn in
  the run log that the limit does not exist).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def limit_name(target: str) -> str:
    return f"requant-rollout-{target}"


@contextmanager
def rollout_lock(state_dir: Path, target: str, log: Callable[[str], None] = print
                 ) -> Iterator[None]:
    with target_lock(state_dir, target, log), operators_limit(limit_name(target)):
        yield


@contextmanager
def operators_limit(name: str) -> Iterator[None]:
    """One slot of the global concurrency limit ``name`` when the operator made it; nothing
    without it (or without a server to ask)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
        exists = True
    except Exception:  # ObjectNotFound, or no server answering: the flock alone
        exists = False
    if not exists:
        yield
        return
    with concurrency(name, occupy=1, strict=False):
        yield


_held = threading.local()  # the lock files this thread holds: taking one again is a no-op


@contextmanager
def target_lock(state_dir: Path, target: str, log: Callable[[str], None] = print
                ) -> Iterator[None]:
    """The ``flock`` alone: what every change of the target's processes and record holds (the
    rollout, ``requant down``), and what the guardian (requant.rollout.guardian) tries before it
    touches anything. Re-entrant within a thread: a rollout inside ``rollout_lock`` takes it
    again without waiting for itself."""
    path = (Path(state_dir) / target / "rollout.lock").resolve()
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another rollout of the {target} target is running; waiting for it to end")
            fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
    finally:
        os.close(fd)


@contextmanager
def try_target_lock(state_dir: Path, target: str) -> Iterator[bool]:
    """``target_lock`` if it is free now, never waited for: yields whether it is held. No lock
    file yet means no rollout has ever run here: free."""
    path = Path(state_dir) / target / "rollout.lock"
    if not path.is_file():
        yield True
        return
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
