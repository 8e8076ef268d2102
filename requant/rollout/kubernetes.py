"""Kubernetes rollout: apply the rendered Deployment, wait for it with a deadline, verify the
Service, and undo on any failure.

Applied with the official ``kubernetes`` client. The Deployment is *replaced* (not merged) so
what runs is exactly what ``requant/k8s_manifest.py`` rendered and validated. Undo re-applies the
pod template that served before, which is what ``kubectl rollout undo`` does (it copies the
previous ReplicaSet's template back into the Deployment); on a first deployment there is nothing
to go back to, so the failed Deployment is deleted.

The deployed state lives on the Deployment itself (``requant.dev/*`` annotations: revision,
previous revision, flow run, time), where ``kubectl describe`` shows it and the next rollout
reads it, with a copy in the local deployed-state record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from requant.errors import DeploymentCheckFailed, RolloutFailed
from requant.killpoints import kill_point
from requant.rollout.k8s_api import (
    api_client,
    check_owned,
    mark_verified,
    not_found,
    read_deployment,
    replace_deployment,
    rollout_status,
    wait_rollout,
    writable,
)
from requant.rollout.k8s_manifest import (
    ANNOTATION,
    PORT,
    check_strategy,
    render_deployment,
    render_service,
    validate,
)
from requant.rollout.state import (
    Deployed,
    Intent,
    Release,
    load_state,
    now_iso,
    save_state,
)
from requant.serving.checks import verify_deployment
from requant.settings import KubernetesTargetSettings, PipelineSettings

TARGET = "kubernetes"
Log = Callable[[str], None]


def previous_release(k: KubernetesTargetSettings) -> tuple[Release | None, str]:
    """The rollback target as the cluster records it: the Deployment's previous-revision
    annotation and the repository its pods pull (not a worker's local file, which another
    worker, or a lost disk, makes stale). Returns (release or None, what the cluster said)."""
    from kubernetes import client

    dep = read_deployment(client.AppsV1Api(api_client(k)), k)
    if dep is None:
        return None, f"no Deployment {k.namespace}/{k.deployment}"
    notes = dep["metadata"].get("annotations") or {}
    previous = notes.get(f"{ANNOTATION}/previous-revision")
    if not previous:
        return None, (f"Deployment {k.namespace}/{k.deployment} serves "
                      f"{notes.get(f'{ANNOTATION}/revision')} and records no previous revision")
    repo = dep["spec"]["template"]["spec"]["containers"][0]["args"][0]
    return Release(previous, repo), f"Deployment {k.namespace}/{k.deployment}"


def _apply_service(core: Any, k: KubernetesTargetSettings) -> None:
    from kubernetes.client.exceptions import ApiException

    svc = render_service(k)
    validate(svc)
    try:
        current = core.read_namespaced_service(k.deployment, k.namespace)
    except ApiException as exc:
        if not not_found(exc):
            raise
        core.create_namespaced_service(k.namespace, svc)
        return
    check_owned(core.api_client.sanitize_for_serialization(current), "Service", k.namespace)


def record_from_cluster(state_dir: Path, release: Release, annotations: dict[str, str],
                        flow_run_id: str | None) -> Deployed:
    """What the cluster says serves (verified), also in the worker's state file: a run killed
    after verifying never wrote its record, and the record must not keep the old revision."""
    state = load_state(state_dir, TARGET)
    if state.active is not None and state.active.release == release:
        return state.active
    deployed = Deployed(release, annotations.get(f"{ANNOTATION}/deployed-at", ""),
                        annotations.get(f"{ANNOTATION}/flow-run") or flow_run_id,
                        rollback=annotations.get(f"{ANNOTATION}/rollback") == "true",
                        forced=annotations.get(f"{ANNOTATION}/forced") == "true")
    state.activate(deployed)
    state.record_event("deployed", release, flow_run_id, deployed.deployed_at,
                       "recorded from the Deployment: verified by a run that did not finish")
    save_state(state_dir, state)
    return deployed


def undo(apps: Any, k: KubernetesTargetSettings, previous: dict[str, Any] | None,
         log: Log) -> None:
    """Back to the pod template that served before (kubectl rollout undo), or delete the
    Deployment if there was none."""
    current = read_deployment(apps, k)
    if previous is None:
        if current is not None:
            check_owned(current, "Deployment", k.namespace)
            apps.delete_namespaced_deployment(k.deployment, k.namespace)
            log("first deployment failed: deleted it (nothing served before)")
        return
    body = writable(previous)
    for key in ("resourceVersion", "generation", "uid", "creationTimestamp", "managedFields"):
        body["metadata"].pop(key, None)
    replace_deployment(apps, k, body, current)
    log(f"undone: back to revision "
        f"{previous['metadata'].get('annotations', {}).get(f'{ANNOTATION}/revision')}")
    try:  # bounded: the old pods were healthy minutes ago
        wait_rollout(apps, k, min(k.rollout_timeout_s, k.startup_timeout_s + 300))
    except DeploymentCheckFailed as exc:
        log(f"WARNING: the undo has not completed either: {exc}")


def rollout_kubernetes(settings: PipelineSettings, release: Release, flow_run_id: str | None,
                       log: Log = print, intent: Intent = Intent()) -> tuple[Deployed, bool]:
    from kubernetes import client

    rcfg = settings.rollout
    k = rcfg.kubernetes
    check_strategy(k)
    api = api_client(k)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    current = read_deployment(apps, k)
    check_owned(current, "Deployment", k.namespace)  # before anything is created beside it
    annotations = (current or {}).get("metadata", {}).get("annotations") or {}
    serving = annotations.get(f"{ANNOTATION}/revision")
    verified = annotations.get(f"{ANNOTATION}/verified") == "true"
    if current is not None and serving == release.revision and verified \
            and rollout_status(current, k.replicas) == (True, None):
        log(f"{release.label()} is already deployed to {k.namespace}/{k.deployment}")
        return record_from_cluster(rcfg.state_dir, release, annotations, flow_run_id), False

    now = now_iso()
    if serving == release.revision and not verified:  # applied by a run that died: verify
        log(f"{release.label()} was applied but never verified: verifying it before trusting it")
        serving = annotations.get(f"{ANNOTATION}/previous-revision") or None
    record = {"revision": release.revision, "repo": release.repo_id or "",
              "previous-revision": serving or "", "flow-run": flow_run_id or "",
              "deployed-at": now, "verified": "false",
              "rollback": str(intent.rollback).lower(), "forced": str(intent.forced).lower()}
    deployment = render_deployment(k, release, rcfg.served_model_name, record)
    validate(deployment)
    _apply_service(core, k)
    started = time.monotonic()
    replace_deployment(apps, k, deployment, current)
    kill_point("k8s-applied")
    log(f"applied {k.namespace}/{k.deployment} at {release.label()}; waiting for the rollout")
    url = k.service_url or f"http://{k.deployment}.{k.namespace}.svc:{PORT}"
    state = load_state(rcfg.state_dir, TARGET)
    try:
        wait_rollout(apps, k, k.rollout_timeout_s)
        report = verify_deployment(url, rcfg.served_model_name, rcfg.slo, rcfg.smoke_prompt,
                                   ready_timeout_s=120)
    except DeploymentCheckFailed as exc:
        undo(apps, k, current, log)
        state.record_event("rolled-back", release, flow_run_id, now, f"{exc.check}: {exc.reason}")
        save_state(rcfg.state_dir, state)
        raise RolloutFailed(release, exc.check, exc.reason, exc.report) from None
    mark_verified(apps, k)
    kill_point("k8s-verified")
    deployed = Deployed(release, now, flow_run_id, url,
                        {"namespace": k.namespace, "deployment": k.deployment},
                        report.as_record() | {
                            "rollout_to_shift_s": round(time.monotonic() - started, 2)},
                        rollback=intent.rollback, forced=intent.forced)
    state.activate(deployed)
    state.record_event("deployed", release, flow_run_id, now)
    save_state(rcfg.state_dir, state)
    return deployed, True
