"""Blue/green behind requant's router, written once for every target with two places for a
revision.

The steps, in order: fill the idle place with the new revision, verify it there (readiness,
smoke, load test against the SLOs), run the shadow and canary phases through the router, switch
the router, record, let the target settle, drain and retire the old place.

A target is a ``Slots``: the local target's places are model server processes on free ports
beside each other (``requant.rollout.local``), the cluster router's are two Deployments
(``requant.rollout.kubernetes_router``). What differs between them (how a place is filled,
waited for, stopped and recorded; where the record of truth lives) is the target's; the order
of the steps, what a failed check does and which phases run are here, so a new target (or a
model of a fleet) is one more ``Slots``, not one more copy of the phases. The plain Kubernetes
target has no router and no second place: it is a rolling update (``requant.rollout.
kubernetes``), not a ``Slots``.

Failure before the switch: the new place is drained and stopped, its failure recorded, and the
serving place never stopped serving. ``kill -9`` between any two steps: each target records
ahead of its steps and its next rollout finishes or reaps what was left
(``tests/test_rollout_kill_points.py``, ``tests/test_rollout_kubernetes_phases.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from requant.errors import DeploymentCheckFailed, RolloutFailed
from requant.killpoints import kill_point
from requant.rollout.live_phases import NewRevision, run_phases, run_shadow
from requant.rollout.state import Deployed, Release
from requant.serving.checks import verify_deployment
from requant.settings import CanarySettings, PipelineSettings, ShadowSettings

Log = Callable[[str], None]


@dataclass(frozen=True)
class Serving:
    """The revision the router sends traffic to now, and whether its place still answers."""

    revision: str
    alive: Callable[[], bool]


@dataclass(frozen=True)
class Filled:
    """The new revision in the idle place: its URL, whether it still runs, and the target's
    own handle on it (a server process, a slot's name)."""

    url: str
    alive: Callable[[], bool]
    handle: Any = None
    process_alive: Callable[[], bool] | None = None  # a process whose exit the checks see


@dataclass(frozen=True)
class Phases:
    """A target's live-phase settings (``rollout.local`` or ``rollout.kubernetes.router``)."""

    shadow: ShadowSettings
    canary: CanarySettings


class Slots(Protocol):
    """One target's two places behind one router."""

    router: str  # the router's admin URL
    token: str  # its admin token
    phases: Phases
    ready_timeout_s: float  # readiness, once the place is filled
    verified_point: str  # the kill point after the load test

    def serving(self) -> Serving | None: ...

    def already(self, release: Release, serving: Serving | None) -> Deployed | None:
        """The record, if ``release`` serves already and answers: nothing to do."""

    def fill(self, release: Release, serving: Serving | None) -> Filled:
        """The idle place at ``release``, recorded as not yet serving from the moment it
        exists (a rollout killed from then on is finished or reaped by the next)."""

    def wait(self, new: Filled) -> None:
        """Until the filled place is up (the cluster's rollout of a slot); a failure raises
        ``DeploymentCheckFailed`` and discards it."""

    def discard(self, new: Filled, release: Release, failure: tuple[str, str] | None) -> None:
        """The new place, failed (``failure``: its check and reason, recorded) or abandoned
        (None: an error or an interrupt), drained and stopped; the serving place untouched."""

    def verified(self, new: Filled) -> None:
        """The checks passed: said where the target keeps its truth."""

    def switch(self, new: Filled, release: Release) -> None:
        """The router to the new place."""

    def record(self, new: Filled, release: Release, verification: dict[str, Any]) -> Deployed:
        """The switch on record: the new place serves."""

    def settle(self, new: Filled, release: Release, deployed: Deployed) -> None:
        """After the record, before the old place goes (the local target keeps it warm as the
        router's fallback for a while, and undoes the rollout if the new one dies)."""

    def retire(self) -> None:
        """The old place drained and stopped (or scaled to 0)."""


def blue_green(slots: Slots, settings: PipelineSettings, release: Release,
               log: Log) -> tuple[Deployed, bool]:
    """The rollout to ``release``; returns (what serves now, whether anything changed)."""
    serving = slots.serving()
    if (kept := slots.already(release, serving)) is not None:
        return kept, False
    started = time.monotonic()
    new = slots.fill(release, serving)
    verification = verify(slots, settings, new, release, serving, log)
    slots.switch(new, release)
    shifted = round(time.monotonic() - started, 2)
    log(f"traffic shifted to {release.label()} after {shifted} s")
    deployed = slots.record(new, release, verification | {"rollout_to_shift_s": shifted})
    slots.settle(new, release, deployed)
    slots.retire()
    return deployed, True


def verify(slots: Slots, settings: PipelineSettings, new: Filled, release: Release,
           serving: Serving | None, log: Log) -> dict[str, Any]:
    """Smoke, load test and the live phases on the new place only; any failure discards it
    and leaves the serving place serving. Returns what the checks measured, for the record."""
    rcfg = settings.rollout
    try:
        slots.wait(new)
        report = verify_deployment(new.url, rcfg.served_model_name, rcfg.slo, rcfg.smoke_prompt,
                                   slots.ready_timeout_s, new.process_alive)
        kill_point(slots.verified_point)
        phases = live_phases(slots, new, release, serving, log)
    except DeploymentCheckFailed as exc:
        slots.discard(new, release, (exc.check, exc.reason))
        raise RolloutFailed(release, exc.check, exc.reason, exc.report) from None
    except BaseException:
        slots.discard(new, release, None)
        raise
    slots.verified(new)
    return report.as_record() | phases


def live_phases(slots: Slots, new: Filled, release: Release, serving: Serving | None,
                log: Log) -> dict[str, Any]:
    """The shadow phase, then the canary phases, where configured and a serving revision is
    there to compare with (the first rollout, or a redeploy of the serving revision itself,
    has none: it switches after the load test)."""
    cfg = slots.phases
    records: dict[str, Any] = {"shadow": None, "canary": []}
    if not cfg.shadow.seconds and not cfg.canary.phases:
        return records
    if serving is None or serving.revision == release.revision or not serving.alive():
        log("no serving revision to compare live traffic with: switching after the load test")
        return records
    phase = NewRevision(slots.router, slots.token, new.url, release.revision, serving.revision,
                        new.alive)
    if cfg.shadow.seconds:
        records["shadow"] = run_shadow(phase, cfg.shadow, cfg.canary.poll_s, log)
    records["canary"] = run_phases(phase, cfg.canary, log)
    return records
