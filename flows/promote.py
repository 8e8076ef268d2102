"""Promote: roll a published revision out to the serving target, verified, then move the Hub's
production marker. Also the manual rollback (``rollback=true``: the previous revision, through
the same verified path).

    resolve release -> fetch files (local target) -> rollout (start beside, verify, shift,
    drain; recorded serving, marker pending) -> move production marker (recorded moved)

Any failed check rolls back inside the rollout stage: the old revision keeps serving, the marker
does not move, and the flow fails with the reason. The target's record (requant.rollout.state)
is the one record of what serves; a failed marker move leaves it saying "marker pending", and
promoting the same revision again moves the marker without a new rollout.

Run it:  requant promote --config deployments/configs/demo.yaml
             (--revision <sha> | --checkpoint runs/<id>/checkpoint | --rollback)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from requant.errors import SettingsError
from requant.profile import checkpoint_in_profile, compose, profile_for
from requant.rollout.gate_record import gate_record
from requant.rollout.local import check_local_settings
from requant.rollout.lock import rollout_lock
from requant.rollout.release import resolve_release
from requant.rollout.state import Intent, Release
from requant.run_request import RunRequest, validate_request
from requant.settings import PipelineSettings
from requant.tasks.rollout import fetch_release_task, move_marker, rollout


@flow(name="promote", log_prints=True)
def promote(
    request: RunRequest = RunRequest(),
    # "" is unset too: the gate event's payload carries strings (prefect.yaml's trigger)
    revision: Annotated[str | None, Field(pattern=r"^([0-9a-f]{40})?$")] = None,
    checkpoint: Annotated[str | None, Field(pattern=r"^([A-Za-z0-9._/-]{1,500})?$")] = None,
    rollback: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Deploy a published commit SHA (or a local checkpoint under the profile's output_dir, for
    the offline demo), or roll back to the previous revision; the production marker moves only
    after verification passed. What the gate did not pass is refused unless ``force`` (then
    recorded as forced). The run chooses only these; its profile says where (docs/trust.md)."""
    request = validate_request(request)
    revision, checkpoint = revision or None, checkpoint or None
    profile = profile_for(request)
    settings = compose(profile, request)
    if checkpoint is not None:
        checkpoint = str(checkpoint_in_profile(profile, settings, checkpoint))
    logger = get_run_logger()
    if settings.rollout.target == "local":
        check_local_settings(settings)
    with rollout_lock(settings.rollout.state_dir, settings.rollout.target, logger.info):
        release = resolve_release(settings, revision, checkpoint, rollback)
        forced = not rollback and check_gated(settings, release, force, logger.warning)
        logger.info("%s %s to the %s target", "rolling back to" if rollback else "promoting",
                    release.label(), settings.rollout.target)
        if settings.rollout.target == "local":
            release = fetch_release_task(settings.hub, release, settings.cache_dir)
        run_id = str(flow_run.get_id() or "") or None
        deployed, changed = rollout(settings, release, run_id, Intent(rollback, forced))
        marker_moved = False
        if release.repo_id:  # recorded "pending" by the rollout until this returns
            move_marker(settings, release.revision)
            marker_moved = True
    return {"release": asdict(release), "deployed": asdict(deployed), "changed": changed,
            "production_marker_moved": marker_moved, "target": settings.rollout.target,
            "forced": forced}


def check_gated(settings: PipelineSettings, release: Release, force: bool,
                warn: Any) -> bool:
    """True when this promote is forced past a missing or failed gate; refused without
    ``force``."""
    decision, where = gate_record(settings.hub, release)
    if decision is not None:
        return False
    if not force:
        raise SettingsError(
            f"promote: {release.label()} did not pass the gate ({where}). Promote it anyway with "
            "--force (force=true in the UI); the deployment is then recorded as forced.")
    warn(f"FORCED: promoting {release.label()} without a passed gate ({where})")
    return True
