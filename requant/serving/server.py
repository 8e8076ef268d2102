"""vLLM server lifecycle: start a checkpoint in the serving environment, wait until it answers,
and make sure it is gone afterwards, whatever happened in between.

The pipeline environment never imports vLLM (its compressed-tensors pin differs); it starts the
serving environment's OpenAI-compatible server as a process and speaks HTTP to it, as production
does across two images. The server runs in its own process group, so stopping it stops the
engine processes it forked too; a parent-death signal covers the case where our own process is
killed before it can clean up.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from requant.errors import ServerError, SettingsError
from requant.gpu_memory import gpu_memory, wait_for_gpu_memory
from requant.processes import die_with_parent as kill_with_parent
from requant.processes import terminate_group
from requant.serving.checks import not_ready_reason
from requant.serving.keeper import keeper_command, read_status
from requant.settings import PROJECT_ROOT, ServerSettings

DEFAULT_SERVING_PYTHON = PROJECT_ROOT / ".venvs" / "serving" / "bin" / "python"


@dataclass
class ServerHandle:
    base_url: str  # http://host:port
    served_model_name: str
    log_path: Path
    process: subprocess.Popen
    startup_s: float = 0.0
    command: list[str] = field(default_factory=list)
    keeper_status: Path | None = None  # the keeper's record, when one restarts the server
    #: what was executed (the keeper's command, with the server's after ``--``) and the
    #: environment it got on top of the starter's: enough to start it again the same way
    #: (requant.serving.guardian)
    launched: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"

    def alive(self) -> bool:
        return self.process.poll() is None

    def unbroken(self) -> bool:
        """Alive and never restarted by its keeper: what a rollout judging a new server needs
        (a crash its keeper hid within a phase is still a crash on live traffic)."""
        restarts = (read_status(self.keeper_status) or {}).get("restarts")
        return self.alive() and not restarts

    def check_alive(self) -> None:
        if not self.alive():
            raise ServerError(
                f"vLLM server for {self.served_model_name} exited with code "
                f"{self.process.returncode}.\n{log_tail(self.log_path)}"
            )


def serving_python(cfg: ServerSettings) -> Path:
    python = Path(os.environ.get("REQUANT_SERVING_PYTHON") or DEFAULT_SERVING_PYTHON)
    if not python.exists():
        raise SettingsError(
            f"serving environment: no Python at {python}. Create it with `make serving-env` "
            "(scripts/setup_envs.sh serving), or the worker's operator points "
            "REQUANT_SERVING_PYTHON at a Python that has vLLM."
        )
    return python


#: Where picked ports come from: below the kernel's ephemeral range, which outgoing
#: connections draw from and so can take a picked port before its server binds it.
PICK_SPAN = 8000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server about to bind it: picked below the ephemeral range when
    one there is free (no outgoing connection can take it meanwhile), else the kernel's pick.
    ``start_server`` still retries a port lost before the bind."""
    low = ephemeral_range()[0]
    candidates = list(range(max(1024, low - PICK_SPAN), low))
    for port in random.sample(candidates, min(32, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SettingsError(
                f"evaluation.server.port: {host}:{port} is already in use ({exc.strerror}). "
                "Stop what holds it, choose another port, or leave the port unset to take a "
                "free one."
            ) from None


def build_command(
    python: Path, model: str, cfg: ServerSettings, served_name: str, port: int,
    revision: str | None = None, on_gpu: bool = False,
) -> list[str]:
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", served_name,
        "--host", cfg.host, "--port", str(port),
        "--max-model-len", str(cfg.max_model_len),
        "--max-num-seqs", str(cfg.max_num_seqs),
        "--disable-uvicorn-access-log",
    ]
    if revision:
        cmd += ["--revision", revision]
    if cfg.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
    flags = effective_flags(cfg, on_gpu)
    if flags["gpu_memory_utilization"] is not None:
        cmd += ["--gpu-memory-utilization", str(flags["gpu_memory_utilization"])]
    if flags["enforce_eager"]:
        cmd.append("--enforce-eager")
    if flags["dtype"] is not None:
        cmd += ["--dtype", flags["dtype"]]
    return cmd + list(cfg.extra_args)


def effective_flags(cfg: ServerSettings, on_gpu: bool) -> dict[str, Any]:
    """The flags a server is started with that requant chooses from where it runs, not from
    the settings alone: eager mode (on unless on a GPU), the dtype (float32 on a CPU without
    native bf16), the GPU memory share (on a GPU only). What an evaluation records, so two
    records compare only if their servers really ran alike."""
    return {"on_gpu": on_gpu,
            "enforce_eager": cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu,
            "dtype": serving_dtype(cfg, on_gpu),
            "gpu_memory_utilization": cfg.gpu_memory_utilization if on_gpu else None}


def serving_dtype(cfg: ServerSettings, on_gpu: bool) -> str | None:
    """float32 on a CPU without native bf16 (4.5x faster there than vLLM's emulated bf16);
    None keeps the checkpoint's dtype. A --dtype in extra_args wins."""
    if on_gpu or any(a.split("=", 1)[0] == "--dtype" for a in cfg.extra_args):
        return None
    from requant.quantization.hardware import cpu_has_native_bf16

    return None if cpu_has_native_bf16() else "float32"


def cpu_defaults(on_gpu: bool) -> dict[str, str]:
    """On a CPU host vLLM runs its one worker in a process of its own, which imports torch and
    vLLM a third time: ~14 s of every start on 2 cores. In the engine's process it starts that
    much sooner, answers the same, and is as fast (benchmarks/bench_server_start.py,
    docs/evaluation.md). ``server.env`` may set it back."""
    return {} if on_gpu else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no server log at {path})"
    return f"last {min(lines, len(text))} lines of {path}:\n" + "\n".join(text[-lines:])


def _note(log_path: Path, message: str) -> None:
    """A line in the server's log, where its start-up is followed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as fh:
        fh.write(message + "\n")


PORT_ATTEMPTS = 3  # a port we picked ourselves, lost to another process before the bind


def start_server(
    model: str | Path,
    cfg: ServerSettings,
    log_path: Path,
    *,
    served_name: str,
    revision: str | None = None,
    on_gpu: bool = False,
    die_with_parent: bool = True,
    keep_running: bool = False,
    on_spawn: Callable[[ServerHandle], None] | None = None,
) -> ServerHandle:
    """Launch the server and wait until it is ready; on any failure it is stopped again.

    ``die_with_parent=False`` is for servers that must outlive this process (a rollout's new
    revision); the rollout records their pid in ``on_spawn``, called right after the process
    exists and before the minutes of waiting for it, so a crashed rollout's server is reaped by
    the next one whenever the crash comes. ``keep_running`` puts a keeper
    (``requant.serving.keeper``) in front: the recorded pid is the keeper's, and a server that
    dies after it was ready is started again on the same port.

    With no port set we pick a free one, and between that pick and vLLM's bind any process on
    the host may take it (an outgoing connection's ephemeral port, another server): that loss
    alone is retried on a newly picked port. A port the settings chose is checked once and never
    changed, since something outside points at it."""
    python = serving_python(cfg)
    if on_gpu:  # vLLM refuses to start unless its whole share is free: wait for it
        total = (gpu_memory() or (0, 0))[1]
        wait_for_gpu_memory(int(cfg.gpu_memory_utilization * total), f"vLLM for {served_name}",
                            cfg.startup_timeout_s, lambda message: _note(log_path, message))
    if cfg.port:
        check_port_free(cfg.host, cfg.port)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = cfg.port or free_port(cfg.host)
        cmd = build_command(python, str(model), cfg, served_name, port, revision, on_gpu)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_start = log_path.stat().st_size if log_path.exists() else 0
        try:
            return _launch(cmd, f"http://{cfg.host}:{port}", cfg, log_path, served_name,
                           on_gpu=on_gpu, die_with_parent=die_with_parent,
                           keep_running=keep_running, on_spawn=on_spawn)
        except ServerError:
            if cfg.port or attempt == PORT_ATTEMPTS or not _lost_port(log_path, log_start):
                raise
            _note(log_path, f"[requant] port {port} was taken before the server bound it "
                            f"(attempt {attempt} of {PORT_ATTEMPTS}): starting on another")
    raise AssertionError("unreachable")


def _lost_port(log_path: Path, since: int) -> bool:
    """True when this attempt's part of the log ends in a failed bind."""
    with log_path.open("rb") as fh:
        fh.seek(since)
        return b"Address already in use" in fh.read()


def _launch(
    cmd: list[str], base_url: str, cfg: ServerSettings, log_path: Path, served_name: str, *,
    on_gpu: bool, die_with_parent: bool, keep_running: bool,
    on_spawn: Callable[[ServerHandle], None] | None,
) -> ServerHandle:
    keeper_status = log_path.with_name(log_path.stem + ".keeper.json") if keep_running else None
    launched = cmd if keeper_status is None else keeper_command(
        sys.executable, cmd, f"{base_url}/health", keeper_status)
    delta = {**cpu_defaults(on_gpu), **cfg.env, "PYTHONUNBUFFERED": "1"}
    env = {**os.environ, **delta}
    env.pop("PREFECT_API_URL", None)  # the server has no business with our orchestrator
    log = log_path.open("ab")
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    started = time.monotonic()
    process = subprocess.Popen(
        launched, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True,  # its own process group: stop_server signals all of it
        preexec_fn=kill_with_parent if die_with_parent and sys.platform.startswith("linux")
        else None,
    )
    log.close()
    handle = ServerHandle(base_url, served_name, log_path, process, command=cmd,
                          keeper_status=keeper_status, launched=launched, env=delta)
    try:
        if on_spawn is not None:
            on_spawn(handle)
        wait_ready(handle, cfg.startup_timeout_s)
    except BaseException:
        stop_server(handle, cfg.stop_grace_s)
        raise
    handle.startup_s = round(time.monotonic() - started, 1)
    return handle


def wait_ready(handle: ServerHandle, timeout_s: float) -> None:
    """Ready means /health answers 200 and /v1/models lists the served name."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while True:
            handle.check_alive()
            if not_ready_reason(client, handle.base_url, handle.served_model_name) is None:
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"vLLM server for {handle.served_model_name} was not ready after "
                    f"{timeout_s:.0f} s (evaluation.server.startup_timeout_s).\n"
                    f"{log_tail(handle.log_path)}"
                )
            time.sleep(1)


def stop_server(handle: ServerHandle, grace_s: float = 30.0) -> None:
    """SIGTERM to the whole process group, then SIGKILL after the grace period."""
    proc = handle.process

    def wait_leader(timeout_s: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)

    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:  # already exited and reaped: no group left to signal
        wait_leader(grace_s)
        return
    terminate_group(pgid, grace_s, wait_leader)


@contextlib.contextmanager
def running_server(
    model: str | Path, cfg: ServerSettings, log_path: Path, *, served_name: str,
    revision: str | None = None, on_gpu: bool = False,
) -> Iterator[ServerHandle]:
    handle = start_server(model, cfg, log_path, served_name=served_name, revision=revision,
                          on_gpu=on_gpu)
    try:
        yield handle
    finally:
        stop_server(handle, cfg.stop_grace_s)
