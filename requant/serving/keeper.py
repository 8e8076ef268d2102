"""One model server kept running: the serving revision's vLLM started again when it dies.

Why a keeper per server rather than supervisord programs: a rollout's servers come and go with
every revision, are stopped by process group and recorded by pid, and must be supervised the
same way whether the router runs under requant's supervisord or under systemd. The keeper is the
recorded pid and the process group's leader, so everything that stops a server today (the
rollout, recovery, ``requant`` shutdown) stops the keeper and its vLLM together, and a
``kill -9`` of vLLM alone is healed without anyone: the keeper starts the same command on the
same port, and the router sends traffic to it again once its health checks pass (503 with
``Retry-After`` meanwhile, unless a previous revision is still warm).

What it will not do: restart a server that never became ready (a broken checkpoint must fail
its rollout at once, not loop), or one that failed ``--max-failed-starts`` starts in a row.

Its own death does not take its server down: a ``kill -9`` of the keeper leaves vLLM answering
(its process group, named by the dead keeper's pid, still holds it, so a stop of the recorded
pid's group still ends it), and the guardian starts a keeper that adopts it (``--adopt PID``):
it watches the running server as its own (the same record, ``adopted`` added), stops it with its
own stop, and when it dies, kills what its group left and starts it again as it would its own.
The endpoint never goes down for a keeper's death.

Standard library only, and no requant import: it runs for weeks beside the server.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


class Keeper:
    def __init__(self, command: list[str], ready_url: str, status_file: Path,
                 max_failed_starts: int, adopt: int | None = None) -> None:
        self.command, self.ready_url, self.status_file = command, ready_url, status_file
        self.max_failed_starts = max_failed_starts
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.adopted: tuple[int, int] | None = None  # (pid, process group) of an adopted server
        self.status: dict = {"keeper_pid": os.getpid(), "server_pid": None, "state": "starting",
                             "starts": 0, "restarts": 0, "last_exit": None,
                             "ready_since": None, "adopted": None}
        if adopt is not None:
            self._adopt(adopt)

    def _adopt(self, pid: int) -> None:
        """The running server of a keeper that died: its counts carried on, watched as ours."""
        earlier = read_status(self.status_file) or {}
        self.status.update({k: earlier[k] for k in ("starts", "restarts", "last_exit",
                                                    "ready_since") if k in earlier})
        try:
            self.adopted = (pid, os.getpgid(pid))
        except ProcessLookupError:  # gone meanwhile: started afresh below
            return
        self.status["adopted"] = {"pid": pid, "group": self.adopted[1], "at": _now()}

    def stop(self, *_: object) -> None:
        """SIGTERM/SIGINT: no more restarts; the server gets the signal too (it already has
        it when the whole group was signalled, as every stop in requant does; an adopted one
        is in its own group, which is signalled here)."""
        self.stopping.set()
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM)
        if self.adopted is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.adopted[1], signal.SIGTERM)

    def run(self) -> int:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # the engine processes a killed vLLM leaves are ours
        failed_in_a_row = 0
        while True:
            ready, code = self._watch_adopted() if self.adopted else self._serve_once()
            self._reap_orphans()
            self._record(last_exit={"code": code, "at": _now()})
            if self.stopping.is_set():
                self._record(state="stopped")
                return 0
            if self.status["starts"] == 1 and not ready:
                self._say(f"the server exited with code {code} before it was ever ready: "
                          "not restarting it")
                self._record(state="gave-up")
                return code if code and code > 0 else 1
            failed_in_a_row = 0 if ready else failed_in_a_row + 1
            if failed_in_a_row >= self.max_failed_starts:
                self._say(f"{failed_in_a_row} starts in a row never became ready: giving up")
                self._record(state="gave-up")
                return 1
            delay = min(2 ** failed_in_a_row, 30) if failed_in_a_row else 0  # serving: now
            self._say(f"the server exited with code {code}; starting it again in {delay} s")
            self._record(state="restarting", restarts=self.status["restarts"] + 1)
            if self.stopping.wait(delay):
                self._record(state="stopped")
                return 0

    def _watch_adopted(self) -> tuple[bool, int | None]:
        """An adopted server watched until it exits (it is not our child: no exit code), then
        whatever its group left killed, as ``_reap_orphans`` does for our own."""
        assert self.adopted is not None
        pid, group = self.adopted
        self._record(server_pid=pid, state="serving")
        self._say(f"adopted the running server, pid {pid} (its keeper was gone)")
        if self.stopping.is_set():  # a stop that came before the adoption was recorded
            self.stop()
        stop_sent = None
        while _alive(pid):
            if self.stopping.is_set():
                stop_sent = stop_sent or time.monotonic()
                if time.monotonic() - stop_sent > _ADOPTED_GRACE_S:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, signal.SIGKILL)
            time.sleep(0.5)
        for _ in range(100):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self.adopted = None
        self._record(adopted=None)
        return True, None  # not our child: its exit code is its dead keeper's to read

    def _serve_once(self) -> tuple[bool, int]:
        """Start the server and watch it until it exits: (was it ever ready, its exit code)."""
        self.child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        self._record(server_pid=self.child.pid, starts=self.status["starts"] + 1,
                     state="starting")
        self._say(f"started the server, pid {self.child.pid}")
        if self.stopping.is_set():  # a stop that came while it was being spawned
            self.stop()
        ready = False
        while (code := self.child.poll()) is None:
            if not ready and _ready(self.ready_url):
                ready = True
                self._record(state="serving", ready_since=_now())
            time.sleep(0.5)
        return ready, code if code >= 0 else 128 - code

    def _reap_orphans(self) -> None:
        """Whatever the dead server left (its engine process) is killed before the port and
        the memory are needed again."""
        for _ in range(50):
            children = _children(os.getpid())
            if not children:
                return
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in children:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)

    def _record(self, **changes: object) -> None:
        self.status.update(changes)
        tmp = self.status_file.with_name(self.status_file.name + ".tmp")
        tmp.write_text(json.dumps(self.status, indent=1))
        os.replace(tmp, self.status_file)

    def _say(self, message: str) -> None:
        print(f"[requant keeper {_now()}] {message}", flush=True)


#: How long an adopted server gets after the keeper's SIGTERM before its group is killed.
_ADOPTED_GRACE_S = 20.0


def _alive(pid: int) -> bool:
    """Alive and not a zombie (the keeper's standard-library twin of processes.pid_running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def read_status(path: str | Path | None) -> dict | None:
    """The keeper's record of its server, or None where there is none (yet)."""
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def keeper_command(python: str, server_command: list[str], ready_url: str,
                   status_file: Path, max_failed_starts: int = 3) -> list[str]:
    return [python, "-m", "requant.serving.keeper", "--ready-url", ready_url,
            "--status-file", str(status_file), "--max-failed-starts", str(max_failed_starts),
            "--", *server_command]


def adopting(command: list[str], server_pid: int) -> list[str]:
    """A recorded keeper command that adopts the running ``server_pid`` instead of starting."""
    split = command.index("--")
    return [*command[:split], "--adopt", str(server_pid), *command[split:]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="requant.serving.keeper", description=__doc__)
    p.add_argument("--ready-url", required=True)
    p.add_argument("--status-file", required=True, type=Path)
    p.add_argument("--max-failed-starts", type=int, default=3)
    p.add_argument("--adopt", type=int, help="the pid of the running server of a keeper that "
                   "died: watched and kept instead of starting a new one")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("the server's command goes after --")
    keeper = Keeper(command, args.ready_url, args.status_file, args.max_failed_starts,
                    args.adopt)
    signal.signal(signal.SIGTERM, keeper.stop)
    signal.signal(signal.SIGINT, keeper.stop)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
