"""Kubernetes target: manifests validated against offline schemas; the official client's calls
against a Kubernetes API server on 127.0.0.1 (tests/fakek8s.py), including undo on failure."""

from __future__ import annotations

import json
import time

import kubernetes_validate
import pytest

from requant.errors import RolloutFailed, SettingsError
from requant.rollout.k8s_manifest import (
    check_strategy,
    render_deployment,
    render_service,
    validate,
)
from requant.rollout.kubernetes import rollout_kubernetes
from requant.rollout.state import Release, load_state
from requant.settings import KubernetesTargetSettings, PipelineSettings
from tests.fakek8s import REV, FakeCluster

SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c" * 40


def test_rendered_deployment_and_service_pass_strict_offline_schema_validation():
    k = KubernetesTargetSettings(model_cache_pvc="hf-cache", max_surge=1, max_unavailable=0)
    dep = render_deployment(k, Release(SHA_A, "org/llama3-w8a8"), "llama3-w8a8",
                            {"revision": SHA_A})
    validate(dep)
    validate(render_service(k))
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "org/llama3-w8a8" and args[args.index("--revision") + 1] == SHA_A
    assert args[args.index("--served-model-name") + 1] == "llama3-w8a8"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= k.startup_timeout_s
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert dep["spec"]["template"]["metadata"]["annotations"][REV] == SHA_A
    token_env = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token_env["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models-cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache"


def test_schema_validation_rejects_a_manifest_kubernetes_would_reject():
    k = KubernetesTargetSettings()
    dep = render_deployment(k, Release(SHA_A, "org/m"), "m", {})
    dep["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError, match="startupprobe"):
        validate(dep)


def test_rolling_update_that_can_never_progress_is_refused_with_the_fix():
    with pytest.raises(SettingsError, match="max_surge and max_unavailable are both 0"):
        check_strategy(KubernetesTargetSettings(max_surge=0, max_unavailable=0))


def test_default_strategy_is_surge_first_and_in_place_needs_downtime_accepted():
    default = KubernetesTargetSettings()
    assert (default.max_surge, default.max_unavailable) == ("100%", 0)
    check_strategy(default)
    with pytest.raises(SettingsError, match=r"max_unavailable=1 takes serving pods down.*an "
                       r"outage.*allow_downtime: true"):
        check_strategy(KubernetesTargetSettings(max_surge=0, max_unavailable=1))
    check_strategy(KubernetesTargetSettings(max_surge=0, max_unavailable=1, allow_downtime=True))


def test_a_local_checkpoint_cannot_be_deployed_to_kubernetes():
    with pytest.raises(SettingsError, match="published revisions only"):
        render_deployment(KubernetesTargetSettings(), Release("local-x", None, "/tmp/x"), "m", {})


@pytest.fixture
def cluster(tmp_path):
    with FakeCluster() as c:
        c.settings = PipelineSettings.model_validate({"rollout": {
            "target": "kubernetes", "served_model_name": "llama3-w8a8",
            "state_dir": str(tmp_path / "state"),
            "slo": {"requests": 64, "concurrency": 64, "max_tokens": 64},
            "kubernetes": {"namespace": "serving", "deployment": "llama3",
                           "kubeconfig": c.kubeconfig(tmp_path / "kubeconfig"),
                           "poll_interval_s": 0.01, "rollout_timeout_s": 30,
                           "service_url": c.service_url("serving", "llama3")},
        }})
        yield c


def deployed_revision(c: FakeCluster) -> str:
    dep = c.state.deployments[("serving", "llama3")]
    return dep["spec"]["template"]["metadata"]["annotations"][REV]


def test_rollout_applies_waits_verifies_and_records_state_on_the_deployment(cluster):
    a = Release(SHA_A, "org/llama3-w8a8")
    deployed, changed = rollout_kubernetes(cluster.settings, a, "run-1")
    assert changed and deployed.release == a
    assert deployed.verification["load"]["requests"] == 64
    assert deployed.verification["smoke"]["root"] == f"org/llama3-w8a8@{SHA_A}"
    b = Release(SHA_B, "org/llama3-w8a8")
    rollout_kubernetes(cluster.settings, b, "run-2")
    dep = cluster.state.deployments[("serving", "llama3")]
    notes = dep["metadata"]["annotations"]
    assert notes["requant.dev/revision"] == SHA_B
    assert notes["requant.dev/previous-revision"] == SHA_A
    assert notes["requant.dev/flow-run"] == "run-2"
    methods = [(m, p) for m, p, _ in cluster.state.requests if "/apis/apps" in p]
    assert ("POST", "/apis/apps/v1/namespaces/serving/deployments") in methods
    assert ("PUT", "/apis/apps/v1/namespaces/serving/deployments/llama3") in methods
    assert ("serving", "llama3") in cluster.state.services
    state = load_state(cluster.settings.rollout.state_dir, "kubernetes")
    assert state.active.release == b and state.previous.release == a
    # the token is referenced, never sent
    assert "fake-cluster-token" not in json.dumps([b for _, _, b in cluster.state.requests])
    _, again = rollout_kubernetes(cluster.settings, b, "run-3")
    assert again is False  # already serving that revision: nothing applied


def test_rollout_that_never_becomes_available_is_undone_to_the_previous_template(cluster):
    rollout_kubernetes(cluster.settings, Release(SHA_A, "org/m"), "run-1")
    cluster.state.stuck.add(SHA_B)
    with pytest.raises(RolloutFailed) as err:
        rollout_kubernetes(cluster.settings, Release(SHA_B, "org/m"), "run-2")
    assert err.value.check == "rollout" and "ProgressDeadlineExceeded" in err.value.reason
    assert deployed_revision(cluster) == SHA_A  # rollout undo
    state = load_state(cluster.settings.rollout.state_dir, "kubernetes")
    assert state.active.release.revision == SHA_A
    assert state.history[-1]["event"] == "rolled-back"


def test_rollout_missing_the_latency_slo_is_undone(cluster):
    rollout_kubernetes(cluster.settings, Release(SHA_A, "org/m"), "run-1")
    cluster.state.slow_answers.add(SHA_C)
    cluster.state.slow_s = 0.3
    strict = cluster.settings.model_copy(deep=True)
    strict.rollout.slo.max_p95_latency_s = 0.1
    with pytest.raises(RolloutFailed) as err:
        rollout_kubernetes(strict, Release(SHA_C, "org/m"), "run-2")
    assert err.value.check == "load" and "max_p95_latency_s" in err.value.reason
    assert deployed_revision(cluster) == SHA_A


def test_rollout_past_its_deadline_is_undone_and_a_failed_first_deploy_is_deleted(cluster):
    cluster.state.ready_after = 10_000  # seconds: never
    slow = cluster.settings.model_copy(deep=True)
    slow.rollout.kubernetes.rollout_timeout_s = 0.5
    with pytest.raises(RolloutFailed, match="rollout_timeout_s"):
        rollout_kubernetes(slow, Release(SHA_A, "org/m"), "run-1")
    assert ("serving", "llama3") not in cluster.state.deployments  # nothing served before


def test_a_surge_first_rollout_that_never_gets_ready_never_leaves_the_service_without_pods(
        cluster):
    rollout_kubernetes(cluster.settings, Release(SHA_A, "org/m"), "run-1")
    cluster.state.serving_log.clear()
    cluster.state.stuck.add(SHA_B)
    with pytest.raises(RolloutFailed):
        rollout_kubernetes(cluster.settings, Release(SHA_B, "org/m"), "run-2")
    assert cluster.state.serving_log and set(cluster.state.serving_log) == {SHA_A}


def test_in_place_replacement_is_the_documented_downtime(cluster):
    rollout_kubernetes(cluster.settings, Release(SHA_A, "org/m"), "run-1")
    cluster.state.serving_log.clear()
    in_place = cluster.settings.model_copy(deep=True)
    k = in_place.rollout.kubernetes
    k.max_surge, k.max_unavailable, k.allow_downtime = 0, 1, True
    rollout_kubernetes(in_place, Release(SHA_B, "org/m"), "run-2")
    assert None in cluster.state.serving_log  # nobody served while the new pod loaded
    assert cluster.state.serving_log[-1] == SHA_B


def test_the_test_cluster_refuses_what_a_real_api_server_refuses(cluster, tmp_path):
    """With the official client: no token -> 401; creating an existing Service -> 409; a body
    naming another object than the URL -> 400; Services can be patched, replaced, deleted."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    anonymous = client.CoreV1Api(client.ApiClient(client.Configuration(host=cluster.url)))
    with pytest.raises(ApiException) as err:
        anonymous.read_namespaced_service("llama3", "serving")
    assert err.value.status == 401
    api = client.CoreV1Api(config.new_client_from_config(cluster.kubeconfig(tmp_path / "kc")))
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "serving"},
           "spec": {"selector": {"app": "a"}, "ports": [{"port": 8000}]}}
    api.create_namespaced_service("serving", svc)
    with pytest.raises(ApiException) as err:
        api.create_namespaced_service("serving", svc)
    assert err.value.status == 409
    with pytest.raises(ApiException) as err:
        api.create_namespaced_service("other", svc)
    assert err.value.status == 400 and "namespace" in err.value.body
    with pytest.raises(ApiException) as err:
        api.replace_namespaced_service("t", "serving", svc)
    assert err.value.status == 400 and "does not match the name" in err.value.body
    api.patch_namespaced_service("s", "serving", {"spec": {"selector": {"app": "b"}}})
    assert api.read_namespaced_service("s", "serving").spec.selector == {"app": "b"}
    api.delete_namespaced_service("s", "serving")
    with pytest.raises(ApiException) as err:
        api.read_namespaced_service("s", "serving")
    assert err.value.status == 404


def test_rollout_progress_depends_on_time_not_on_how_often_status_is_read(cluster):
    cluster.state.ready_after = 1.0
    slow_poll = cluster.settings.model_copy(deep=True)
    slow_poll.rollout.kubernetes.poll_interval_s = 0.4
    started = time.monotonic()
    rollout_kubernetes(slow_poll, Release(SHA_A, "org/m"), "run-1")
    assert time.monotonic() - started >= 1.0


def test_rollback_reads_the_previous_revision_from_the_deployment_not_a_local_file(cluster):
    import shutil

    from requant.rollout.release import resolve_release

    settings = cluster.settings.model_copy(deep=True)
    settings.hub.repo_id = "org/m"
    with pytest.raises(SettingsError, match=r"no Deployment serving/llama3"):
        resolve_release(settings, rollback=True)
    rollout_kubernetes(settings, Release(SHA_A, "org/m"), "run-1")
    with pytest.raises(SettingsError, match=r"records no previous revision"):
        resolve_release(settings, rollback=True)
    rollout_kubernetes(settings, Release(SHA_B, "org/m"), "run-2")
    shutil.rmtree(settings.rollout.state_dir)  # another worker, or a lost disk
    assert resolve_release(settings, rollback=True) == Release(SHA_A, "org/m")


def _promote_killed_at(step: str, settings: PipelineSettings, release: Release) -> int:
    """The real rollout in a worker process that ``kill -9``s itself at ``step``."""
    import os
    import subprocess
    import sys

    script = ("import json, sys; from requant.rollout.kubernetes import rollout_kubernetes; "
              "from requant.rollout.state import Release; "
              "from requant.settings import PipelineSettings; "
              "s = PipelineSettings.model_validate(json.loads(sys.argv[1])); "
              "rollout_kubernetes(s, Release(sys.argv[2], sys.argv[3]), 'killed-run')")
    return subprocess.run(
        [sys.executable, "-c", script, settings.model_dump_json(), release.revision,
         release.repo_id], env={**os.environ, "REQUANT_KILL_AT": step}, timeout=120,
        check=False).returncode


@pytest.mark.parametrize("step", ["k8s-applied", "k8s-verified"])
def test_a_worker_killed_mid_rollout_leaves_nothing_trusted_that_was_not_verified(
        cluster, step, monkeypatch):
    import signal

    import requant.rollout.kubernetes as target

    a, b = Release(SHA_A, "org/m"), Release(SHA_B, "org/m")
    rollout_kubernetes(cluster.settings, a, "run-1")
    assert _promote_killed_at(step, cluster.settings, b) == -signal.SIGKILL
    notes = cluster.state.deployments[("serving", "llama3")]["metadata"]["annotations"]
    assert notes["requant.dev/revision"] == SHA_B  # applied: the cluster runs it
    assert notes["requant.dev/verified"] == ("true" if step == "k8s-verified" else "false")
    state = load_state(cluster.settings.rollout.state_dir, "kubernetes")
    assert state.active.release == a  # the worker's record never took the killed rollout

    checked = []
    real_verify = target.verify_deployment
    monkeypatch.setattr(target, "verify_deployment",
                        lambda *a, **k: checked.append(1) or real_verify(*a, **k))
    deployed, changed = rollout_kubernetes(cluster.settings, b, "run-3")
    assert deployed.release == b
    if step == "k8s-applied":  # unverified: the next promote verifies before trusting it
        assert checked == [1] and changed is True
        notes = cluster.state.deployments[("serving", "llama3")]["metadata"]["annotations"]
        assert notes["requant.dev/verified"] == "true"
        assert notes["requant.dev/previous-revision"] == SHA_A  # rollback still goes to A
    else:  # verified on the cluster before the kill: trusted without a second load test
        assert checked == [] and changed is False


def test_an_applied_but_unverified_revision_that_fails_verification_is_never_recorded(
        cluster):
    a, b = Release(SHA_A, "org/m"), Release(SHA_B, "org/m")
    rollout_kubernetes(cluster.settings, a, "run-1")
    assert _promote_killed_at("k8s-applied", cluster.settings, b) < 0
    cluster.state.slow_answers.add(SHA_B)  # now it misses the latency SLO
    cluster.state.slow_s = 0.2
    settings = cluster.settings.model_copy(deep=True)
    settings.rollout.slo.max_p95_latency_s = 0.05
    with pytest.raises(RolloutFailed):
        rollout_kubernetes(settings, b, "run-3")
    state = load_state(cluster.settings.rollout.state_dir, "kubernetes")
    assert state.active.release == a
    notes = cluster.state.deployments[("serving", "llama3")]["metadata"]["annotations"]
    assert notes.get("requant.dev/verified") != "true"
