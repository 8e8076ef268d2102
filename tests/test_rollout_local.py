"""Local blue/green with real vLLM servers (serving env, CPU) behind the real router process.

One module-scoped deployment: revision A is deployed first, then every test rolls out under a
constant client load through the stable endpoint and checks that no client request failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from requant.errors import RolloutFailed
from requant.processes import pid_running
from requant.rollout.local import rollout_local, shutdown_local
from requant.rollout.release import resolve_release
from requant.rollout.state import load_state
from requant.serving.keeper import read_status
from requant.serving.server import free_port
from requant.settings import PipelineSettings
from tests.conftest import ClientLoad, needs_vllm, processes_mentioning, tiny_server_settings

pytestmark = [pytest.mark.slow, needs_vllm]


def local_settings(state_dir: Path, port: int, keep_previous_s: float = 3,
                   **slo) -> PipelineSettings:
    return PipelineSettings.model_validate({
        "rollout": {
            "target": "local", "served_model_name": "tiny-chat", "state_dir": str(state_dir),
            "local": {"port": port, "server": tiny_server_settings().model_dump(),
                      "drain_timeout_s": 60, "keep_previous_s": keep_previous_s},
            "slo": {"requests": 64, "concurrency": 64, "max_tokens": 64,
                    "max_p95_latency_s": 120, **slo},
        },
    })


def served_root(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["root"]


@pytest.fixture(scope="module")
def deployment(vllm_tiny_source, vllm_tiny_w8a8, tmp_path_factory):
    """Revision A (the bf16 tiny model) deployed; torn down (servers and router) at the end."""
    state_dir = tmp_path_factory.mktemp("rollout-state")
    settings = local_settings(state_dir, free_port())
    a = resolve_release(settings, checkpoint=vllm_tiny_source)
    rollout_local(settings, a, "test-run-a")
    yield settings, a
    shutdown_local(settings)
    assert processes_mentioning(str(state_dir)) == []


def test_rollout_a_to_b_under_client_load_fails_no_request_and_ends_served_by_b(
        deployment, vllm_tiny_w8a8):
    settings, a = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    assert served_root(url) == a.checkpoint
    b = resolve_release(settings, checkpoint=vllm_tiny_w8a8)
    old_pid = load_state(settings.rollout.state_dir, "local").active.server["pid"]
    with ClientLoad(url) as load:
        time.sleep(2)
        deployed, changed = rollout_local(settings, b, "test-run-b")
        time.sleep(2)
    assert changed and deployed.release == b
    assert load.failures == []
    assert load.ok > 20 and load.revisions[0] == a.revision and load.revisions[-1] == b.revision
    assert served_root(url) == b.checkpoint  # the weights answering now are B's
    assert not pid_running(old_pid)  # A was drained and stopped
    state = load_state(settings.rollout.state_dir, "local")
    assert state.active.release == b and state.previous.release == a
    assert state.active.flow_run_id == "test-run-b" and state.pending is None
    assert state.active.verification["load"]["errors"] == 0
    assert state.active.verification["load"]["requests"] == 64


def test_rollout_of_a_broken_checkpoint_rolls_back_with_no_failed_request(
        deployment, vllm_tiny_source, tmp_path):
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    broken = tmp_path / "broken"
    shutil.copytree(vllm_tiny_source, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with ClientLoad(url) as load, pytest.raises(RolloutFailed) as err:
        rollout_local(settings, resolve_release(settings, checkpoint=broken), "test-broken")
    assert err.value.check == "readiness" and "NoSuchModelForCausalLM" in str(err.value)
    assert load.failures == [] and load.ok > 0
    assert set(load.revisions) == {before.release.revision}
    assert served_root(url) == before.release.checkpoint
    after = load_state(settings.rollout.state_dir, "local")
    assert after.active.release == before.release and after.pending is None
    assert after.history[-1]["event"] == "rolled-back"
    assert processes_mentioning(str(broken)) == []


def test_rollout_missing_its_latency_slo_rolls_back_and_keeps_the_old_revision(
        deployment, vllm_tiny_source):
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    strict = local_settings(settings.rollout.state_dir, settings.rollout.local.port,
                            max_p95_latency_s=0.001)
    release = resolve_release(strict, checkpoint=vllm_tiny_source)
    with ClientLoad(url) as load, pytest.raises(RolloutFailed) as err:
        rollout_local(strict, release, "test-slo")
    assert err.value.check == "load"
    assert "rollout.slo.max_p95_latency_s" in err.value.reason
    assert err.value.report["load"]["requests"] == 64  # the load test ran and was judged
    assert load.failures == [] and set(load.revisions) == {before.release.revision}
    assert served_root(url) == before.release.checkpoint
    assert load_state(settings.rollout.state_dir, "local").active.release == before.release


def kill_mid_rollout(settings, release, run_id: str, victim, load: ClientLoad,
                     join_s: float = 300) -> tuple[int | None, dict[str, BaseException], bool]:
    """Run a rollout on a thread under ``load``; SIGKILL the server ``victim(state)`` names (a
    pid, or None while it is too early). Returns (the pid killed, what the rollout raised,
    whether it finished within ``join_s``)."""
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            rollout_local(settings, release, run_id)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline:
        killed = victim(load_state(settings.rollout.state_dir, "local"))
        if killed is not None:
            os.killpg(killed, signal.SIGKILL)
        time.sleep(0.2)
    worker.join(join_s)
    return killed, outcome, not worker.is_alive()


def test_new_server_killed_during_verification_rolls_back_and_leaves_no_process(
        deployment, vllm_tiny_source):
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    release = resolve_release(settings, checkpoint=vllm_tiny_source)

    def ready_pending(state):  # ready, being verified
        p = state.pending
        return p.server["pid"] if p is not None and "startup_s" in p.server else None

    with ClientLoad(url) as load:
        killed, outcome, _ = kill_mid_rollout(settings, release, "test-kill", ready_pending,
                                              load)
    assert killed is not None, "the rollout never reached verification"
    assert isinstance(outcome.get("error"), RolloutFailed)
    assert load.failures == [] and set(load.revisions) == {before.release.revision}
    assert served_root(url) == before.release.checkpoint
    assert not pid_running(killed)
    after = load_state(settings.rollout.state_dir, "local")
    assert after.pending is None and after.active.release == before.release
    servers = [p for p in processes_mentioning(release.checkpoint)  # not the serving group
               if os.getpgid(p.pid) != after.active.server["pid"]]
    assert servers == []


def test_new_server_killed_after_the_switch_fails_over_to_the_warm_previous_and_is_undone(
        deployment, vllm_tiny_source):
    """kill -9 of the serving vLLM while the previous revision is still warm: the router sends
    requests to the previous one (only a request in flight at the kill can fail: one client,
    so at most one), the rollout fails as 'served' and the record says the previous serves."""
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    warm = local_settings(settings.rollout.state_dir, settings.rollout.local.port,
                          keep_previous_s=120)
    release = resolve_release(warm, checkpoint=vllm_tiny_source)

    def serving(state):  # switched: it serves now
        if state.active.flow_run_id != "test-failover":
            return None
        time.sleep(1)
        return state.active.server["pid"]

    with ClientLoad(url) as load:
        killed, outcome, finished = kill_mid_rollout(warm, release, "test-failover", serving,
                                                     load, join_s=60)
        time.sleep(2)
    assert killed is not None, "the rollout never switched"
    assert finished, "the rollout did not notice within 60 s"
    err = outcome.get("error")
    assert isinstance(err, RolloutFailed) and err.check == "served", outcome
    assert len(load.failures) <= 1, load.failures
    assert load.revisions[-1] == before.release.revision  # the previous revision answers
    after = load_state(settings.rollout.state_dir, "local")
    assert after.active.release == before.release and after.history[-1]["event"] == "rolled-back"
    events = (settings.rollout.state_dir / "local" / "router-events.jsonl").read_text()
    assert '"failover"' in events


def test_the_only_serving_vllm_killed_is_restarted_by_its_keeper_and_serves_again_unattended(
        deployment):
    """kill -9 of the serving vLLM alone (not its keeper) with no previous revision warm: the
    router answers 503 + Retry-After in the gap, the keeper starts the same server on the same
    port, and the same revision answers again with nobody running a promote."""
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    active = load_state(settings.rollout.state_dir, "local").active
    before = read_status(active.server["keeper"])
    assert before["state"] == "serving"
    with ClientLoad(url, pause_s=0.2) as load:
        time.sleep(1)
        os.kill(before["server_pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        while not load.failures:
            assert time.monotonic() < killed_at + 30, "the kill was not seen by any client"
            time.sleep(0.1)
        answered = load.ok
        while load.ok == answered:
            assert time.monotonic() < killed_at + 300, "not serving again within 300 s"
            time.sleep(0.2)
        print(f"kill -9 -> served again: {time.monotonic() - killed_at:.1f} s")  # -rP shows it
    refused = [f for f in load.failures if f.startswith("HTTP 503") and "retry shortly" in f]
    assert len(load.failures) - len(refused) <= 1, load.failures[:5]  # only one in flight
    assert set(load.revisions) == {active.release.revision}
    after = read_status(active.server["keeper"])
    assert after["restarts"] == before["restarts"] + 1
    assert after["server_pid"] != before["server_pid"]
    state = load_state(settings.rollout.state_dir, "local")
    assert state.active.server["pid"] == active.server["pid"] and state.pending is None



# ---- live phases on real vLLM (#26 §3): shadow and canary judged on the router's metrics ----

def phased(settings: PipelineSettings, **local: object) -> PipelineSettings:
    """The deployment's settings with live phases; judged on agreement and errors only (on two
    cores, two tiny servers' latencies are jitter, which the fast tests cover on purpose)."""
    data = settings.model_dump()
    data["rollout"]["local"] |= local
    return PipelineSettings.model_validate(data)


def released_again(checkpoint: str, dest: Path) -> Path:
    """The same weights as another release (a file added: a new revision, same answers). The
    note names ``dest``: a note the serving copy already has would give the same revision
    (a release is its files' digest), and a rollout of the serving revision has no phases."""
    shutil.copytree(checkpoint, dest)
    (dest / "NOTES.md").write_text(f"the same weights, released again as {dest.name}\n")
    return dest


def test_shadow_then_canary_on_real_vllm_record_agreement_and_promote_a_revision_that_holds(
        deployment, tmp_path):
    """The serving weights as another release (one file added): the shadow's greedy answers
    agree, recorded; the canary answers half the live requests and holds; then the switch.
    No client request fails, and clients met the new revision only from the canary on."""
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    twin = released_again(before.release.checkpoint, tmp_path / "twin")
    live = phased(settings, shadow={"seconds": 6, "min_requests": 10,
                                    "max_p95_latency_ratio": None},
                  canary={"phases": [{"weight": 0.5, "seconds": 6}], "min_requests": 5,
                          "max_p95_latency_ratio": None, "poll_s": 0.5})
    release = resolve_release(live, checkpoint=twin)
    with ClientLoad(url) as load:
        deployed, changed = rollout_local(live, release, "test-live-phases")
        time.sleep(1)
    assert changed and load.failures == []
    shadow = deployed.verification["shadow"]
    assert shadow["copies"] >= 10 and shadow["agreement"] == 1.0, shadow
    (canary,) = deployed.verification["canary"]
    assert canary["requests"] >= 5 and canary["error_rate"] == 0, canary
    first_new = load.revisions.index(release.revision)
    assert before.release.revision in load.revisions[first_new:]  # the canary's share only
    assert load.revisions[-1] == release.revision and served_root(url) == str(twin.resolve())


def test_a_shadow_that_disagrees_with_the_serving_revision_is_rolled_back_unseen(
        deployment, tmp_path):
    """Another model (one layer more): it loads, passes the smoke and load tests, and answers
    every copy differently; the shadow stops it on min_agreement before any client sees it."""
    from tests.conftest import build_tiny_llama

    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    other = build_tiny_llama(tmp_path / "other", layers=3, hidden=256, heads=4, kv_heads=2,
                             intermediate=512)
    live = phased(settings, shadow={"seconds": 60, "min_requests": 10,
                                    "max_p95_latency_ratio": None})
    with ClientLoad(url) as load, pytest.raises(RolloutFailed) as err:
        rollout_local(live, resolve_release(live, checkpoint=other), "test-shadow-disagrees")
    assert err.value.check == "shadow", err.value.reason
    assert "rollout.local.shadow.min_agreement" in err.value.reason
    assert load.failures == [] and set(load.revisions) == {before.release.revision}
    after = load_state(settings.rollout.state_dir, "local")
    assert after.active.release == before.release and after.history[-1]["event"] == "rolled-back"
    assert "min_agreement" in after.history[-1]["reason"]
    assert processes_mentioning(str(other)) == []


def test_a_canary_whose_vllm_fails_its_share_is_rolled_back_at_once_losing_only_that_share(
        deployment, tmp_path):
    """kill -9 of the canary's vLLM mid-phase: the phase ends at the next poll (its server
    crashed: restarted by its keeper, so not ``unbroken``; or its share's 5xx breach
    max_error_rate_increase, whichever is seen first), the canary is removed and the rollout
    rolled back; clients lose requests only from the canary's share (502/503 from the router),
    and the serving revision answers everything after."""
    settings, _ = deployment
    url = f"http://127.0.0.1:{settings.rollout.local.port}"
    before = load_state(settings.rollout.state_dir, "local").active
    twin = released_again(before.release.checkpoint, tmp_path / "twin-canary")
    live = phased(settings, canary={"phases": [{"weight": 0.5, "seconds": 120}],
                                    "min_requests": 5, "max_p95_latency_ratio": None,
                                    "poll_s": 0.5})
    release = resolve_release(live, checkpoint=twin)
    assert release.revision != before.release.revision  # else no phases: nothing to compare

    def canary_server() -> int | None:  # the canary's share goes to it now
        state = load_state(settings.rollout.state_dir, "local")
        status = httpx.get(f"{url}/-/status", timeout=5).json()
        if not (status.get("canary") and state.pending is not None):
            return None
        return read_status(state.pending.server["keeper"])["server_pid"]

    with ClientLoad(url) as load:
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                rollout_local(live, release, "test-canary-breach")
            except BaseException as exc:  # handed to the test thread
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        deadline, victim = time.monotonic() + 420, None
        while victim is None:
            assert worker.is_alive(), f"the rollout ended before its canary phase: {outcome}"
            assert time.monotonic() < deadline, "no canary phase within 420 s"
            victim = canary_server()
            time.sleep(0.2)
        time.sleep(1)  # the canary has its share of live requests
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        worker.join(120)
        assert not worker.is_alive(), "the breach was not acted on within 120 s"
        rolled_back_at = time.monotonic()
        served_after = len(load.revisions)
        time.sleep(2)
    err = outcome.get("error")
    assert isinstance(err, RolloutFailed) and err.check == "canary", outcome
    assert "max_error_rate_increase" in err.reason or "restarted" in err.reason \
        or "exited" in err.reason, err.reason
    assert all(f.startswith(("HTTP 502", "HTTP 503")) for f in load.failures), load.failures[:3]
    # only the canary's requests in the breach's seconds: none before the kill, none after
    assert all(killed_at <= t <= rolled_back_at for t in load.failed_at), load.failures[:3]
    print(f"kill -9 -> rolled back: {rolled_back_at - killed_at:.1f} s, "
          f"{len(load.failures)} failed of {load.ok + len(load.failures)}")  # -rP shows it
    assert set(load.revisions[served_after:]) == {before.release.revision}
    assert served_root(url) == before.release.checkpoint
    after = load_state(settings.rollout.state_dir, "local")
    assert after.active.release == before.release and after.pending is None
    assert after.history[-1]["event"] == "rolled-back"
    assert processes_mentioning(str(twin)) == []
