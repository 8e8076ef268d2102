"""The serving revision's keeper kept running: started again, the same way, when it is killed.

The keeper (``requant.serving.keeper``) restarts a model server that dies; nothing restarted the
keeper. The guardian runs beside the router under the same supervisor (supervisord's second
program, or ``deployments/systemd/requant-guardian.service``), so it is itself restarted on any
death, and every ``interval`` seconds it reconciles the local target's record with the processes:

- a rollout holds the target's lock: not its business this round;
- the active record's keeper runs (its pid, with ``--port N`` of the recorded URL on its command
  line): nothing to do;
- the keeper gave up by itself (a server that never became ready, or failed its starts in a row):
  not restarted; ``guardian.json`` says so and names the command that fixes it;
- else (``kill -9``, an OOM kill) and its server still runs on the recorded port: the recorded
  launch is started again with ``--adopt <server pid>``, a keeper that takes the running server
  over (the endpoint never went down), and the record is updated under the lock, the server's
  process group kept as ``adopted_group`` so that every stop ends it too;
- else: whatever its process group left is killed, the recorded launch (command and
  environment, ``Deployed.server["launch"]``) is started again as a new session, and the record
  is updated under the lock. Either way a ``kept`` event goes in its history. More than
  ``MAX_RESTARTS`` in ``WINDOW_S`` and it gives up, saying so.

``python -m requant.rollout.guardian --folder <rollout.state_dir>/local``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from requant.atomic import write_json_atomic
from requant.processes import die_with_parent, pid_running, runs_command, stop_leaderless_group
from requant.rollout.lock import try_target_lock
from requant.rollout.state import Deployed, load_state, now_iso, save_state
from requant.serving.keeper import adopting
from requant.serving.keeper import read_status as read_keeper_status

TARGET = "local"
STATUS = "guardian.json"
#: Written by ``requant down`` (shutdown_local), removed by the next rollout: nothing to keep.
STOPPED = "stopped"
MAX_RESTARTS, WINDOW_S = 5, 600.0


def guardian_command(folder: Path, interval_s: float = 1.0) -> list[str]:
    return [sys.executable, "-m", "requant.rollout.guardian", "--folder", str(folder.resolve()),
            "--interval", str(interval_s)]


class Guardian:
    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.state_dir = self.folder.parent
        self.restarts: list[float] = []
        self.status: dict[str, Any] = {"pid": os.getpid(), "state": "watching", "restarts": 0,
                                       "since": now_iso(), "last": None, "why": None,
                                       "fix": None}

    def tick(self) -> str:
        """One reconciliation; what it found or did, in a word."""
        _reap_children()
        with try_target_lock(self.state_dir, TARGET) as held:
            if not held:
                return "rollout running"
            if (self.folder / STOPPED).exists():
                return self._record("idle", why="stopped by requant down")
            active = load_state(self.state_dir, TARGET).active
            if active is None or not (active.server.get("launch") or {}).get("command"):
                return self._record("idle", why="nothing serves on this target yet")
            if keeper_runs(active):
                return self._record("watching")
            return self._recover(active)

    def _recover(self, active: Deployed) -> str:
        pid = int(active.server["pid"])
        keeper = read_keeper_status(active.server.get("keeper"))
        fix = (f"requant promote --checkpoint {active.release.checkpoint}"
               if active.release.checkpoint else "requant promote --rollback")
        if (keeper or {}).get("state") == "gave-up":
            return self._record("gave-up", fix=fix, why=(
                f"the keeper of {active.release.revision} gave up (its server never became "
                f"ready, or failed its starts in a row; last exit {keeper.get('last_exit')}); "
                "not restarted"))
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            return self._record("gave-up", fix=fix, why=(
                f"the keeper of {active.release.revision} died {MAX_RESTARTS} times in "
                f"{WINDOW_S / 60:.0f} min; not restarted again"))
        server = running_server_of(active, keeper)
        if server is None:  # what the dead keeper's group left, so port and memory are free
            stop_leaderless_group(pid, grace_s=0)
        new_pid = self._launch(active, adopt=server)
        state = load_state(self.state_dir, TARGET)  # under the lock: nobody wrote it meanwhile
        assert state.active is not None
        state.active.server["pid"] = new_pid
        state.active.server["adopted_group"] = os.getpgid(server) if server else None
        how = (f"its server pid {server} still answering, adopted by a new keeper"
               if server else "started again")
        state.record_event("kept", state.active.release, None, now_iso(),
                           reason=f"keeper pid {pid} was gone; {how}: pid {new_pid}")
        save_state(self.state_dir, state)
        self.status["restarts"] += 1
        return self._record("restarted", last={"at": now_iso(), "old_pid": pid,
                                               "new_pid": new_pid, "adopted": server})

    def _launch(self, active: Deployed, adopt: int | None = None) -> int:
        launch = active.server["launch"]
        command = adopting(launch["command"], adopt) if adopt else launch["command"]
        env = {**os.environ, **launch.get("env", {})}
        env.pop("PREFECT_API_URL", None)
        log_path = Path(active.server.get("log") or self.folder / "server.log")
        with log_path.open("ab") as log:
            log.write(f"[requant guardian {now_iso()}] keeper gone: starting it again"
                      f"{f', adopting server pid {adopt}' if adopt else ''}\n".encode())
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=self.folder,
                                    start_new_session=True)
        _say(f"started the keeper of {active.release.revision} again: pid {proc.pid}")
        return proc.pid

    def _record(self, state: str, **fields: Any) -> str:
        changed = state != self.status["state"] or fields.get("last")
        self.status.update({"state": state, "at": now_iso(), "why": None, "fix": None} | fields)
        if changed:
            _say(f"{state}" + (f": {self.status['why']}" if self.status["why"] else ""))
            write_json_atomic(self.folder / STATUS, self.status)
        return state


def keeper_runs(active: Deployed) -> bool:
    """The recorded pid is alive and is a server on the recorded port (never a reused pid)."""
    pid = active.server.get("pid")
    return bool(pid) and pid_running(int(pid)) and runs_command(int(pid), "--port",
                                                                 recorded_port(active))


def running_server_of(active: Deployed, keeper: dict[str, Any] | None) -> int | None:
    """The dead keeper's server when it still runs as the recorded server on the recorded port
    (its pid from the keeper's record, checked by its command line: never a reused pid)."""
    pid = (keeper or {}).get("server_pid")
    if not pid or not pid_running(int(pid)):
        return None
    return int(pid) if runs_command(int(pid), "--port", recorded_port(active)) else None


def recorded_port(d: Deployed) -> str:
    """The port of the recorded server's URL: a keeper's and a vLLM's command line hold
    ``--port N``, which tells a recorded pid from a reused one."""
    return str(urlsplit(d.server.get("url", "")).port)


def _reap_children() -> None:
    """Keepers this guardian started and that died since: no zombies that look alive."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def read_status(folder: Path) -> dict[str, Any] | None:
    """What the guardian last said (``requant status``), or None where none runs."""
    return read_keeper_status(Path(folder) / STATUS)  # the same "JSON or None" reader


def _say(message: str) -> None:
    print(f"[requant guardian {now_iso()}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="requant.rollout.guardian", description=__doc__)
    p.add_argument("--folder", required=True, type=Path)
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    # Under supervisord it goes with its supervisor (a killed supervisord leaves no guardian
    # behind for the next one to duplicate; the next rollout starts both again); under systemd
    # its parent is the service manager.
    die_with_parent()
    guardian = Guardian(args.folder)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _say(f"watching {guardian.folder}")
    while not stopping:
        try:
            guardian.tick()
        except Exception as exc:  # a bad round is logged; the next one tries again
            _say(f"round failed: {type(exc).__name__}: {exc}")
        time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
