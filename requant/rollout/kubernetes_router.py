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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from requant.killpoints import kill_point
from requant.rollout.blue_green import Filled, Phases, Serving, blue_green
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
from requant.rollout.live_phases import put_phase, router_call, wait_drained
from requant.rollout.state import (
    Deployed,
    Intent,
    Release,
    load_state,
    now_iso,
    save_state,
)
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
    """Blue/green between the two slots (``requant.rollout.blue_green``)."""
    c = connect(settings.rollout.kubernetes, log)
    slots = RouterSlots(settings, c, clear_phases(c, log), flow_run_id, intent, log)
    return blue_green(slots, settings, release, log)


class RouterSlots:
    """The cluster router's two places: slots ``a`` and ``b``, each a Deployment and its
    Service. The truth is in the cluster (the router's backend, each slot's annotations); the
    worker's record is an audit copy."""

    verified_point = "k8s-verified"
    ready_timeout_s = 120.0  # the slot's pods are available by then: its rollout waited

    def __init__(self, settings: PipelineSettings, c: Cluster, status: dict[str, Any],
                 flow_run_id: str | None, intent: Intent, log: Log) -> None:
        self.settings, self.c, self.flow_run_id, self.intent, self.log = (
            settings, c, flow_run_id, intent, log)
        self.router, self.token = c.admin, c.token
        self.phases = Phases(c.k.router.shadow, c.k.router.canary)
        self.serving_slot = c.serving_slot(status)
        self.idle = idle_slot(self.serving_slot)

    def _revision(self, slot: str | None) -> str | None:
        return notes_of(self.c.slot(slot)).get(f"{ANNOTATION}/revision") if slot else None

    def serving(self) -> Serving | None:
        slot, revision = self.serving_slot, self._revision(self.serving_slot)
        return None if slot is None or revision is None else Serving(
            revision, lambda: self.c.available(slot))

    def already(self, release: Release, serving: Serving | None) -> Deployed | None:
        slot, k = self.serving_slot, self.c.k
        if slot is None or serving is None or serving.revision != release.revision \
                or not serving.alive():
            return None
        self.log(f"{release.label()} is already served by {k.namespace}/{slot_name(k, slot)}")
        retire(self.c, idle_slot(slot), self.log)
        return record(self.settings, release, self.flow_run_id, slot, {}, self.intent,
                      event=False)

    def fill(self, release: Release, serving: Serving | None) -> Filled:
        fill(self.c, self.settings, release, self.idle, self.serving_slot, self.flow_run_id,
             self.intent, self.log)
        idle = self.idle
        return Filled(slot_url(self.c.k, idle), lambda: self.c.available(idle), idle)

    def wait(self, new: Filled) -> None:
        k = self.c.k
        wait_rollout(self.c.apps, k, k.rollout_timeout_s, slot_name(k, self.idle))

    def discard(self, new: Filled, release: Release, failure: tuple[str, str] | None) -> None:
        """The slot scaled back to 0, its requests drained first after a failed check; the
        serving slot untouched."""
        if failure is None:
            with contextlib.suppress(Exception):  # best effort: the next rollout refills it
                self.c.scale(self.idle, 0)
            return
        try:
            self.c.drain(new.url, self.c.k.router.drain_timeout_s)
        except RuntimeError as unreachable:  # the rollback goes on: nothing routes there now
            self.log(f"could not wait for the canary's requests: {unreachable}")
        self.c.scale(self.idle, 0)
        rcfg = self.settings.rollout
        state = load_state(rcfg.state_dir, TARGET)
        state.record_event("rolled-back", release, self.flow_run_id, now_iso(),
                           f"{failure[0]}: {failure[1][:500]}")
        save_state(rcfg.state_dir, state)

    def verified(self, new: Filled) -> None:
        mark_verified(self.c.apps, self.c.k, slot_name(self.c.k, self.idle))

    def switch(self, new: Filled, release: Release) -> None:
        router_call("PUT", self.c.admin, "/-/backend", token=self.c.token,
                    what="switch the router", body={"url": new.url, "revision": release.revision})
        kill_point("k8s-switched")

    def record(self, new: Filled, release: Release, verification: dict[str, Any]) -> Deployed:
        return record(self.settings, release, self.flow_run_id, self.idle, verification,
                      self.intent, event=True)

    def settle(self, new: Filled, release: Release, deployed: Deployed) -> None:
        """Nothing: the old slot is scaled to 0 with its template kept (a rollback is a
        scale-up away)."""

    def retire(self) -> None:
        if self.serving_slot is not None:
            retire(self.c, self.serving_slot, self.log)


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
