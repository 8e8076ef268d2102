"""Kubernetes rollout with the local target's live phases: requant's router in the cluster in
front of two vLLM Deployments (slots ``a`` and ``b``), chosen with ``rollout.kubernetes.router.
enabled``.

A rollout fills the idle slot with the new revision, waits for it, runs the smoke and load tests
against the slot's own Service, then the shadow and canary phases through the router (the same
code and rules as the local target, ``requant.rollout.live_phases``), switches the router, and
drains and scales the old slot to 0 (its template kept: a rollback is a scale-up away). Why a
router rather than Gateway API ``HTTPRoute`` weights: docs/rollout.md.

The truth lives in the cluster: the router's backend says which slot serves, each slot's
annotations say what it holds and whether it was verified. So a rollout killed at any step is
finished by the next one, which first removes a phase a killed rollout left on the router
(draining its requests), then fills the idle slot again; the worker's record is an audit copy.

The worker reaches the router's admin port at ``REQUANT_K8S_ROUTER_ADMIN_URL`` and the slots at
``REQUANT_K8S_SLOT_URL`` (a template of ``{service}`` and ``{namespace}``), both the worker
operator's to set (defaults: in-cluster DNS); a run never chooses where the router's token or
live traffic goes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    wait_rollout,
    writable,
)
from requant.rollout.k8s_manifest import ANNOTATION, render_deployment, render_service, validate
from requant.rollout.k8s_router_manifest import (
    ADMIN_PORT,
    ROUTER_PORT,
    SLOTS,
    SPEC_NOTE,
    admin_service_name,
    idle_slot,
    render_router,
    render_router_services,
    render_token_secret,
    router_name,
    slot_name,
    token_secret_name,
)
from requant.rollout.live_phases import (
    NewRevision,
    put_phase,
    router_call,
    run_phases,
    run_shadow,
    wait_drained,
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


def slot_url(k: KubernetesTargetSettings, slot: str) -> str:
    template = os.environ.get("REQUANT_K8S_SLOT_URL") or "http://{service}.{namespace}.svc:8000"
    return template.format(service=slot_name(k, slot), namespace=k.namespace)


def admin_url(k: KubernetesTargetSettings) -> str:
    return (os.environ.get("REQUANT_K8S_ROUTER_ADMIN_URL")
            or f"http://{admin_service_name(k)}.{k.namespace}.svc:{ADMIN_PORT}")


def public_url(k: KubernetesTargetSettings) -> str:
    return k.service_url or f"http://{k.deployment}.{k.namespace}.svc:{ROUTER_PORT}"


@dataclass(frozen=True)
class Cluster:
    """One rollout's view of the cluster: API clients, the router's admin URL and token."""

    k: KubernetesTargetSettings
    apps: Any
    core: Any
    admin: str
    token: str

    def status(self) -> dict[str, Any]:
        return router_call("GET", self.admin, "/-/status", token=self.token,
                           what="read the router's status").json()

    def slot(self, slot: str) -> dict[str, Any] | None:
        return read_deployment(self.apps, self.k, slot_name(self.k, slot))

    def serving_slot(self, status: dict[str, Any]) -> str | None:
        return next((s for s in SLOTS if status.get("backend") == slot_url(self.k, s)), None)

    def available(self, slot: str) -> bool:
        dep = self.slot(slot)
        return bool(dep and ((dep.get("status") or {}).get("availableReplicas") or 0) > 0)

    def scale(self, slot: str, replicas: int) -> None:
        current = self.slot(slot)
        if current is not None and current["spec"].get("replicas") != replicas:
            body = writable(current)  # 0: scaled down, its template kept for a rollback
            body["spec"]["replicas"] = replicas
            replace_deployment(self.apps, self.k, body, current)

    def drain(self, backend: str, timeout_s: float) -> None:
        wait_drained(self.status, backend, timeout_s)


def notes_of(dep: dict[str, Any] | None) -> dict[str, str]:
    return ((dep or {}).get("metadata") or {}).get("annotations") or {}


def router_token(core: Any, k: KubernetesTargetSettings) -> str:
    """The router's admin token from its Secret, created (random) on the first rollout."""
    from kubernetes.client.exceptions import ApiException

    for _ in range(2):
        try:
            secret = core.read_namespaced_secret(token_secret_name(k), k.namespace)
            check_owned(core.api_client.sanitize_for_serialization(secret), "Secret",
                        k.namespace)
            return base64.b64decode(secret.data["token"]).decode()
        except ApiException as exc:
            if not not_found(exc):
                raise
        try:
            core.create_namespaced_secret(k.namespace, render_token_secret(
                k, secrets.token_urlsafe(32)))
        except ApiException as exc:
            if exc.status != 409:  # another worker created it meanwhile: read theirs
                raise
    raise RuntimeError(f"the Secret {k.namespace}/{token_secret_name(k)} could not be read")


def apply_service(core: Any, k: KubernetesTargetSettings, svc: dict[str, Any]) -> None:
    """Create the Service, or replace it where its spec differs (the public Service selected
    the single Deployment's pods before the router was enabled)."""
    from kubernetes.client.exceptions import ApiException

    validate(svc)
    name = svc["metadata"]["name"]
    try:
        current = core.read_namespaced_service(name, k.namespace)
    except ApiException as exc:
        if not not_found(exc):
            raise
        core.create_namespaced_service(k.namespace, svc)
        return
    now = core.api_client.sanitize_for_serialization(current)
    check_owned(now, "Service", k.namespace)
    if now["spec"].get("selector") != svc["spec"]["selector"] or [
            (p.get("port"), p.get("targetPort")) for p in now["spec"].get("ports", [])] != [
            (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]]:
        core.patch_namespaced_service(name, k.namespace, {"spec": {
            "selector": svc["spec"]["selector"], "ports": svc["spec"]["ports"]}})


def connect(k: KubernetesTargetSettings, log: Log) -> Cluster:
    """The router's Deployment, Services and token in place, and the router answering."""
    from kubernetes import client

    api = api_client(k)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    token = router_token(core, k)
    router = render_router(k)
    validate(router)
    current = read_deployment(apps, k, router_name(k))
    if notes_of(current).get(SPEC_NOTE) != notes_of(router)[SPEC_NOTE]:
        # only when what requant renders changed: a replaced router pod drops its clients
        replace_deployment(apps, k, router, current)
        log(f"router {k.namespace}/{router_name(k)} applied")
    for svc in render_router_services(k):
        apply_service(core, k, svc)
    c = Cluster(k, apps, core, admin_url(k), token)
    wait_rollout(apps, k, k.startup_timeout_s, router_name(k))
    return c


def clear_phases(c: Cluster, log: Log) -> dict[str, Any]:
    """Remove a shadow or canary a killed rollout left on the router (a worker's rollouts hold
    its lock, so only a dead one leaves one); its clients' requests finish first. Returns the
    status."""
    status = c.status()
    for kind in ("shadow", "canary"):
        if status.get(kind):
            log(f"removing the {kind} a killed rollout left ({status[kind]['url']})")
            put_phase(c.admin, c.token, kind, None)
            c.drain(status[kind]["url"], c.k.router.drain_timeout_s)
    return c.status()


def rollout_kubernetes_router(settings: PipelineSettings, release: Release,
                              flow_run_id: str | None, log: Log = print,
                              intent: Intent = Intent()) -> tuple[Deployed, bool]:
    k = settings.rollout.kubernetes
    c = connect(k, log)
    status = clear_phases(c, log)
    serving = c.serving_slot(status)
    if serving is not None and notes_of(c.slot(serving)).get(
            f"{ANNOTATION}/revision") == release.revision and c.available(serving):
        log(f"{release.label()} is already served by {k.namespace}/{slot_name(k, serving)}")
        retire(c, idle_slot(serving), log)
        return record(settings, release, flow_run_id, serving, {}, intent, event=False), False
    idle = idle_slot(serving)
    started = time.monotonic()
    fill(c, settings, release, idle, serving, flow_run_id, intent, log)
    verification = verify_slot(c, settings, release, idle, serving, flow_run_id, log)
    router_call("PUT", c.admin, "/-/backend", token=c.token, what="switch the router",
                body={"url": slot_url(k, idle), "revision": release.revision})
    kill_point("k8s-switched")
    shifted = round(time.monotonic() - started, 2)
    log(f"traffic shifted to {release.label()} ({slot_name(k, idle)}) after {shifted} s")
    deployed = record(settings, release, flow_run_id, idle,
                      verification | {"rollout_to_shift_s": shifted}, intent, event=True)
    if serving is not None:
        retire(c, serving, log)
    return deployed, True


def fill(c: Cluster, settings: PipelineSettings, release: Release, idle: str,
         serving: str | None, flow_run_id: str | None, intent: Intent, log: Log) -> None:
    """The idle slot at the new revision (its Deployment and Service), not yet verified."""
    k = c.k
    previous = notes_of(c.slot(serving)).get(f"{ANNOTATION}/revision", "") if serving else ""
    notes = {"revision": release.revision, "repo": release.repo_id or "",
             "previous-revision": previous, "flow-run": flow_run_id or "",
             "deployed-at": now_iso(), "verified": "false",
             "rollback": str(intent.rollback).lower(), "forced": str(intent.forced).lower()}
    body = render_deployment(k, release, settings.rollout.served_model_name, notes,
                             name=slot_name(k, idle))
    validate(body)
    apply_service(c.core, k, render_service(k, slot_name(k, idle)))
    replace_deployment(c.apps, k, body, c.slot(idle))
    kill_point("k8s-slot-applied")
    log(f"applied {k.namespace}/{slot_name(k, idle)} at {release.label()}; waiting for it")


def verify_slot(c: Cluster, settings: PipelineSettings, release: Release, idle: str,
                serving: str | None, flow_run_id: str | None, log: Log) -> dict[str, Any]:
    """Rollout status, smoke and load tests on the slot, then the live phases through the
    router; any failure scales the slot back to 0 (its requests drained) and fails the
    rollout, with the serving slot untouched."""
    rcfg, k = settings.rollout, c.k
    url = slot_url(k, idle)
    try:
        wait_rollout(c.apps, k, k.rollout_timeout_s, slot_name(k, idle))
        report = verify_deployment(url, rcfg.served_model_name, rcfg.slo, rcfg.smoke_prompt,
                                   ready_timeout_s=120)
        kill_point("k8s-verified")
        phases = live_phases(c, release, idle, serving, log)
    except DeploymentCheckFailed as exc:
        try:
            c.drain(url, k.router.drain_timeout_s)
        except RuntimeError as unreachable:  # the rollback goes on: nothing routes there now
            log(f"could not wait for the canary's requests: {unreachable}")
        c.scale(idle, 0)
        state = load_state(rcfg.state_dir, TARGET)
        state.record_event("rolled-back", release, flow_run_id, now_iso(),
                           f"{exc.check}: {exc.reason[:500]}")
        save_state(rcfg.state_dir, state)
        raise RolloutFailed(release, exc.check, exc.reason, exc.report) from None
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the next rollout refills it anyway
            c.scale(idle, 0)
        raise
    mark_verified(c.apps, k, slot_name(k, idle))
    return report.as_record() | phases


def live_phases(c: Cluster, release: Release, idle: str, serving: str | None,
                log: Log) -> dict[str, Any]:
    cfg = c.k.router
    records: dict[str, Any] = {"shadow": None, "canary": []}
    serving_rev = notes_of(c.slot(serving)).get(f"{ANNOTATION}/revision") if serving else None
    if serving_rev is None or serving_rev == release.revision or not c.available(serving):
        log("no serving revision to compare live traffic with: switching after the load test")
        return records
    phase = NewRevision(c.admin, c.token, slot_url(c.k, idle), release.revision, serving_rev,
                        lambda: c.available(idle))
    if cfg.shadow.seconds:
        records["shadow"] = run_shadow(phase, cfg.shadow, cfg.canary.poll_s, log)
    records["canary"] = run_phases(phase, cfg.canary, log)
    return records


def retire(c: Cluster, slot: str, log: Log) -> None:
    """The slot the router no longer sends to: its requests drained, then scaled to 0."""
    dep = c.slot(slot)
    if dep is None or not dep["spec"].get("replicas"):
        return
    try:
        c.drain(slot_url(c.k, slot), c.k.router.drain_timeout_s)
    except RuntimeError as exc:  # the switch is done and recorded: the next rollout retires it
        log(f"could not drain {slot_name(c.k, slot)} ({exc}); left running for the next rollout")
        return
    kill_point("k8s-drained")
    c.scale(slot, 0)
    log(f"scaled {c.k.namespace}/{slot_name(c.k, slot)} to 0 (its template kept)")


def record(settings: PipelineSettings, release: Release, flow_run_id: str | None, slot: str,
           verification: dict[str, Any], intent: Intent, event: bool) -> Deployed:
    """The worker's audit copy of what the router serves now."""
    rcfg, k = settings.rollout, settings.rollout.kubernetes
    state = load_state(rcfg.state_dir, TARGET)
    if state.active is not None and state.active.release == release and not event:
        return state.active
    deployed = Deployed(release, now_iso(), flow_run_id, public_url(k),
                        {"namespace": k.namespace, "deployment": slot_name(k, slot),
                         "slot": slot}, verification,
                        rollback=intent.rollback, forced=intent.forced)
    state.activate(deployed)
    state.record_event("deployed", release, flow_run_id, deployed.deployed_at,
                       None if event else "recorded from the router: it serves this slot")
    save_state(rcfg.state_dir, state)
    return deployed


def previous_release_routed(k: KubernetesTargetSettings) -> tuple[Release | None, str]:
    """The rollback target: what the serving slot records as the revision before it."""
    c = connect(k, lambda _m: None)
    serving = c.serving_slot(c.status())
    where = f"the router {k.namespace}/{router_name(k)}"
    if serving is None:
        return None, f"{where} serves no slot"
    notes = notes_of(c.slot(serving))
    previous = notes.get(f"{ANNOTATION}/previous-revision")
    if not previous:
        return None, f"{where} serves {notes.get(f'{ANNOTATION}/revision')} and records no " \
                     "previous revision"
    return Release(previous, notes.get(f"{ANNOTATION}/repo") or None), where


def routed_status(k: KubernetesTargetSettings) -> dict[str, Any]:
    """What ``requant status`` shows, read only: which slot the router serves, its phase, and
    each slot's revision and replicas."""
    from kubernetes import client

    api = api_client(k)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    c = Cluster(k, apps, core, admin_url(k), router_token(core, k))
    routed = c.status()
    slots = {}
    for slot in SLOTS:
        dep = c.slot(slot)
        slots[slot] = None if dep is None else {
            "revision": notes_of(dep).get(f"{ANNOTATION}/revision"),
            "replicas": dep["spec"].get("replicas"),
            "ready": (dep.get("status") or {}).get("readyReplicas") or 0}
    return {"serving_slot": c.serving_slot(routed), "revision": routed.get("revision"),
            "canary": routed.get("canary"), "shadow": routed.get("shadow"), "slots": slots}
