"""Server plumbing that needs no model: commands, ports, environments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from requant.errors import SettingsError
from requant.serving.server import (
    ServerHandle,
    build_command,
    check_port_free,
    serving_python,
    stop_server,
)
from requant.settings import ServerSettings


def test_command_carries_the_seed_serve_knobs():
    cfg = ServerSettings(max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=4096,
                         extra_args=["--seed", "0"])
    cmd = build_command(Path("/py"), "/ckpt", cfg, "llama3-w8a8", 8123, revision="abc",
                        on_gpu=True)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--model /ckpt", "--served-model-name llama3-w8a8", "--port 8123",
                 "--max-model-len 2048", "--max-num-seqs 32", "--max-num-batched-tokens 4096",
                 "--revision abc", "--gpu-memory-utilization 0.9"):
        assert part in joined
    assert "--enforce-eager" not in cmd  # compiled on GPU by default
    assert cmd[-2:] == ["--seed", "0"]


def test_cpu_servers_run_eager_by_default_and_never_get_gpu_flags():
    cmd = build_command(Path("/py"), "/ckpt", ServerSettings(), "m", 1, on_gpu=False)
    assert "--enforce-eager" in cmd
    assert "--gpu-memory-utilization" not in cmd
    cmd = build_command(Path("/py"), "/ckpt", ServerSettings(enforce_eager=False), "m", 1)
    assert "--enforce-eager" not in cmd


def test_cpu_servers_start_with_the_worker_in_the_engine_process_unless_server_env_says_not(
        tmp_path, monkeypatch):
    from requant.serving.server import running_server
    from tests.standin_vllm import standin_python

    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(standin_python(tmp_path / "py")))
    monkeypatch.setenv("STANDIN_STARTUP_S", "0")

    def server_environ(cfg: ServerSettings, on_gpu: bool) -> dict[str, str]:
        with running_server("/ckpt", cfg, tmp_path / "server.log", served_name="m",
                            on_gpu=on_gpu) as server:
            raw = Path(f"/proc/{server.process.pid}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    fast = ServerSettings(startup_timeout_s=30, stop_grace_s=5)
    assert server_environ(fast, on_gpu=False)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    own = fast.model_copy(update={"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}})
    assert server_environ(own, on_gpu=False)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_a_picked_port_taken_before_the_bind_is_retried_on_another_and_only_that_is_retried(
        tmp_path, monkeypatch):
    """The race CI lost once: our free port, taken by another process before the server bound
    it. Three starts at most; a server that fails for any other reason starts once."""
    import requant.serving.server as server_module
    from requant.errors import ServerError
    from tests.standin_vllm import standin_python

    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(standin_python(tmp_path / "py")))
    monkeypatch.setenv("STANDIN_STARTUP_S", "0")
    real_free_port = server_module.free_port
    cfg = ServerSettings(startup_timeout_s=30, stop_grace_s=5)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(server_module, "free_port",
                            lambda host="127.0.0.1": next(picks, None) or real_free_port(host))
        log = tmp_path / "raced.log"
        handle = server_module.start_server("/ckpt", cfg, log, served_name="m",
                                            keep_running=True)
        try:
            assert handle.base_url != f"http://127.0.0.1:{taken}"
            assert handle.alive()
        finally:
            stop_server(handle, 5)
        text = log.read_text()
        assert f"port {taken} was taken before the server bound it (attempt 1 of 3)" in text
        assert text.count("$ ") == 2

        monkeypatch.setattr(server_module, "free_port", lambda host="127.0.0.1": taken)
        with pytest.raises(ServerError, match="Address already in use"):
            server_module.start_server("/ckpt", cfg, tmp_path / "lost.log", served_name="m")
        assert (tmp_path / "lost.log").read_text().count("$ ") == 3

    monkeypatch.setattr(server_module, "free_port", real_free_port)
    broken = cfg.model_copy(update={"extra_args": ["--port", "not-a-port"]})  # exits 2
    with pytest.raises(ServerError, match="exited with code 2"):
        server_module.start_server("/ckpt", broken, tmp_path / "broken.log", served_name="m")
    assert (tmp_path / "broken.log").read_text().count("$ ") == 1


def test_picked_ports_are_free_and_outside_the_range_outgoing_connections_take_theirs():
    from requant.serving.server import ephemeral_range, free_port

    low, high = ephemeral_range()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        picks = {free_port() for _ in range(20)}
    assert taken not in picks
    assert all(port < low or port > high for port in picks), (picks, low, high)
    for port in picks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free, as promised


def test_port_in_use_is_refused_before_anything_starts():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SettingsError, match=rf"evaluation\.server\.port: 127\.0\.0\.1:{port} is already in use"):
            check_port_free("127.0.0.1", port)


def test_missing_serving_environment_names_the_setting_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("REQUANT_SERVING_PYTHON", raising=False)
    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(SettingsError, match=r"serving environment: no Python at .*make serving-env"):
        serving_python(ServerSettings())


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    """The stop path itself, on a process that ignores SIGTERM (as a hung server would)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
         " print('up', flush=True); time.sleep(600)  # requant-stubborn"],
        start_new_session=True, stdout=subprocess.PIPE)
    proc.stdout.readline()
    handle = ServerHandle("http://127.0.0.1:1", "requant-stubborn", tmp_path / "log", proc)
    started = time.monotonic()
    stop_server(handle, grace_s=1)
    assert proc.poll() == -signal.SIGKILL
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_a_server_its_keeper_restarted_is_not_unbroken_though_it_is_alive(tmp_path):
    """A rollout judges a new server by ``unbroken``: a crash its keeper hid by restarting it
    mid-phase must still end the phase (the canary's test kills real vLLM for this)."""
    import json

    from requant.serving.server import ServerHandle

    status = tmp_path / "server.keeper.json"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        handle = ServerHandle("http://127.0.0.1:1", "m", tmp_path / "log", proc,
                              keeper_status=status)
        assert handle.unbroken()  # no record yet: a keeper still starting its server
        status.write_text(json.dumps({"state": "serving", "restarts": 0}))
        assert handle.unbroken()
        status.write_text(json.dumps({"state": "serving", "restarts": 1}))
        assert handle.alive() and not handle.unbroken()
        status.write_text(json.dumps({"state": "serving", "restarts": 0}))
        proc.kill()
        proc.wait(10)
        assert not handle.unbroken()
    finally:
        proc.kill()
