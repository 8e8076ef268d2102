"""The serving revision's model server heals itself: a ``kill -9`` of the server alone is
followed by the same server on the same port, with the router answering 503 + Retry-After only
in the gap, and the nightly's no-op check asks the server rather than the record.

Real router under supervisord, real keeper processes; the model server is the stand-in
(tests/standin_vllm.py, through REQUANT_SERVING_PYTHON, as the operator points it at a serving
environment). The same restart on real vLLM: test_rollout_local."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from requant.processes import pid_running, stop_leaderless_group, stop_process_group
from requant.rollout.local import rollout_local, shutdown_local
from requant.rollout.release import resolve_release
from requant.rollout.state import load_state
from requant.serving.keeper import adopting, keeper_command, read_status
from requant.serving.router import REVISION_HEADER
from requant.serving.server import free_port
from requant.settings import PipelineSettings
from requant.status import collect_status, render_status
from tests.conftest import ClientLoad, processes_mentioning, wait_until
from tests.standin_vllm import standin_python


def chat(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=10, json={
        "model": "tiny-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A checkpoint rolled out on the local target (stand-in server, started in ~1 s)."""
    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(standin_python(tmp_path / "env" / "bin")))
    monkeypatch.setenv("STANDIN_STARTUP_S", "1")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    settings = PipelineSettings.model_validate({"rollout": {
        "target": "local", "served_model_name": "tiny-chat", "state_dir": str(tmp_path / "st"),
        "local": {"port": free_port(), "keep_previous_s": 0, "drain_timeout_s": 5,
                  "server": {"startup_timeout_s": 5, "stop_grace_s": 2}},
        "slo": {"requests": 4, "concurrency": 2, "max_tokens": 4}}})
    release = resolve_release(settings, checkpoint=model)
    try:
        deployed, _ = rollout_local(settings, release, "run-1", log=lambda _m: None)
        yield settings, release, deployed, f"http://127.0.0.1:{settings.rollout.local.port}"
    finally:
        shutdown_local(settings)
    assert processes_mentioning(str(tmp_path)) == []


def test_a_killed_serving_server_is_restarted_on_its_port_and_the_router_serves_it_again(
        served):
    settings, release, deployed, url = served
    keeper_pid = int(deployed.server["pid"])
    first = read_status(deployed.server["keeper"])
    assert first["state"] == "serving" and first["restarts"] == 0
    assert chat(url).status_code == 200
    os.kill(first["server_pid"], signal.SIGKILL)  # the server alone, not its keeper
    gap = wait_until(lambda: (r := chat(url)).status_code == 503 and r, 10, "a 503 in the gap")
    assert gap.headers["Retry-After"] and "retry shortly" in gap.json()["error"]
    back = wait_until(lambda: (r := chat(url)).status_code == 200 and r, 30, "served again")
    assert back.headers[REVISION_HEADER] == release.revision
    after = wait_until(lambda: (r := read_status(deployed.server["keeper"]))["state"] == "serving"
                     and r, 10, "the keeper's record: serving again")
    assert after["restarts"] == 1
    assert after["server_pid"] != first["server_pid"] and after["last_exit"]["code"] == 137
    state = load_state(settings.rollout.state_dir, "local")
    assert int(state.active.server["pid"]) == keeper_pid and state.pending is None
    status = collect_status(settings)["serving"]["server"]
    assert status["answers"] is True and status["keeper"]["restarts"] == 1
    assert "answering, restarted 1 time(s), last exit 137" in render_status(
        collect_status(settings))
    # the nightly's check asks the process: it serves, so nothing is rolled out again
    assert rollout_local(settings, release, "run-2", log=lambda _m: None)[1] is False


def test_a_serving_server_that_does_not_answer_is_not_taken_as_serving_by_the_nightly(served):
    settings, release, deployed, url = served
    stuck = read_status(deployed.server["keeper"])["server_pid"]
    os.kill(stuck, signal.SIGSTOP)  # alive on record and by pid, answering nothing
    try:
        status = collect_status(settings)["serving"]["server"]
        assert status["alive"] is True and status["answers"] is False
        redeployed, changed = rollout_local(settings, release, "run-2", log=lambda _m: None)
    finally:
        if pid_running(stuck):
            os.kill(stuck, signal.SIGCONT)
    assert changed and redeployed.server["pid"] != deployed.server["pid"]
    assert chat(url).status_code == 200
    assert not pid_running(int(deployed.server["pid"])) and not pid_running(stuck)


def keeper(tmp_path: Path, server: list[str], **kw) -> tuple[subprocess.Popen, Path]:
    """A keeper of ``server`` (``adopt``: the pid of a running one it takes over)."""
    status = tmp_path / "keeper.json"
    port = kw.get("port", free_port())
    command = keeper_command(sys.executable, server, f"http://127.0.0.1:{port}/", status,
                             kw.get("max_failed_starts", 3))
    proc = subprocess.Popen(adopting(command, kw["adopt"]) if kw.get("adopt") else command,
                            start_new_session=True, stdout=subprocess.DEVNULL)
    return proc, status


def ready_server(status: Path) -> int:
    """The keeper's server pid, once its record says it serves."""
    return wait_until(lambda: (read_status(status) or {}).get("state") == "serving"
                      and read_status(status)["server_pid"], 20, "the server ready")


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_a_server_that_never_became_ready_is_not_restarted(tmp_path):
    proc, status = keeper(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])
    assert proc.wait(30) == 3
    record = json.loads(status.read_text())
    assert record["state"] == "gave-up" and record["starts"] == 1 and record["restarts"] == 0


def test_stopping_the_keepers_group_stops_the_server_without_a_restart(tmp_path):
    port = free_port()
    proc, status = keeper(tmp_path, http_server(port), port=port)
    server = ready_server(status)
    stop_process_group(proc.pid, grace_s=5)
    assert proc.wait(5) == 0 and not pid_running(server)
    record = read_status(status)
    assert record["state"] == "stopped" and record["restarts"] == 0


def test_a_killed_keeper_leaves_its_server_answering_and_a_stop_of_its_group_still_ends_it(
        tmp_path):
    port = free_port()
    proc, status = keeper(tmp_path, http_server(port), port=port)
    server = ready_server(status)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    # the group is named by the dead keeper's pid: a stop of the recorded pid still ends it
    stop_leaderless_group(proc.pid, grace_s=5, expect=("--bind", "127.0.0.1"))
    wait_until(lambda: not pid_running(server), 10, "the server stopped")


def test_a_keeper_adopts_a_running_server_stops_it_with_its_own_stop_and_restarts_it(tmp_path):
    """--adopt: the running server of a killed keeper is watched as the new keeper's own (its
    counts carried on); when it dies, the new keeper starts it again; its stop ends it."""
    port = free_port()
    first, status = keeper(tmp_path, http_server(port), port=port)
    server = ready_server(status)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    second, _ = keeper(tmp_path, http_server(port), port=port, adopt=server)
    try:
        record = wait_until(lambda: (r := read_status(status))["keeper_pid"] == second.pid
                            and r, 10, "the new keeper's record")
        assert record["state"] == "serving" and record["server_pid"] == server
        assert record["adopted"]["pid"] == server and record["adopted"]["group"] == first.pid
        assert record["starts"] == 1 and record["restarts"] == 0  # carried on, not restarted
        os.kill(server, signal.SIGKILL)
        again = wait_until(lambda: (r := read_status(status))["state"] == "serving"
                           and r["server_pid"] != server and r, 20, "started again")
        assert again["restarts"] == 1 and again["adopted"] is None
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
    finally:
        stop_process_group(second.pid, grace_s=5)
    assert second.wait(5) == 0 and not pid_running(again["server_pid"])


def test_a_server_that_keeps_failing_after_it_was_ready_is_given_up_after_its_failed_starts(
        tmp_path):
    port = free_port()
    # ready once, then every later start fails at once: the keeper stops trying
    marker = tmp_path / "started-once"
    script = (f"import pathlib,sys,runpy; m=pathlib.Path({str(marker)!r})\n"
              "if m.exists(): sys.exit(5)\n"
              "m.touch(); sys.argv=['http.server','" + str(port) + "','--bind','127.0.0.1']\n"
              "runpy.run_module('http.server', run_name='__main__')")
    proc, status = keeper(tmp_path, [sys.executable, "-c", script], port=port,
                          max_failed_starts=2)
    server = ready_server(status)  # ready once
    os.kill(server, signal.SIGKILL)
    assert proc.wait(30) == 1  # 0 + 2 s of back-off: ready once, then 2 failed starts
    record = read_status(status)
    assert record["state"] == "gave-up" and record["starts"] == 3 and record["restarts"] == 2
    assert record["last_exit"]["code"] == 5


def test_a_killed_keeper_never_takes_the_endpoint_down_the_guardian_adopts_its_server(served):
    """#39: kill -9 of the keeper under client load: its server keeps answering (every request
    answered), and the guardian, supervised beside the router, starts a keeper that adopts it
    and records it; the fixture's ``requant down`` then leaves no process behind."""
    from requant.rollout.guardian import read_status as guardian_status
    from requant.serving.supervision import supervision

    settings, release, deployed, url = served
    folder = Path(settings.rollout.state_dir) / "local"
    assert supervision(folder, "guardian").state == "RUNNING"
    keeper_pid = int(deployed.server["pid"])
    server = read_status(deployed.server["keeper"])["server_pid"]
    with ClientLoad(url, pause_s=0.02) as load:
        wait_until(lambda: load.ok >= 10, 20, "the clients answered before the kill")
        os.kill(keeper_pid, signal.SIGKILL)
        adopted = wait_until(lambda: (r := read_status(deployed.server["keeper"]))
                             and r["keeper_pid"] != keeper_pid and r["adopted"] and r, 30,
                             "the guardian's keeper adopting the server")
        answered = load.ok
        wait_until(lambda: load.ok >= answered + 10, 20, "the clients answered after it")
    assert load.failures == [] and set(load.revisions) == {release.revision}
    assert adopted["server_pid"] == server and adopted["state"] == "serving"
    state = load_state(settings.rollout.state_dir, "local")
    new_pid = int(state.active.server["pid"])
    assert new_pid == adopted["keeper_pid"] and pid_running(new_pid) and pid_running(server)
    assert state.active.server["adopted_group"] == keeper_pid
    assert state.history[-1]["event"] == "kept" and "adopted" in state.history[-1]["reason"]
    said = wait_until(lambda: (g := guardian_status(folder)) and g["restarts"] == 1 and g, 10,
                      "the guardian's record")
    assert said["last"]["old_pid"] == keeper_pid and said["last"]["adopted"] == server
    assert "guardian: started the keeper again 1 time(s)" in render_status(
        collect_status(settings))


def test_an_adopted_server_that_dies_is_started_again_by_its_new_keeper(served):
    _settings, release, deployed, url = served
    keeper_pid = int(deployed.server["pid"])
    server = read_status(deployed.server["keeper"])["server_pid"]
    os.kill(keeper_pid, signal.SIGKILL)
    wait_until(lambda: (r := read_status(deployed.server["keeper"])) and r["adopted"], 30,
               "adopted")
    os.kill(server, signal.SIGKILL)
    back = wait_until(lambda: (r := chat(url)).status_code == 200 and r, 30, "served again")
    assert back.headers[REVISION_HEADER] == release.revision
    record = read_status(deployed.server["keeper"])
    assert record["server_pid"] != server and record["restarts"] == 1
    assert not pid_running(server)


def test_a_keeper_that_gave_up_is_not_restarted_and_status_names_the_fix(served):
    from requant.rollout.guardian import read_status as guardian_status

    settings, release, deployed, _url = served
    folder = Path(settings.rollout.state_dir) / "local"
    keeper_pid = int(deployed.server["pid"])
    os.kill(keeper_pid, signal.SIGSTOP)  # alive to the guardian while its record is changed
    record = read_status(deployed.server["keeper"])
    Path(deployed.server["keeper"]).write_text(json.dumps(record | {"state": "gave-up"}))
    os.kill(keeper_pid, signal.SIGKILL)
    said = wait_until(lambda: (g := guardian_status(folder)) and g["state"] == "gave-up" and g,
                    20, "the guardian's refusal")
    assert "gave up" in said["why"] and said["fix"] == \
        f"requant promote --checkpoint {release.checkpoint}"
    assert int(load_state(settings.rollout.state_dir, "local").active.server["pid"]) == \
        keeper_pid  # nothing started, nothing recorded
    text = render_status(collect_status(settings))
    assert "GUARDIAN GAVE UP" in text and said["fix"] in text


def test_a_guardian_killed_with_kill_9_is_restarted_by_its_supervisor(served):
    from requant.serving.supervision import supervision

    settings, _release, _deployed, _url = served
    folder = Path(settings.rollout.state_dir) / "local"
    before = supervision(folder, "guardian").detail  # "pid N, uptime ..."
    pid = int(before.split()[1].rstrip(","))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (s := supervision(folder, "guardian")).state == "RUNNING"
             and f"pid {pid}," not in s.detail, 20, "a new guardian")
