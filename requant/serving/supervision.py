"""The local router, and the programs its caller adds (the rollout's guardian,
``requant.rollout.guardian``, which starts the serving revision's keeper again when it is
killed), under supervisord: restarted within about a second of any death.

Why supervisord: platform engineers know it, it runs as the pipeline's own user on any host
(containers and CI included, where systemd is absent), it is one pure-Python package from PyPI
locked like every other dependency, and ``supervisorctl`` answers "is it up, since when, which
pid" without our code. A program that has run for ``startsecs`` and exits, for any reason
including ``kill -9``, is started again at once. Hosts that prefer systemd use
``deployments/systemd/requant-router.service`` (Restart=always) instead; the router itself is
the same command either way (``router_command``), and it resumes its persisted backend.

supervisord's own death leaves the router running (it is a separate process): the endpoint
stays up, ``requant status`` shows the supervisor down, and the next rollout starts a new
supervisord only after stopping that unsupervised router (it holds the port).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from requant.atomic import write_text_atomic
from requant.errors import SettingsError

PROGRAM = "router"


@dataclass(frozen=True)
class Supervision:
    state: str  # supervisord's word for the router (RUNNING, BACKOFF, ...) or "no supervisor"
    detail: str  # "pid 123, uptime 0:01:02", or why not


def router_command(host: str, port: int, folder: Path,
                   max_body_bytes: int | None = None) -> list[str]:
    return [sys.executable, "-m", "requant.serving.router", "--host", host, "--port", str(port),
            "--state-file", str(folder / "router.json"),
            "--token-file", str(folder / "router.token"),
            *(["--max-body-bytes", str(max_body_bytes)] if max_body_bytes else [])]


def write_config(folder: Path, command: list[str],
                 others: dict[str, list[str]] | None = None) -> Path:
    """supervisord.conf beside the router's state: a private socket (0700), logs in the folder,
    the router restarted on every exit. Every path in it is absolute (supervisord reads some
    relative to its ``directory``, others to where it was started) and every value is escaped
    for its parser: ``%`` expands, the command is split like a shell line."""
    folder = folder.resolve()
    others = others or {}
    for part in (str(folder), *command, *(p for c in others.values() for p in c)):
        if "\n" in part or "\r" in part:
            raise SettingsError(f"rollout.state_dir: {str(folder)!r:.200} (or the router command) "
                                "contains a line break, which supervisord's config cannot "
                                "hold. Use a path without one.")
    conf = folder / "supervisord.conf"
    sock = _esc(str(_socket(folder)))
    write_text_atomic(conf, f"""[unix_http_server]
file={sock}
chmod=0700

[supervisord]
logfile={_esc(str(folder / "supervisord.log"))}
pidfile={_esc(str(folder / "supervisord.pid"))}
childlogdir={_esc(str(folder))}
directory={_esc(str(folder))}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{sock}

{_program(PROGRAM, command, folder / "router.log")}
""" + "\n".join(_program(name, other, folder / f"{name}.log")
                for name, other in others.items()))
    return conf


def _program(name: str, command: list[str], log: Path) -> str:
    return f"""[program:{name}]
command={_esc(shlex.join(command))}
environment=PYTHONUNBUFFERED="1"
autostart=true
autorestart=true
startsecs=1
startretries=1000
stopsignal=TERM
stopwaitsecs=10
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={_esc(_esc(str(log)))}
"""


def _esc(value: str) -> str:
    """supervisord expands ``%(name)s`` in its values: a literal % is written %% (twice over for
    a program's log file, which it expands twice)."""
    return value.replace("%", "%%")


def start(folder: Path, command: list[str], others: dict[str, list[str]] | None = None) -> None:
    """Start supervisord (it daemonizes and starts the router and ``others``), or the router
    under a running supervisord (and ``others`` it does not have yet)."""
    conf = write_config(folder, command, others)
    if supervision(folder).state != "no supervisor":
        for name in others or {}:
            _ctl(conf, "update", name)  # added to a supervisord started before it existed
        _ctl(conf, "start", PROGRAM)
        return
    subprocess.run([_bin("supervisord"), "-c", str(conf)], check=True, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def keep(folder: Path, command: list[str], others: dict[str, list[str]]) -> None:
    """Under a running supervisord, ``others`` too: one started before they existed gets them
    added; running ones are left alone."""
    for name in others:
        if supervision(folder, name).state not in ("RUNNING", "STARTING", "BACKOFF"):
            _ctl(write_config(folder, command, others), "update", name)


def supervision(folder: Path, program: str = PROGRAM) -> Supervision:
    conf = folder / "supervisord.conf"
    if not conf.is_file():
        return Supervision("no supervisor", "never started here")
    out = _ctl(conf, "status", program)
    words = out.split()
    if len(words) >= 2 and words[0] == program:
        return Supervision(words[1], " ".join(words[2:]))
    return Supervision("no supervisor", out.strip()[:200] or "supervisord is not running")


def shutdown(folder: Path, timeout_s: float = 30) -> None:
    """Stop the router and supervisord itself, and return only once supervisord has exited
    (``supervisorctl shutdown`` only asks; it stops its program first, up to stopwaitsecs)."""
    from requant.processes import pid_running

    conf, pid_file = folder / "supervisord.conf", folder / "supervisord.pid"
    if not conf.is_file() or supervision(folder).state == "no supervisor":
        return
    pid = int(pid_file.read_text()) if pid_file.is_file() else None
    _ctl(conf, "shutdown")
    deadline = time.monotonic() + timeout_s
    while pid and pid_running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def _socket(folder: Path) -> Path:
    """In the folder, unless that path is too long for a unix socket (108 bytes on Linux): then
    in the temp dir, named by the user and the folder (0700 either way)."""
    inside = folder.resolve() / "supervisor.sock"
    if len(str(inside)) < 100:
        return inside
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"requant-{os.getuid()}-{tag}.sock"


def _ctl(conf: Path, *args: str) -> str:
    done = subprocess.run([_bin("supervisorctl"), "-c", str(conf), *args], capture_output=True,
                          text=True, timeout=30)
    return done.stdout + done.stderr


def _bin(name: str) -> str:
    """supervisord and supervisorctl of this environment (installed beside its python)."""
    return str(Path(sys.executable).with_name(name))
