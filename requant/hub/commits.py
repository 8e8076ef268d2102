"""One commit per candidate, however many publishes of it run at once or crash half-way.

The Hub offers optimistic concurrency (``parent_commit``: the commit fails with 412 if the branch
moved) and refs that refuse duplicates (409). On those:

- a commit names its candidate in a trailer (``Requant-Content-Digest: <digest>``), so a commit
  that landed without its tag (a crash between the two steps, or a racing publish that has not
  tagged yet) is found and adopted instead of committed again;
- the commit is made on the head that was read (``parent_commit``); on 412 the branch is read
  again: if the new head is this candidate, it is adopted, else the commit is retried on it;
- a tag that "already exists and points at my commit" is success, not failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from requant.errors import PublishError
from requant.settings import HubSettings

if TYPE_CHECKING:
    from huggingface_hub import HfApi

DIGEST_TRAILER = "Requant-Content-Digest"
#: How far back a branch's history is searched for a commit of this candidate.
HISTORY_DEPTH = 50
#: Commits retried after the branch moved under us (another candidate published meanwhile).
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class Landed:
    sha: str
    tag: str | None  # an existing tag of this candidate, if any
    committed_now: bool


def trailer(digest: str) -> str:
    return f"{DIGEST_TRAILER}: {digest}"


def find_published(api: HfApi, hub: HubSettings, digest: str) -> tuple[Landed | None, str | None]:
    """This candidate's tag, or failing that its commit on the branch (not yet tagged); and the
    branch head in the same read of the refs, the parent a new commit must have."""
    refs = api.list_repo_refs(hub.repo_id)
    tag = next((t for t in refs.tags if t.name.endswith(f"-{digest[:12]}")), None)
    head = next((b.target_commit for b in refs.branches if b.name == hub.branch), None)
    if tag is not None:
        return Landed(tag.target_commit, tag.name, False), head
    if head is None:
        return None, None
    for commit in api.list_repo_commits(hub.repo_id, revision=hub.branch)[:HISTORY_DEPTH]:
        if trailer(digest) in (commit.message or ""):
            return Landed(commit.commit_id, None, False), head
    return None, head


def commit_once(api: HfApi, hub: HubSettings, operations: list[Any], summary: str,
                description: str, digest: str) -> Landed:
    from huggingface_hub.errors import HfHubHTTPError

    for _ in range(MAX_ATTEMPTS):
        found, head = find_published(api, hub, digest)
        if found is not None:
            return found
        try:
            info = api.create_commit(hub.repo_id, operations, commit_message=summary,
                                     commit_description=f"{description}\n\n{trailer(digest)}",
                                     revision=hub.branch, parent_commit=head)
        except HfHubHTTPError as exc:
            if exc.response is None or exc.response.status_code != 412:
                raise
            continue  # the branch moved: maybe to this very candidate; look again
        return Landed(info.oid, None, True)
    raise PublishError(f"publish to {hub.repo_id}@{hub.branch}: the branch moved under "
                       f"{MAX_ATTEMPTS} attempts in a row; other publishes are racing this one. "
                       "Re-run the publish: it finds its commit if one landed.")


def ensure_tag(api: HfApi, hub: HubSettings, tag: str, sha: str, digest: str) -> str:
    """Create the candidate's tag; a tag of this candidate on this commit already is success."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(hub.repo_id, tag=tag, revision=sha,
                       tag_message=f"requant candidate {digest[:12]}")
        return tag
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise
    tags = {t.name: t.target_commit for t in api.list_repo_refs(hub.repo_id).tags}
    mine = [name for name, target in tags.items()
            if target == sha and (name == tag or name.endswith(f"-{digest[:12]}"))]
    if mine:
        return mine[0]
    raise PublishError(f"publish to {hub.repo_id}: tag {tag} already exists on commit "
                       f"{tags.get(tag)}, not on this candidate's {sha}. Tags are immutable; "
                       "delete the stray tag on the Hub if it is not a release.", 409)
