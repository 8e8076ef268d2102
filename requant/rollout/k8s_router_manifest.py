"""Manifests for requant's router in the cluster, in front of two vLLM Deployments (slots).

The public Service keeps the target's name (``rollout.kubernetes.deployment``) and selects the
router's pod; each slot is a Deployment and a Service named ``<deployment>-a`` / ``-b``, rendered
as the single-Deployment target renders its one (``k8s_manifest.render_deployment``). The
router's admin API listens on its own port behind its own ClusterIP Service, which no public
Service or Ingress exposes; every admin call carries the token from a Secret the rollout creates
(``secretKeyRef``-style mount: the token never appears in a manifest, an argument or a log).

One router replica: the admin state (backend, phases) lives in that process and its state file,
as on the local target. Its pod restarting keeps the state (an ``emptyDir`` survives container
restarts); a pod rescheduled elsewhere starts empty and answers 503 until the next rollout sets
the backend again, which the nightly's no-op run does (docs/rollout.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from requant.rollout.k8s_manifest import labels, owner_note, render_service
from requant.settings import KubernetesTargetSettings

SLOTS = ("a", "b")
#: The digest of the router's rendered spec, on its Deployment: the API server fills in
#: defaults, so comparing specs would always differ and restart the router on every rollout.
SPEC_NOTE = "requant.dev/router-spec"
ROUTER_PORT, ADMIN_PORT = 8000, 8001
TOKEN_DIR = "/etc/requant-router"


def slot_name(k: KubernetesTargetSettings, slot: str) -> str:
    return f"{k.deployment}-{slot}"


def idle_slot(serving: str | None) -> str:
    """The slot a rollout fills: the one not serving (the first on a first rollout)."""
    return SLOTS[1] if serving == SLOTS[0] else SLOTS[0]


def router_name(k: KubernetesTargetSettings) -> str:
    return f"{k.deployment}-router"


def admin_service_name(k: KubernetesTargetSettings) -> str:
    return f"{k.deployment}-router-admin"


def token_secret_name(k: KubernetesTargetSettings) -> str:
    return f"{k.deployment}-router-token"


def router_labels(k: KubernetesTargetSettings) -> dict[str, str]:
    return labels(k, router_name(k), app="requant-router")


def render_router(k: KubernetesTargetSettings) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/-/metrics", "port": ROUTER_PORT}}
    container = {
        "name": "router",
        "image": k.router.image,
        "command": ["python", "-m", "requant.serving.router"],
        "args": ["--host", "0.0.0.0", "--port", str(ROUTER_PORT),
                 "--admin-port", str(ADMIN_PORT), "--token-file", f"{TOKEN_DIR}/token",
                 "--state-file", "/var/lib/requant-router/router.json"],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT},
                  {"name": "admin", "containerPort": ADMIN_PORT}],
        "volumeMounts": [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                         {"name": "state", "mountPath": "/var/lib/requant-router"}],
        "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
    }
    spec = {
        "replicas": 1,
        "selector": {"matchLabels": router_labels(k)},
        # one router at a time: two would each hold half of the clients' in-flight counts
        "strategy": {"type": "Recreate"},
        "template": {
            "metadata": {"labels": router_labels(k)},
            "spec": {
                "containers": [container],
                # a drain's worth: in-flight completions finish before the pod goes
                "terminationGracePeriodSeconds": 60,
                "volumes": [{"name": "token", "secret": {
                                "secretName": token_secret_name(k), "defaultMode": 0o400,
                                "items": [{"key": "token", "path": "token"}]}},
                            {"name": "state", "emptyDir": {}}],
            },
        },
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": router_name(k), "namespace": k.namespace,
                         "labels": router_labels(k),
                         "annotations": {SPEC_NOTE: digest} | owner_note()},
            "spec": spec}


def render_router_services(k: KubernetesTargetSettings) -> list[dict[str, Any]]:
    """The public Service (the target's name, the router's port) and the admin one."""
    public = render_service(k, k.deployment, router_labels(k), ROUTER_PORT, "http")
    admin = render_service(k, admin_service_name(k), router_labels(k), ADMIN_PORT, "admin")
    return [public, admin]


def render_token_secret(k: KubernetesTargetSettings, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": token_secret_name(k), "namespace": k.namespace,
                         "labels": router_labels(k), "annotations": owner_note()},
            "stringData": {"token": token}}

