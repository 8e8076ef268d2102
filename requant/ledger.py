"""The candidate ledger: which exact candidates were already published, so the nightly run can
finish in seconds when nothing that determines the result changed.

A candidate's key covers everything that decides what would be published and whether: the
source (Hub commit, or every file's hash for a local folder), the recipe's bytes, the calibration
set's fingerprint, the quantization/evaluation/gate settings, the target repo, and the versions
of the libraries that compute the weights. Equal key, equal candidate: re-quantizing and
re-evaluating would only reproduce it. One small JSON file per key under ``cache_dir/ledger``
(on a cluster, the same shared volume as the model cache), written only after a successful
publish, so a failed run never makes the next one skip.

"Published" is not "deployed": what serves is the rollout target's own record
(``requant.rollout.state``: what serves, which revisions an operator rolled back from, whether
the production marker followed), never a copy kept here. A run whose candidate is published but
not serving on its target rolls it out without requantizing (``pending_rollout``); a revision
rolled back by hand is not pushed again by the nightly run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from requant.atomic import read_json, write_json_atomic
from requant.hashing import fingerprint
from requant.quantization.manifest import library_versions
from requant.rollout.state import DeployState
from requant.settings import PipelineSettings

LEDGER_DIR = "ledger"
_LEDGER_FIX = ("Delete it: the next run then redoes (or re-rolls out) this candidate instead of "
              "trusting the record.")


def candidate_key(settings: PipelineSettings, source_files: dict[str, str],
                  source_revision: str | None, recipe_sha256: str,
                  calibration_fingerprint: str | None) -> str:
    from requant.evaluation.task_files import task_data_hashes, task_dir

    # Paths are left out (they are absolute, so they name the checkout, not the candidate); what
    # they point at is in: the recipe's bytes, the task files' hashes.
    return fingerprint({
        "source": {"revision": source_revision} if source_revision else {"files": source_files},
        "recipe_sha256": recipe_sha256,
        "calibration": calibration_fingerprint,
        # resume_inputs_every only changes how a killed run resumes: keys from before it stay
        "quantization": settings.quantization.model_dump(
            mode="json", exclude={"device", "recipe", "resume_inputs_every"}),
        "evaluation": settings.evaluation.model_dump(mode="json",
                                                     exclude={"server", "task_dir",
                                                              "data_roots"}),
        "task_files": fingerprint(task_data_hashes(task_dir(settings.evaluation))),
        "gate": settings.gate.model_dump(mode="json"),
        "hub": {"repo_id": settings.hub.repo_id, "branch": settings.hub.branch},
        "versions": {k: v for k, v in library_versions().items() if k != "requant"},
        # a search's winner was chosen among these: the same candidate won among others is
        # another result (absent without a search, so a single run's key is unchanged; the
        # load only where the objective measures under it)
        **({"search": settings.search.model_dump(
            mode="json", exclude={"candidates": {"__all__": {"recipe"}}}
            | ({} if settings.search.objective == "throughput" else {"load": True}))}
           if settings.search.candidates else {}),
    })


def _path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / LEDGER_DIR / f"{key}.json"


def find_published(cache_dir: Path, key: str) -> dict[str, Any] | None:
    return read_json(_path(cache_dir, key), _LEDGER_FIX)


def record_published(cache_dir: Path, key: str, run_id: str, publish: dict[str, Any],
                     gate: dict[str, Any] | None) -> Path:
    path = _path(cache_dir, key)
    write_json_atomic(path, {
        "candidate_key": key, "run_id": run_id,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "repo_id": publish.get("repo_id"), "commit_sha": publish.get("commit_sha"),
        "tag": publish.get("tag"), "dry_run": publish.get("dry_run"),
        "checkpoint": publish.get("checkpoint"), "gate": gate,
    })
    return path


def pending_rollout(hit: dict[str, Any], deployed: DeployState
                    ) -> tuple[dict[str, str] | None, str]:
    """(promote arguments, why) for a published candidate that is not serving, or serves with
    the production marker not yet moved to it; (None, why) when it serves and the marker
    follows, or an operator rolled it back. ``deployed``: the target's record, the one that
    says what serves (requant.rollout.state)."""
    if not hit.get("dry_run") and hit.get("commit_sha"):
        args, ident = {"revision": hit["commit_sha"]}, hit["commit_sha"]
    else:
        ckpt = str(Path(hit["checkpoint"]).resolve()) if hit.get("checkpoint") else None
        if ckpt is None or not Path(ckpt).is_dir():
            return None, "its dry-run checkpoint is gone; nothing to roll out"
        args, ident = {"checkpoint": ckpt}, ckpt
    active = deployed.active
    if active is not None and ident in active.release.identities():
        if active.marker == "pending":
            return args, "it serves, but the production marker was not moved to it"
        return None, "it is serving"
    if ident in deployed.withdrawn:
        return None, "an operator rolled it back; promote it explicitly to serve it again"
    return args, "published but not serving (its rollout failed or never ran)"
