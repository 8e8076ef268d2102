"""The Kubernetes API calls both Kubernetes rollouts make (one Deployment replaced in place, or
the router's two slots): the official client, a Deployment read as a plain dict, replaced
whole, and waited on as `kubectl rollout status` waits."""

from __future__ import annotations

import copy
import time
from typing import Any

from requant.errors import DeploymentCheckFailed, NotOurs
from requant.rollout.k8s_manifest import ANNOTATION, OWNER, OWNER_LABEL
from requant.settings import KubernetesTargetSettings


def api_client(k: KubernetesTargetSettings) -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    if k.kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    config.load_kube_config(config_file=str(k.kubeconfig) if k.kubeconfig else None,
                            context=k.context, client_configuration=configuration)
    return client.ApiClient(configuration)


def not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


def read_deployment(apps: Any, k: KubernetesTargetSettings,
                    name: str | None = None) -> dict[str, Any] | None:
    """The Deployment ``name`` (``k.deployment``), or None where there is none."""
    from kubernetes.client.exceptions import ApiException

    try:
        obj = apps.read_namespaced_deployment(name or k.deployment, k.namespace)
    except ApiException as exc:
        if not_found(exc):
            return None
        raise
    return apps.api_client.sanitize_for_serialization(obj)


def rollout_status(dep: dict[str, Any], replicas: int) -> tuple[bool, str | None]:
    """(complete, failure reason) from a Deployment's status, as `kubectl rollout status`
    reads it: the controller saw the new generation, every replica is updated and available,
    and no old replica is left."""
    meta, status = dep.get("metadata", {}), dep.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return False, f"ProgressDeadlineExceeded: {cond.get('message', '')}"
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return False, None
    done = (status.get("updatedReplicas") or 0) >= replicas \
        and (status.get("replicas") or 0) <= replicas \
        and (status.get("availableReplicas") or 0) >= replicas
    return done, None


def wait_rollout(apps: Any, k: KubernetesTargetSettings, deadline_s: float,
                 name: str | None = None) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        dep = read_deployment(apps, k, name)
        if dep is None:
            raise DeploymentCheckFailed("rollout", "the Deployment disappeared")
        done, failure = rollout_status(dep, dep["spec"].get("replicas", k.replicas))
        if failure:
            raise DeploymentCheckFailed("rollout", failure)
        if done:
            return
        if time.monotonic() > deadline:
            raise DeploymentCheckFailed(
                "rollout", f"not complete after {deadline_s:.0f} s "
                f"(rollout.kubernetes.rollout_timeout_s); status: {dep.get('status')}")
        time.sleep(k.poll_interval_s)


def check_owned(obj: dict[str, Any] | None, kind: str, namespace: str) -> None:
    """Refuse (NotOurs) an existing object without requant's label and owner annotation."""
    if obj is None:
        return
    meta = obj.get("metadata") or {}
    key, value = OWNER_LABEL
    if (meta.get("labels") or {}).get(key) != value \
            or (meta.get("annotations") or {}).get(OWNER) != "requant":
        raise NotOurs(kind, namespace, meta.get("name", "?"))


def replace_deployment(apps: Any, k: KubernetesTargetSettings, body: dict[str, Any],
                       current: dict[str, Any] | None) -> None:
    """Create ``body``, or replace ``current`` with it whole (what runs is what was rendered);
    never a Deployment requant did not create."""
    if current is None:
        apps.create_namespaced_deployment(k.namespace, body)
        return
    check_owned(current, "Deployment", k.namespace)
    body = copy.deepcopy(body)
    body["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
    apps.replace_namespaced_deployment(body["metadata"]["name"], k.namespace, body)




def writable(dep: dict[str, Any]) -> dict[str, Any]:
    """What a replace sends back of a Deployment read from the API: a copy without status."""
    return {key: copy.deepcopy(dep[key]) for key in ("apiVersion", "kind", "metadata", "spec")}


def mark_verified(apps: Any, k: KubernetesTargetSettings, name: str | None = None) -> None:
    """The Deployment's record says ``verified: "true"`` only once smoke and load checks passed
    (a metadata change: no new pods). Until then "already deployed" never trusts it."""
    current = read_deployment(apps, k, name)
    assert current is not None
    body = writable(current)
    body["metadata"].setdefault("annotations", {})[f"{ANNOTATION}/verified"] = "true"
    replace_deployment(apps, k, body, current)
