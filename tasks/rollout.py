"""Rollout stage: what to deploy (a published commit, a local checkpoint, or "the previous
one"), getting its files, and handing it to the configured target. One interface, two targets:
``tasks/rollout_local.py`` (blue/green on this host) and ``tasks/rollout_kubernetes.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from requant.atomic import atomic_directory
from requant.deploy_state import Deployed, Release, load_state
from requant.hashing import fingerprint, hash_files
from requant.settings import HubSettings, PipelineSettings, SettingsError
from tasks.publish import endpoint, move_production_marker, resolve_token, retry_transient
from tasks.rollout_kubernetes import rollout_kubernetes
from tasks.rollout_local import RolloutFailed, rollout_local

__all__ = ["RolloutFailed", "fetch_release", "move_marker", "resolve_release", "rollout"]


def resolve_release(settings: PipelineSettings, revision: str | None = None,
                    checkpoint: str | Path | None = None, rollback: bool = False) -> Release:
    """Exactly one of: a Hub commit SHA, a local checkpoint, or rollback to the previous."""
    target = settings.rollout.target
    if target == "none":
        raise SettingsError("rollout.target: is 'none', so there is nothing to roll out to. Set "
                            "rollout.target to 'local' or 'kubernetes'.")
    given = [name for name, value in (("revision", revision), ("checkpoint", checkpoint),
                                      ("rollback", rollback)) if value]
    if len(given) != 1:
        raise SettingsError(
            f"promote: give exactly one of revision (a published commit SHA), checkpoint (a "
            f"local folder) or rollback=true; got {given or 'none'}."
        )
    if rollback:
        state = load_state(settings.rollout.state_dir, target)
        if state.previous is None:
            raise SettingsError(f"rollback: the {target} target has no previous revision on "
                                f"record ({settings.rollout.state_dir}); nothing to go back to.")
        return state.previous.release
    if revision:
        if settings.hub.repo_id is None:
            raise SettingsError("hub.repo_id: needed to deploy revision "
                                f"{revision!r}; set it to the repo the revision was published to.")
        if len(revision) != 40 or any(c not in "0123456789abcdef" for c in revision):
            raise SettingsError(f"revision: {revision!r} is not a 40-character commit SHA. "
                                "Deploy commits, never branch names (they move).")
        return Release(revision=revision, repo_id=settings.hub.repo_id)
    path = Path(str(checkpoint))
    if not (path / "config.json").is_file():
        raise SettingsError(f"checkpoint: {path} is not a model folder (no config.json).")
    digest = fingerprint(hash_files(path))
    return Release(revision=f"local-{digest[:16]}", checkpoint=str(path.resolve()))


def fetch_release(hub: HubSettings, release: Release, cache_dir: Path) -> Release:
    """A Hub release's files in a local folder (for the local target), fetched once per commit
    with the real huggingface_hub client, written atomically."""
    if release.checkpoint or release.repo_id is None:
        return release
    from huggingface_hub import snapshot_download

    final = Path(cache_dir) / "releases" / release.repo_id.replace("/", "--") / release.revision
    if not (final / "config.json").is_file():
        with atomic_directory(final) as tmp:
            snapshot_download(release.repo_id, revision=release.revision, local_dir=tmp,
                              endpoint=endpoint(hub), token=resolve_token(hub))
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the client's bookkeeping
    return Release(release.revision, release.repo_id, str(final))


@task(name="fetch-release", retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_transient)
def fetch_release_task(hub: HubSettings, release: Release, cache_dir: Path) -> Release:
    return fetch_release(hub, release, cache_dir)


@task(name="rollout")
def rollout(settings: PipelineSettings, release: Release, flow_run_id: str | None
            ) -> tuple[Deployed, bool]:
    """Not retried: a rollout that failed verification was rolled back on purpose."""
    log = get_run_logger()
    run = rollout_local if settings.rollout.target == "local" else rollout_kubernetes
    try:
        deployed, changed = run(settings, release, flow_run_id, log.info)
    except RolloutFailed as exc:
        create_markdown_artifact(key="requant-rollout", markdown=render_rollout(
            settings, release, None, False, failure=exc))
        raise
    create_markdown_artifact(key="requant-rollout",
                             markdown=render_rollout(settings, release, deployed, changed))
    return deployed, changed


@task(name="move-production-marker", retries=3, retry_delay_seconds=[5, 20, 60],
      retry_condition_fn=retry_transient)
def move_marker(hub: HubSettings, sha: str) -> None:
    move_production_marker(hub, sha, resolve_token(hub))
    get_run_logger().info("moved %s's %s branch to %s", hub.repo_id, hub.production_ref, sha)


def render_rollout(settings: PipelineSettings, release: Release, deployed: Deployed | None,
                   changed: bool, failure: RolloutFailed | None = None) -> str:
    target = settings.rollout.target
    if failure is not None:
        lines = [f"# Rollout ROLLED BACK: {release.label()}", "",
                 f"- target: {target}", f"- failed check: **{failure.check}**",
                 f"- reason: {failure.reason}",
                 "- the previous revision keeps serving; the production marker did not move"]
        load = failure.report.get("load") or {}
    else:
        assert deployed is not None
        lines = [f"# Rollout {'done' if changed else 'no-op (already serving)'}: "
                 f"{release.label()}", "", f"- target: {target}",
                 f"- endpoint: `{deployed.endpoint}` "
                 f"(model `{settings.rollout.served_model_name}`)",
                 f"- deployed at: {deployed.deployed_at}"]
        load = deployed.verification.get("load") or {}
        if "rollout_to_shift_s" in deployed.verification:
            shift = deployed.verification["rollout_to_shift_s"]
            lines.append(f"- start to traffic shifted: {shift} s")
    if load:
        lines += ["", "| load test | value |", "|---|---|",
                  *[f"| {key} | {load.get(key)} |" for key in
                    ("requests", "concurrency", "errors", "p50_s", "p95_s", "tokens_per_s")]]
    return "\n".join(lines)


