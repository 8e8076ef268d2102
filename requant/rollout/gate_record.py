"""Did what is being promoted pass the gate? Read from the record the gate itself left.

- A Hub revision published by requant carries the gate's decision in its own files
  (``eval/gate-decision.json``, uploaded in the same commit) and names its candidate in its
  message (``Requant-Content-Digest``), so the commit itself answers, on whichever host
  promotes it. Both are needed: a later commit by anyone else inherits the file in its tree,
  not the trailer.
- A local checkpoint of a run sits beside that run's ``gate/decision.json``.

A rollback goes back to a revision that served before; it needs no gate record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from requant.errors import SettingsError
from requant.hub.commits import DIGEST_TRAILER
from requant.rollout.state import Release
from requant.settings import HubSettings

HUB_DECISION = "eval/gate-decision.json"


def gate_record(hub: HubSettings, release: Release) -> tuple[dict[str, Any] | None, str]:
    """(the gate's decision if it let this release be promoted, else None; where we looked)."""
    if release.repo_id:
        where = f"{HUB_DECISION} in commit {release.revision[:12]} of {release.repo_id}"
        if not _published_by_requant(hub, release):
            return None, (f"commit {release.revision[:12]} of {release.repo_id} is not a "
                          f"requant publish (no {DIGEST_TRAILER} trailer in its message)")
        decision = _hub_decision(hub, release)
    else:
        path = Path(release.checkpoint or "").parent / "gate" / "decision.json"
        where = str(path)
        decision = json.loads(path.read_text()) if path.is_file() else None
    if decision is None:
        return None, f"no gate decision at {where}"
    if decision.get("promote") is not True:
        return None, f"the gate decided '{decision.get('status')}' ({where})"
    return decision, where


def _published_by_requant(hub: HubSettings, release: Release) -> bool:
    from huggingface_hub.errors import RevisionNotFoundError

    from requant.hub.client import hub_api, resolve_token

    api = hub_api(hub, resolve_token(hub))
    try:
        commit = api.list_repo_commits(release.repo_id, revision=release.revision)[0]
    except RevisionNotFoundError:
        raise SettingsError(f"revision: {release.repo_id} has no commit {release.revision}. "
                            "Check the SHA (the run summary's publish record has it)."
                            ) from None
    return commit.commit_id == release.revision and DIGEST_TRAILER in (commit.message or "")


def _hub_decision(hub: HubSettings, release: Release) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from requant.hub.client import endpoint, resolve_token

    try:
        path = hf_hub_download(release.repo_id, HUB_DECISION, revision=release.revision,
                               endpoint=endpoint(hub), token=resolve_token(hub))
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text())
