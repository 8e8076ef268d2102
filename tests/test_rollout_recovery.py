"""What a killed local rollout leaves, and what the next rollout makes of it: the state is
written ahead of each step, and recovery reads what the router really serves. Real router
process, real server processes (stand-ins that answer HTTP: no model is needed to prove who is
routed to and who gets stopped)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from requant.processes import pid_running, stop_process_group
from requant.rollout.local import (
    ensure_router,
    recover,
    router_status,
    router_token,
    shutdown_local,
    switch_router,
)
from requant.rollout.state import Deployed, DeployState, Release, load_state, save_state
from requant.serving.server import free_port
from requant.settings import PipelineSettings

STAND_IN = ("import sys, http.server as h; h.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[2])), "
            "h.SimpleHTTPRequestHandler).serve_forever()")


def stand_in_server(tmp_path: Path) -> dict:
    port = free_port()
    # ``--port N`` on its command line, as a keeper's or vLLM's: rollouts stop a recorded pid
    # only when it still runs a server on the recorded port
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=1)
            return {"pid": proc.pid, "url": url}
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("stand-in server did not start") from None
            time.sleep(0.1)


@pytest.fixture
def local(tmp_path):
    settings = PipelineSettings.model_validate({"rollout": {
        "target": "local", "state_dir": str(tmp_path / "state"),
        "local": {"port": free_port(), "drain_timeout_s": 5,
                  "server": {"stop_grace_s": 2}}}})
    servers: list[dict] = []
    try:  # whatever fails while setting up, nothing is left running
        url = ensure_router(settings, lambda _m: None)
        servers += [stand_in_server(tmp_path), stand_in_server(tmp_path)]
        blue, green = servers
        state = DeployState("local")
        state.active = Deployed(Release("rev-blue"), "t0", "f1", url, blue)
        save_state(settings.rollout.state_dir, state)
        switch_router(url, blue["url"], "rev-blue", router_token(settings))
        yield settings, url, blue, green
    finally:
        shutdown_local(settings)
        for server in servers:
            stop_process_group(server["pid"], 2)


def killed_after(settings, url, green, *, switched: bool) -> DeployState:
    """The state a rollout leaves when killed after recording `pending` (and, if `switched`,
    after switching the router but before recording the result)."""
    state = load_state(settings.rollout.state_dir, "local")
    state.pending = Deployed(Release("rev-green"), "t1", "f2", url, green)
    save_state(settings.rollout.state_dir, state)
    if switched:
        switch_router(url, green["url"], "rev-green", router_token(settings))
    return load_state(settings.rollout.state_dir, "local")


def recovered(settings, url, state: DeployState) -> DeployState:
    """What the next rollout's recovery makes of ``state``, as saved."""
    recover(settings, state, url, "f3", lambda _m: None)
    return load_state(settings.rollout.state_dir, "local")


def test_killed_between_switch_and_record_the_serving_server_is_kept_and_the_old_retired(local):
    settings, url, blue, green = local
    saved = recovered(settings, url, killed_after(settings, url, green, switched=True))
    assert saved.active.release.revision == "rev-green" and saved.pending is None
    assert saved.previous.release.revision == "rev-blue"
    assert pid_running(green["pid"])  # the server that serves was not "reaped"
    assert not pid_running(blue["pid"])  # the old one drained and stopped
    assert router_status(url)["backend"] == green["url"]
    assert saved.history[-1]["event"] == "deployed"


def test_killed_before_the_switch_the_new_server_is_reaped_and_the_old_keeps_serving(local):
    settings, url, blue, green = local
    saved = recovered(settings, url, killed_after(settings, url, green, switched=False))
    assert saved.active.release.revision == "rev-blue" and saved.pending is None
    assert not pid_running(green["pid"]) and pid_running(blue["pid"])
    assert router_status(url)["backend"] == blue["url"]
    assert saved.history[-1]["event"] == "reaped"


def test_killed_after_the_record_before_stopping_the_old_server_it_is_stopped_next_time(local):
    settings, url, blue, green = local
    state = killed_after(settings, url, green, switched=True)
    state.previous, state.active, state.pending = state.active, state.pending, None
    save_state(settings.rollout.state_dir, state)  # recorded, then killed before the stop
    recovered(settings, url, load_state(settings.rollout.state_dir, "local"))
    assert not pid_running(blue["pid"]) and pid_running(green["pid"])


def test_killed_while_the_old_server_was_warm_and_the_new_one_then_died_the_old_serves_again(
        local):
    settings, url, blue, green = local
    state = killed_after(settings, url, green, switched=True)
    state.previous, state.active, state.pending = state.active, state.pending, None
    save_state(settings.rollout.state_dir, state)  # recorded; blue kept warm; then killed
    stop_process_group(green["pid"], 2)  # and the new server died after it
    saved = recovered(settings, url, load_state(settings.rollout.state_dir, "local"))
    assert saved.active.release.revision == "rev-blue" and saved.previous is None
    assert pid_running(blue["pid"])  # not "retired": it is what can serve
    assert router_status(url)["backend"] == blue["url"]
    assert saved.history[-1]["event"] == "rolled-back"
