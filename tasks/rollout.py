"""Rollout stage: fetch the release, hand it to the configured target, move the marker.

One interface, the targets of ``requant.rollout.targets``; each rolls itself back on any failed
check.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from requant.errors import RolloutFailed, retry_transient
from requant.hub.client import resolve_token
from requant.hub.marker import move_production_marker
from requant.killpoints import MARKER, kill_point
from requant.progress import StageProgress
from requant.report import render_rollout
from requant.rollout.release import fetch_release
from requant.rollout.state import Deployed, Intent, Release, record_marker_moved
from requant.rollout.targets import target_of
from requant.settings import HubSettings, PipelineSettings

#: About how many steps a target reports during a rollout (start, ready, verify, switch, drain,
#: stop, ...): only scales the progress bar; the messages are the truth.
ROLLOUT_STEPS = 8


@task(name="fetch-release", retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_transient)
def fetch_release_task(hub: HubSettings, release: Release, cache_dir: Path) -> Release:
    """Retried: a dropped download is the network's fault, not the release's."""
    return fetch_release(hub, release, cache_dir)


@task(name="rollout")
def rollout(settings: PipelineSettings, release: Release, flow_run_id: str | None,
            intent: Intent = Intent()) -> tuple[Deployed, bool]:
    """Not retried: a rollout that failed verification was rolled back on purpose."""
    logger = get_run_logger()
    progress = StageProgress("rollout", f"rolling {release.label()} out")
    phases = iter(range(1, 100))

    def log(message: str) -> None:  # each step the target reports is a phase of the rollout
        logger.info(message)
        progress(min(next(phases) / ROLLOUT_STEPS, 0.95), message, force=True)

    target = target_of(settings)
    assert target is not None  # rollout.target none never reaches the rollout stage
    try:
        deployed, changed = target.rollout(settings, release, flow_run_id, log, intent)
    except RolloutFailed as exc:
        create_markdown_artifact(key="requant-rollout", markdown=render_rollout(
            settings, release, None, False, failure=exc))
        progress.done(f"rolled back: {exc.reason}")
        raise
    progress.done(f"serving {release.label()}")
    create_markdown_artifact(key="requant-rollout",
                             markdown=render_rollout(settings, release, deployed, changed))
    return deployed, changed


@task(name="move-production-marker", retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_transient)
def move_marker(settings: PipelineSettings, sha: str) -> None:
    """Only after a verified rollout: the marker says what production serves, and the target's
    record says the marker caught up (until then it says "pending", and the next promote or
    nightly run of ``sha`` moves it)."""
    hub = settings.hub
    move_production_marker(hub, sha, resolve_token(hub))
    kill_point(MARKER)
    record_marker_moved(settings.rollout.state_dir, settings.rollout.target, sha)
    get_run_logger().info("moved %s's %s branch to %s", hub.repo_id, hub.production_ref, sha)
