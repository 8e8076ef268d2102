"""The production marker: a branch that always resolves to the revision production serves.

The Hub cannot move a ref in place: a branch can be created (from a revision) or deleted, a tag
created or deleted, nothing updated. Delete-then-create leaves a window in which ``production``
does not exist, and anything resolving it then fails (``vllm serve --revision production``, a pod
starting). A commit, though, moves its branch atomically. So the marker is created once from the
first promoted commit, and every later move is one commit on it that makes its tree identical to
the promoted commit's (LFS files copied on the Hub, no bytes uploaded), with
``parent_commit`` so two movers cannot interleave, and the promoted SHA in a trailer. Readers of
``production`` always get a complete tree; ``production_revision`` says which commit it mirrors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from requant.errors import PublishError
from requant.hub.client import hub_api, hub_errors
from requant.settings import HubSettings

if TYPE_CHECKING:
    from huggingface_hub import HfApi

SERVES_TRAILER = "Requant-Serves"


def move_production_marker(hub: HubSettings, sha: str, token: str | None) -> None:
    """Point the production branch at ``sha``'s tree. Called only after a verified rollout."""
    if hub.repo_id is None:
        return
    api = hub_api(hub, token)
    with hub_errors(hub, f"move {hub.production_ref} to {sha[:12]}"):
        current = _branches(api, hub).get(hub.production_ref)
        if current is None and _create(api, hub, sha):
            return
        current = _branches(api, hub)[hub.production_ref]
        if _serves(api, hub, current) == sha:
            return
        _commit_tree(api, hub, sha, current)


def production_revision(hub: HubSettings, token: str | None) -> str | None:
    """The promoted commit the marker mirrors (None: nothing promoted yet)."""
    if hub.repo_id is None:
        return None
    api = hub_api(hub, token)
    with hub_errors(hub, f"read {hub.production_ref}"):
        current = _branches(api, hub).get(hub.production_ref)
        return _serves(api, hub, current) if current else None


def _branches(api: HfApi, hub: HubSettings) -> dict[str, str]:
    return {b.name: b.target_commit for b in api.list_repo_refs(hub.repo_id).branches}


def _create(api: HfApi, hub: HubSettings, sha: str) -> bool:
    """First promotion: the branch starts at the commit itself. False if another mover made it
    first (409): then it is moved by a commit like any later promotion."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_branch(hub.repo_id, branch=hub.production_ref, revision=sha)
        return True
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise
        return False


def _serves(api: HfApi, hub: HubSettings, head: str) -> str:
    (latest, *_) = api.list_repo_commits(hub.repo_id, revision=head)
    for line in (latest.message or "").splitlines():
        if line.startswith(f"{SERVES_TRAILER}: "):
            return line.split(": ", 1)[1].strip()
    return head  # created from the promoted commit itself


def _commit_tree(api: HfApi, hub: HubSettings, sha: str, current: str) -> None:
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    target, now = _tree(api, hub, sha), _tree(api, hub, current)
    operations: list[Any] = [
        CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=sha)
        for path, oid in target.items() if now.get(path) != oid]
    operations += [CommitOperationDelete(path_in_repo=path) for path in now if path not in target]
    if not operations:  # the same tree already: the same content, nothing to serve differently
        return
    try:
        api.create_commit(hub.repo_id, operations, revision=hub.production_ref,
                          parent_commit=current, commit_message=f"production: {sha[:12]}",
                          commit_description=f"{SERVES_TRAILER}: {sha}")
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 412:
            raise PublishError(
                f"move {hub.production_ref} to {sha[:12]}: another promotion moved it at the "
                "same moment. Check `requant status` and re-run the promotion that should win.",
                412) from exc
        raise


def _tree(api: HfApi, hub: HubSettings, revision: str) -> dict[str, str]:
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f.blob_id for f in api.list_repo_tree(hub.repo_id, revision=revision,
                                                          recursive=True)
            if isinstance(f, RepoFile)}
