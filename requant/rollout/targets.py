"""The rollout targets by name (``rollout.target``): what the flows, the preflight and
``requant promote --rollback`` need of each, in one table, so the rest of the pipeline asks the
table instead of branching on the name.

- ``local``: blue/green between model server processes behind requant's router on this host
  (``requant.rollout.local``, one ``requant.rollout.blue_green.Slots``);
- ``kubernetes``: with ``rollout.kubernetes.router.enabled``, blue/green between two slot
  Deployments behind requant's router in the cluster (``requant.rollout.kubernetes_router``,
  the same core); without it, a rolling update of one Deployment
  (``requant.rollout.kubernetes``).

``none`` is no target: the run stops after publishing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from requant.rollout import kubernetes, kubernetes_router, local
from requant.rollout.k8s_manifest import check_strategy
from requant.rollout.state import Deployed, Intent, Release
from requant.settings import PipelineSettings

Log = Callable[[str], None]
Rollout = Callable[[PipelineSettings, Release, str | None, Log, Intent], tuple[Deployed, bool]]


@dataclass(frozen=True)
class Target:
    #: the rollout to a release: (what serves now, whether anything changed)
    rollout: Rollout
    #: the target's settings checked at the preflight (bad input before expensive work)
    check: Callable[[PipelineSettings], None]
    #: the rollback's release read from where the target keeps its truth, with where that
    #: was (None: the worker's deployed-state record is the truth)
    previous: Callable[[PipelineSettings], tuple[Release | None, str]] | None = None


def _kubernetes_rollout(settings: PipelineSettings, release: Release, flow_run_id: str | None,
                        log: Log, intent: Intent) -> tuple[Deployed, bool]:
    run = kubernetes_router.rollout_kubernetes_router \
        if settings.rollout.kubernetes.router.enabled else kubernetes.rollout_kubernetes
    return run(settings, release, flow_run_id, log, intent)


def _kubernetes_previous(settings: PipelineSettings) -> tuple[Release | None, str]:
    k = settings.rollout.kubernetes
    return (kubernetes_router.previous_release_routed if k.router.enabled
            else kubernetes.previous_release)(k)


TARGETS: dict[str, Target] = {
    "local": Target(local.rollout_local, local.check_local_settings),
    "kubernetes": Target(_kubernetes_rollout, lambda s: check_strategy(s.rollout.kubernetes),
                         _kubernetes_previous),
}


def target_of(settings: PipelineSettings) -> Target | None:
    """The run's target; None for ``rollout.target: none``."""
    return TARGETS.get(settings.rollout.target)
