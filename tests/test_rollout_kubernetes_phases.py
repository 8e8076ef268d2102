"""Kubernetes with live phases: requant's router in the cluster in front of two slot
Deployments. The official client talks to the Kubernetes API server on 127.0.0.1
(tests/fakek8s.py: Deployments, Services, Secrets, and the slots' pods behind their Services);
the router is the real one, run as its pod runs it (``--admin-port``, the token from the
Secret), reached at the worker operator's ``REQUANT_K8S_ROUTER_ADMIN_URL``."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import httpx
import pytest

from requant.errors import RolloutFailed
from requant.rollout.k8s_manifest import validate
from requant.rollout.k8s_router_manifest import (
    render_router,
    render_router_services,
    render_token_secret,
)
from requant.rollout.kubernetes_router import rollout_kubernetes_router, slot_url
from requant.rollout.release import resolve_release
from requant.rollout.state import Release, load_state
from requant.serving.router import REVISION_HEADER, create_app
from requant.serving.server import free_port
from requant.settings import KubernetesTargetSettings, PipelineSettings
from requant.status import collect_status, render_status
from tests.conftest import wait_answering
from tests.fakek8s import LIVE_MARK, FakeCluster
from tests.test_live_phases import LIVE, ROLL_OUT, Clients
from tests.test_router_and_checks import TOKEN, TestClient, Upstream

SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "c" * 40
NS, NAME = "serving", "llama3"
assert LIVE == LIVE_MARK  # the clients' requests are what the fake's faulty pods fail


def test_router_manifests_pass_strict_validation_and_carry_no_token():
    k = KubernetesTargetSettings(namespace=NS, deployment=NAME)
    router = render_router(k)
    for manifest in (router, *render_router_services(k), render_token_secret(k, "s3cret")):
        validate(manifest)
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert "s3cret" not in str(router) and "--admin-port" in container["args"]
    volume = router["spec"]["template"]["spec"]["volumes"][0]["secret"]
    assert volume["secretName"] == f"{NAME}-router-token" and volume["defaultMode"] == 0o400
    public, admin = render_router_services(k)
    assert public["metadata"]["name"] == NAME  # clients keep the target's Service name
    assert public["spec"]["ports"][0]["port"] == 8000
    assert admin["spec"]["ports"] == [{"name": "admin", "port": 8001, "targetPort": "admin"}]
    assert public["spec"]["selector"] == admin["spec"]["selector"] == (
        router["spec"]["template"]["metadata"]["labels"])


def test_the_admin_port_answers_any_address_with_the_token_and_nothing_else(tmp_path):
    upstream = Upstream("A")
    try:
        from requant.serving.router import Router

        router = Router(tmp_path / "router.json", TOKEN)
        remote = ("10.0.0.7", 1)
        with TestClient(router.admin_app(), client=remote) as admin:
            assert admin.get("/-/status").status_code == 401  # reading too, off this host
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            assert admin.put("/-/backend", json={"url": upstream.url}).status_code == 401
            r = admin.put("/-/backend", json={"url": upstream.url, "revision": "r"},
                          headers=bearer)
            assert r.status_code == 200 and admin.get(
                "/-/status", headers=bearer).json()["backend"] == upstream.url
            assert admin.get("/v1/models", headers=bearer).status_code == 404  # no proxying
        with TestClient(create_app(tmp_path / "r2.json", TOKEN), client=remote) as public:
            assert public.put("/-/backend", json={"url": upstream.url},
                              headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
    finally:
        upstream.close()


# ---- rollouts (fake cluster, real router process) ------------------------------------------


@pytest.fixture
def routed(tmp_path, monkeypatch):
    """A fake cluster whose router pod is a real router process on this host."""
    with FakeCluster() as cluster:
        token = "router-token-from-the-secret"
        cluster.state.secrets[(NS, f"{NAME}-router-token")] = {
            # made by an earlier rollout of requant's: its label and owner annotation
            "apiVersion": "v1", "kind": "Secret", "metadata": {
                "name": f"{NAME}-router-token", "namespace": NS,
                "labels": {"app.kubernetes.io/managed-by": "requant"},
                "annotations": {"requant.dev/owner": "requant"}},
            "data": {"token": base64.b64encode(token.encode()).decode()}}
        (tmp_path / "token").write_text(token)
        port, admin = free_port(), free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "requant.serving.router", "--port", str(port),
             "--admin-port", str(admin), "--token-file", str(tmp_path / "token"),
             "--state-file", str(tmp_path / "router.json")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        wait_answering(f"http://127.0.0.1:{admin}/-/metrics", 30, lambda: router.poll() is None)
        monkeypatch.setenv("REQUANT_K8S_ROUTER_ADMIN_URL", f"http://127.0.0.1:{admin}")
        monkeypatch.setenv("REQUANT_K8S_SLOT_URL", f"{cluster.url}/svc/{{namespace}}/{{service}}")
        settings = PipelineSettings.model_validate({"hub": {"repo_id": "org/llama3-w8a8"},
                                                    "rollout": {
            "target": "kubernetes", "served_model_name": "tiny-chat",
            "state_dir": str(tmp_path / "state"),
            "slo": {"requests": 4, "concurrency": 2, "max_tokens": 4},
            "kubernetes": {"namespace": NS, "deployment": NAME,
                           "kubeconfig": cluster.kubeconfig(tmp_path / "kubeconfig"),
                           "poll_interval_s": 0.01, "rollout_timeout_s": 30,
                           "startup_timeout_s": 30, "service_url": url,
                           "router": {"enabled": True, "drain_timeout_s": 5,
                                      "canary": {"phases": [{"weight": 0.5, "seconds": 2}],
                                                 "min_requests": 5, "poll_s": 0.2}}}}})
        try:
            yield cluster, settings, url, f"http://127.0.0.1:{admin}", token
        finally:
            router.terminate()
            router.wait(30)


def admin_status(admin: str, token: str) -> dict:
    return httpx.get(f"{admin}/-/status", headers={"Authorization": f"Bearer {token}"}).json()


def replicas(cluster: FakeCluster, slot: str) -> int:
    return cluster.state.deployments[(NS, f"{NAME}-{slot}")]["spec"]["replicas"]


def release(sha: str) -> Release:
    return Release(sha, "org/llama3-w8a8")


def test_first_rollout_fills_slot_a_and_points_the_router_at_it_with_no_phases(routed):
    cluster, settings, url, admin, token = routed
    deployed, changed = rollout_kubernetes_router(settings, release(SHA_A), "run-a",
                                                  log=lambda _m: None)
    assert changed and deployed.verification["canary"] == []
    status = admin_status(admin, token)
    k = settings.rollout.kubernetes
    assert status["backend"] == slot_url(k, "a") and status["revision"] == SHA_A
    r = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers[REVISION_HEADER] == SHA_A
    assert (NS, NAME) in cluster.state.services and (NS, f"{NAME}-router") in (
        cluster.state.deployments)
    seen = len(cluster.state.requests)
    again, changed = rollout_kubernetes_router(settings, release(SHA_A), "run-a2",
                                               log=lambda _m: None)
    assert not changed and again.release.revision == SHA_A
    writes = [(m, path) for m, path, _ in cluster.state.requests[seen:] if m != "GET"]
    assert writes == [], writes  # nothing applied: the router pod is kept


def test_a_canary_that_holds_is_switched_to_and_the_old_slot_scaled_to_zero(routed):
    cluster, settings, url, admin, token = routed
    rollout_kubernetes_router(settings, release(SHA_A), "run-a", log=lambda _m: None)
    with Clients(url) as clients:
        deployed, changed = rollout_kubernetes_router(settings, release(SHA_B), "run-b",
                                                      log=lambda _m: None)
    (phase,) = deployed.verification["canary"]
    assert changed and phase["weight"] == 0.5 and phase["requests"] >= 5
    assert {status for status, _ in clients.answers} == {200}
    assert {rev for _, rev in clients.answers} == {SHA_A, SHA_B}
    status = admin_status(admin, token)
    k = settings.rollout.kubernetes
    assert status["backend"] == slot_url(k, "b") and status["canary"] is None
    assert (replicas(cluster, "a"), replicas(cluster, "b")) == (0, 1)
    notes = cluster.state.deployments[(NS, f"{NAME}-b")]["metadata"]["annotations"]
    assert notes["requant.dev/verified"] == "true"
    assert notes["requant.dev/previous-revision"] == SHA_A
    shown = render_status(collect_status(settings))  # `requant status`
    assert f"serving slot b ({NAME}-b) at {SHA_B}" in shown and f"slot a: {SHA_A}" in shown
    rollback = resolve_release(settings, rollback=True)  # `promote --rollback` reads the slot
    assert rollback.revision == SHA_A and rollback.repo_id == "org/llama3-w8a8"


def test_a_canary_failing_live_requests_is_rolled_back_and_its_slot_scaled_down(routed):
    cluster, settings, url, admin, token = routed
    rollout_kubernetes_router(settings, release(SHA_A), "run-a", log=lambda _m: None)
    cluster.state.failing_live.add(SHA_B)
    with Clients(url) as clients:
        with pytest.raises(RolloutFailed) as failed:
            rollout_kubernetes_router(settings, release(SHA_B), "run-b", log=lambda _m: None)
        after = len(clients.answers)
        time.sleep(1)
    assert failed.value.check == "canary" and "max_error_rate_increase" in failed.value.reason
    status = admin_status(admin, token)
    k = settings.rollout.kubernetes
    assert status["backend"] == slot_url(k, "a") and status["canary"] is None
    assert (replicas(cluster, "a"), replicas(cluster, "b")) == (1, 0)
    assert {rev for status, rev in clients.answers if status != 200} <= {SHA_B}
    assert {status for status, _ in clients.answers[after:]} == {200}
    events = load_state(settings.rollout.state_dir, "kubernetes").history
    assert events[-1]["event"] == "rolled-back"


def kill_rollout(settings: PipelineSettings, sha: str, step: str, root) -> None:
    """A worker running the rollout of ``sha``, SIGKILLed at ``step``."""
    config = root / "settings.json"
    config.write_text(settings.model_dump_json())
    script = ROLL_OUT.replace("from requant.rollout.local import rollout_local",
                              "from requant.rollout.kubernetes_router import "
                              "rollout_kubernetes_router as rollout_local")
    script = script.replace("checkpoint=sys.argv[2]", "revision=sys.argv[2]")
    killed = subprocess.run([sys.executable, "-c", script, str(config), sha],
                            env={**os.environ, "REQUANT_KILL_AT": step},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]


def slots_of(cluster: FakeCluster) -> dict[str, tuple[str, int]]:
    """Each slot's (revision, replicas)."""
    return {slot: (dep["metadata"]["annotations"]["requant.dev/revision"],
                   dep["spec"]["replicas"])
            for slot in "ab" if (dep := cluster.state.deployments.get((NS, f"{NAME}-{slot}")))}


@pytest.mark.parametrize("step", ["k8s-slot-applied", "k8s-verified", "canary", "k8s-switched",
                                  "k8s-drained"])
def test_a_rollout_killed_at_any_step_is_finished_by_the_next_with_no_request_lost(
        routed, tmp_path, step):
    cluster, settings, url, admin, token = routed
    rollout_kubernetes_router(settings, release(SHA_A), "run-a", log=lambda _m: None)
    with Clients(url) as clients:
        kill_rollout(settings, SHA_B, step, tmp_path)
        if step == "canary":
            assert admin_status(admin, token)["canary"]["revision"] == SHA_B
        time.sleep(0.5)  # the endpoint keeps answering, a canary its share
        deployed, changed = rollout_kubernetes_router(settings, release(SHA_C), "run-c",
                                                      log=lambda _m: None)
    assert changed and deployed.release.revision == SHA_C
    assert {status for status, _ in clients.answers} == {200}
    slots = slots_of(cluster)
    (serving,) = [slot for slot, (rev, _) in slots.items() if rev == SHA_C]
    status = admin_status(admin, token)
    assert status["backend"] == slot_url(settings.rollout.kubernetes, serving)
    assert status["canary"] is None and status["shadow"] is None
    assert [n for slot, (_, n) in slots.items() if slot != serving] == [0]


def test_a_rollout_killed_after_its_switch_is_recognised_and_the_old_slot_retired(routed,
                                                                                  tmp_path):
    cluster, settings, url, *_ = routed
    rollout_kubernetes_router(settings, release(SHA_A), "run-a", log=lambda _m: None)
    with Clients(url) as clients:  # the canary phase needs live traffic to be judged
        kill_rollout(settings, SHA_B, "k8s-switched", tmp_path)
        assert slots_of(cluster) == {"a": (SHA_A, 1), "b": (SHA_B, 1)}
        deployed, changed = rollout_kubernetes_router(settings, release(SHA_B), "run-b2",
                                                      log=lambda _m: None)
    assert {status for status, _ in clients.answers} == {200}
    assert not changed and deployed.release.revision == SHA_B
    assert slots_of(cluster) == {"a": (SHA_A, 0), "b": (SHA_B, 1)}
    assert load_state(settings.rollout.state_dir, "kubernetes").active.release.revision == SHA_B
