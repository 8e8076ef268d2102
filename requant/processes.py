"""Process groups that end completely: the one stop sequence for vLLM servers and calibration
ranks, and the parent-death signal that takes a child down with a killed parent."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Runs in the child between fork and exec: the kernel sends ``sig`` when the parent dies,
    so a killed stage leaves no server or rank behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG


def runs_command(pid: int, *args: str) -> bool:
    """The process's command line holds ``args`` one after the other: a pid read from a record
    is checked with this before any signal, so a reused or planted pid is never ours to kill."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    n = len(args)
    return any(argv[i:i + n] == list(args) for i in range(len(argv) - n + 1))


def stop_process_group(pid: int, grace_s: float = 30.0, expect: tuple[str, ...] = ()) -> None:
    """Stop a server this process did not start (known by its pid from a deploy record): its
    session leader's process group gets SIGTERM, then SIGKILL after the grace period. With
    ``expect``, only if the leader's command line holds those arguments (``runs_command``)."""
    if expect and not runs_command(pid, *expect):
        return
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid != pid:  # the pid was reused by an unrelated process: not ours to kill
        return

    def wait_leader(timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and pid_running(pid):
            time.sleep(0.2)
        with contextlib.suppress(ChildProcessError):  # reap it if this process started it
            os.waitpid(pid, os.WNOHANG)

    terminate_group(pgid, grace_s, wait_leader)


def stop_leaderless_group(pgid: int, grace_s: float = 30.0, expect: tuple[str, ...] = ()
                          ) -> None:
    """Stop what is left of a process group whose leader is gone: a server that outlived its
    killed keeper (the group is named by the dead keeper's pid, which Linux does not reuse while
    the group has members). With ``expect``, only if a member's command line holds it."""
    if pid_running(pgid):
        return  # the leader runs: stop_process_group's business, not a leftover
    members = group_members(pgid)
    if not members or (expect and not any(runs_command(m, *expect) for m in members)):
        return
    terminate_group(pgid, grace_s, lambda timeout_s: _wait_group_gone(pgid, timeout_s))


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.append(int(entry))
    return found


def terminate_group(pgid: int, grace_s: float, wait_leader: Callable[[float], None]) -> None:
    """The one stop sequence: SIGTERM to the group, the leader gets ``grace_s`` to exit, then
    SIGKILL to whatever is left (engine workers too, even if the leader exited), and return
    only once no process of the group exists."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    wait_leader(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    wait_leader(10)
    _wait_group_gone(pgid, 15)


def read_pid(path: Path) -> int | None:
    """A pid file's number, or None when it is missing or holds anything else."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie still answers kill(pid, 0))."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Orphaned engine processes are reaped by init a moment after they die; "stopped" should
    mean no process of the group exists any more, not that one is on its way out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
