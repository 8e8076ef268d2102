"""Promote: roll a published revision out to the serving target, verified, then move the Hub's
production marker. Also the manual rollback (``rollback=true``: the previous revision, through
the same verified path).

    resolve release -> fetch files (local target) -> rollout (start beside, verify, shift,
    drain) -> move production marker

Any failed check rolls back inside the rollout stage: the old revision keeps serving, the marker
does not move, and the flow fails with the reason.

Run it:  python -m flows.promote --config deployments/configs/demo.yaml --set rollout.target=local
             (--revision <sha> | --checkpoint runs/<id>/checkpoint | --rollback)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from requant.settings import PipelineSettings, SettingsError, load_settings, validate_settings
from tasks.rollout import (
    RolloutFailed,
    fetch_release_task,
    move_marker,
    resolve_release,
    rollout,
)
from tasks.rollout_local import check_local_settings


@flow(name="promote", log_prints=True)
def promote(
    settings: PipelineSettings = PipelineSettings(),
    revision: str | None = None,
    checkpoint: str | None = None,
    rollback: bool = False,
) -> dict[str, Any]:
    """Deploy a published commit SHA (or a local checkpoint, for the offline demo), or roll back
    to the previous revision; the production marker moves only after verification passed."""
    logger = get_run_logger()
    settings = validate_settings(settings)
    if settings.rollout.target == "local":
        check_local_settings(settings)
    release = resolve_release(settings, revision, checkpoint, rollback)
    logger.info("%s %s to the %s target", "rolling back to" if rollback else "promoting",
                release.label(), settings.rollout.target)
    if settings.rollout.target == "local":
        release = fetch_release_task(settings.hub, release, settings.cache_dir)
    deployed, changed = rollout(settings, release, str(flow_run.get_id() or "") or None)
    marker_moved = False
    if release.repo_id:
        move_marker(settings.hub, release.revision)
        marker_moved = True
    return {"release": asdict(release), "deployed": asdict(deployed), "changed": changed,
            "production_marker_moved": marker_moved, "target": settings.rollout.target}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="settings YAML (default: the embedded demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override one setting (repeatable)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--revision", help="published commit SHA on hub.repo_id")
    what.add_argument("--checkpoint", help="a local checkpoint folder (dry-run demo)")
    what.add_argument("--rollback", action="store_true", help="back to the previous revision")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, args.overrides)
        result = promote(settings, args.revision, args.checkpoint, args.rollback)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RolloutFailed as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    d = result["deployed"]
    print(f"\nserving {d['release']['revision']} at {d['endpoint']} "
          f"(model {settings.rollout.served_model_name}); "
          f"{'changed' if result['changed'] else 'already serving, nothing changed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
