"""Kubernetes manifests for serving a published revision with vllm/vllm-openai.

Why a plain Deployment + Service rather than KServe or vLLM's production-stack: the rollout
needs exactly three things from Kubernetes — pin a revision, roll pods with probes that tolerate
a 10-30 minute model load, and undo — and a Deployment does all three with no extra controller
in the cluster (KServe brings Knative/Istio; production-stack's Helm chart renders this same
Deployment behind its own router). Teams that run either can point them at the same image,
arguments and probes rendered here.

Pure functions: the same dicts are validated offline (``validate``) in tests and applied by
``tasks/rollout_kubernetes.py``. Secrets are referenced (secretKeyRef), never embedded.
"""

from __future__ import annotations

import math
from typing import Any

from requant.errors import SettingsError
from requant.rollout.state import Release
from requant.settings import KubernetesTargetSettings

PORT = 8000
ANNOTATION = "requant.dev"
SCHEMA_VERSION = "1.33.0"  # oldest Kubernetes we promise to render for (kubernetes-validate)


#: Written on every object requant creates, with the managed-by label; checked before every
#: update, patch, scale and delete (``requant.rollout.k8s_api.check_owned``).
OWNER = f"{ANNOTATION}/owner"
OWNER_LABEL = ("app.kubernetes.io/managed-by", "requant")


def owner_note() -> dict[str, str]:
    return {OWNER: "requant"}


def labels(k: KubernetesTargetSettings, name: str | None = None,
           app: str = "vllm") -> dict[str, str]:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": name or k.deployment,
            "app.kubernetes.io/managed-by": "requant"}


def vllm_args(k: KubernetesTargetSettings, release: Release, served_name: str) -> list[str]:
    if not release.repo_id:
        raise SettingsError(
            f"release {release.label()}: the kubernetes target serves published revisions only "
            "(hub.repo_id + a commit SHA); a local checkpoint cannot be pulled by a pod."
        )
    return [release.repo_id, "--revision", release.revision,
            "--served-model-name", served_name, "--host", "0.0.0.0", "--port", str(PORT),
            "--max-model-len", str(k.max_model_len), *k.extra_args]


def render_deployment(k: KubernetesTargetSettings, release: Release, served_name: str,
                      record: dict[str, str], name: str | None = None) -> dict[str, Any]:
    """``record``: the deployed-state annotations (revision, previous, flow run, time);
    ``name``: another Deployment than ``k.deployment`` (the router's slots)."""
    name = name or k.deployment
    period = 10
    container: dict[str, Any] = {
        "name": "vllm",
        "image": k.image,
        "args": vllm_args(k, release, served_name),
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [{"name": "HF_HOME", "value": "/models-cache"}],
        "volumeMounts": [{"name": "models-cache", "mountPath": "/models-cache"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        # Model download + load + compile can take many minutes: the startup probe carries that
        # budget, so liveness never kills a pod that is merely still loading.
        "startupProbe": {"httpGet": {"path": "/health", "port": PORT},
                         "periodSeconds": period,
                         "failureThreshold": max(1, math.ceil(k.startup_timeout_s / period))},
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT},
                           "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": PORT},
                          "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5},
    }
    if k.gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(k.gpus)},
                                  "requests": {"nvidia.com/gpu": str(k.gpus)}}
    if k.hf_token_secret:
        container["env"].append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": k.hf_token_secret, "key": "token"}}})
    cache = ({"persistentVolumeClaim": {"claimName": k.model_cache_pvc}} if k.model_cache_pvc
             else {"emptyDir": {}})
    annotations = {f"{ANNOTATION}/{key}": value for key, value in record.items()} | owner_note()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": k.namespace, "labels": labels(k, name),
                     "annotations": annotations},
        "spec": {
            "replicas": k.replicas,
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": int(k.startup_timeout_s) + 600,
            "selector": {"matchLabels": labels(k, name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": k.max_surge, "maxUnavailable": k.max_unavailable}},
            "template": {
                "metadata": {"labels": labels(k, name), "annotations": {
                    f"{ANNOTATION}/revision": release.revision}},
                "spec": {
                    "containers": [container],
                    "terminationGracePeriodSeconds": 60,
                    "volumes": [{"name": "models-cache", **cache},
                                {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }


def render_service(k: KubernetesTargetSettings, name: str | None = None,
                   selector: dict[str, str] | None = None, port: int = PORT,
                   target: str = "http") -> dict[str, Any]:
    """The Service ``name`` (``k.deployment``) in front of the pods ``selector`` picks (that
    Deployment's)."""
    name = name or k.deployment
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": k.namespace, "labels": labels(k, name),
                     "annotations": owner_note()},
        "spec": {"type": "ClusterIP", "selector": selector or labels(k, name),
                 "ports": [{"name": target, "port": port, "targetPort": target}]},
    }


def validate(manifest: dict[str, Any], version: str = SCHEMA_VERSION) -> None:
    """Schema-check a manifest offline (strict: unknown fields are errors, as with kubectl's
    server-side field validation). Raises kubernetes_validate.ValidationError."""
    import kubernetes_validate

    kubernetes_validate.validate(manifest, version, strict=True)


def check_strategy(k: KubernetesTargetSettings) -> None:
    """Surge first: a rollout never takes serving capacity down unless downtime is accepted."""
    zero = {"0", "0%"}
    if str(k.max_surge) in zero and str(k.max_unavailable) in zero:
        raise SettingsError(
            "rollout.kubernetes.max_surge and max_unavailable are both 0: the rollout could "
            "never replace a pod. Set max_surge: 100% (needs spare GPUs) or accept downtime "
            "with max_unavailable: 1 and allow_downtime: true."
        )
    if str(k.max_unavailable) not in zero and not k.allow_downtime:
        raise SettingsError(
            f"rollout.kubernetes.max_unavailable={k.max_unavailable} takes serving pods down "
            f"before their replacements are ready (with replicas: {k.replicas}, "
            f"{'an outage' if k.replicas == 1 else 'less capacity'} for the whole model load, "
            "up to startup_timeout_s). Set max_unavailable: 0 and max_surge: 100% (needs that "
            "many spare GPUs), or accept the downtime with allow_downtime: true."
        )
