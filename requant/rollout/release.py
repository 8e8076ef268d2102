"""Rollout stage: what to deploy (a published commit, a local checkpoint, or "the previous
one"), getting its files, and handing it to the configured target. One interface, two targets:
``tasks/rollout_local.py`` (blue/green on this host) and ``tasks/rollout_kubernetes.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from requant.atomic import atomic_directory
from requant.errors import SettingsError
from requant.hashing import fingerprint, hash_files
from requant.hub.client import endpoint, resolve_token
from requant.rollout.state import Release, load_state
from requant.rollout.targets import TARGETS
from requant.settings import HubSettings, PipelineSettings


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
    if rollback and (previous := TARGETS[target].previous) is not None:
        release, where = previous(settings)
        if release is None:
            raise SettingsError(f"rollback: {where}; nothing to go back to.")
        return release
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
        check_revision(revision)
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


def check_revision(revision: str) -> None:
    """A published revision is a full commit SHA, never a branch or tag (they move)."""
    if len(revision) != 40 or any(c not in "0123456789abcdef" for c in revision):
        raise SettingsError(f"revision: {revision!r} is not a 40-character commit SHA. "
                            "Deploy commits, never branch names (they move).")
