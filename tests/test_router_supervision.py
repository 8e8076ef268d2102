"""The local router under a real supervisord: back within seconds after kill -9, still serving
after its supervisor dies, and shown in `requant status`. Real router, real supervisord."""

from __future__ import annotations

import os
import signal
import time

import pytest

from requant.processes import pid_running
from requant.rollout.local import ensure_router, router_status, router_token, shutdown_local
from requant.serving.server import free_port
from requant.serving.supervision import supervision
from requant.settings import PipelineSettings
from requant.status import local_status, render_status
from tests.conftest import processes_mentioning, wait_until


@pytest.fixture
def local(tmp_path):
    settings = PipelineSettings.model_validate({"rollout": {
        "target": "local", "state_dir": str(tmp_path / "state"),
        "local": {"port": free_port()}}})
    try:
        yield settings, ensure_router(settings, lambda _m: None)
    finally:
        shutdown_local(settings)


def test_a_router_killed_with_kill_9_is_back_within_seconds_serving_the_same_backend(local):
    import httpx

    settings, url = local
    httpx.put(f"{url}/-/backend", json={"url": "http://127.0.0.1:9", "revision": "rev-a"},
              headers={"Authorization": f"Bearer {router_token(settings)}"}, timeout=10
              ).raise_for_status()
    first = router_status(url)["pid"]
    os.kill(first, signal.SIGKILL)
    killed = time.monotonic()

    def restarted():
        status = router_status(url, timeout_s=1)
        return status if status and status["pid"] != first else None

    back = wait_until(restarted, 10, "the router answering again")
    assert time.monotonic() - killed < 10
    assert (back["backend"], back["revision"]) == ("http://127.0.0.1:9", "rev-a")  # persisted
    assert not pid_running(first)


def test_the_endpoint_stays_up_when_supervisord_dies_and_the_next_rollout_supervises_it_again(
        local):
    from pathlib import Path

    settings, url = local
    folder = Path(settings.rollout.state_dir) / "local"
    assert supervision(folder).state == "RUNNING"
    supervisord = int((folder / "supervisord.pid").read_text())
    os.kill(supervisord, signal.SIGKILL)
    wait_until(lambda: supervision(folder).state == "no supervisor", 10,
               "supervisorctl seeing supervisord gone")
    assert router_status(url) is not None  # the router is its own process: still serving
    # the guardian goes with its supervisor: the next one does not find a second one running
    wait_until(lambda: processes_mentioning("requant.rollout.guardian", str(folder.resolve()))
               == [], 10, "the guardian gone with supervisord")
    assert "supervisord: no supervisor" in render_status(
        {"serving": {"target": "local", **local_status(settings)}, "last_published": None,
         "runs": []})
    ensure_router(settings, lambda _m: None)
    assert supervision(folder).state == "RUNNING"
    assert router_status(url)["pid"] == int(supervision(folder).detail.split()[1].rstrip(","))
    guardians = wait_until(lambda: processes_mentioning("requant.rollout.guardian",
                                                        str(folder.resolve())), 10,
                           "the guardian under the new supervisord")
    assert len(guardians) == 1


def test_status_shows_the_router_supervised_and_shutdown_leaves_nothing_running(local):
    from pathlib import Path

    settings, url = local
    folder = Path(settings.rollout.state_dir) / "local"
    status = local_status(settings)
    assert status["router"]["supervisor"]["state"] == "RUNNING"
    assert "supervisord: RUNNING, pid" in render_status(
        {"serving": {"target": "local", **status}, "last_published": None, "runs": []})
    router_pid = router_status(url)["pid"]
    supervisord = int((folder / "supervisord.pid").read_text())
    shutdown_local(settings)
    wait_until(lambda: not pid_running(router_pid) and not pid_running(supervisord), 15,
               "router and supervisord stopped")
    assert router_status(url, timeout_s=1) is None


def test_the_systemd_unit_runs_the_router_command_requant_runs_and_always_restarts():
    import argparse
    import shlex
    from pathlib import Path

    from requant.serving import router

    unit = (Path(__file__).resolve().parents[1] / "deployments" / "systemd" /
            "requant-router.service").read_text()
    fields = dict(line.split("=", 1) for line in unit.splitlines()
                  if "=" in line and not line.startswith("#"))
    assert fields["Restart"] == "always" and float(fields["RestartSec"]) <= 2
    argv = shlex.split(fields["ExecStart"])
    assert argv[1:3] == ["-m", "requant.serving.router"]
    parsed = router.parser().parse_args(argv[3:])
    assert isinstance(parsed, argparse.Namespace) and parsed.token_file.name == "router.token"


def test_an_external_supervisor_that_runs_no_router_is_a_clear_error(tmp_path):
    from requant.errors import SettingsError

    settings = PipelineSettings.model_validate({"rollout": {
        "target": "local", "state_dir": str(tmp_path / "state"),
        "local": {"port": free_port(), "supervisor": "external"}}})
    with pytest.raises(SettingsError, match=r"rollout\.local\.supervisor is external.*systemctl"):
        ensure_router(settings, lambda _m: None)
    assert not (tmp_path / "state" / "local" / "supervisord.conf").exists()  # none started


def test_a_relative_state_dir_with_a_space_and_a_percent_sign_starts_the_router(
        tmp_path, monkeypatch):
    """The shipped default is relative (.cache/requant/rollout): supervisord reads some paths
    against its own directory, and expands % in its values; settings resolve it absolutely and
    the config escapes it, so the router starts wherever the command runs."""
    import httpx

    from requant.settings import load_settings

    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, ["rollout.state_dir=my runs/100% state",
                                    f"rollout.local.port={free_port()}"])
    assert settings.rollout.state_dir == tmp_path / "my runs" / "100% state"
    try:
        url = ensure_router(settings, lambda _m: None)
        assert httpx.get(f"{url}/-/status", timeout=5).json()["backend"] is None
        assert supervision(settings.rollout.state_dir / "local").state == "RUNNING"
    finally:
        shutdown_local(settings)
