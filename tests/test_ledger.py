"""The nightly run's "already serving?" check reads the rollout target's own record (the one
record of what serves), never a copy of it: published candidates are rolled out when they do
not serve, left alone when they do, not pushed again after a rollback, and promoted again when
the production marker did not follow."""

from __future__ import annotations

from requant.ledger import pending_rollout
from requant.rollout.state import Deployed, DeployState, Intent, Release

SHA_A, SHA_B = "a" * 40, "b" * 40


def published(sha: str) -> dict:
    return {"commit_sha": sha, "dry_run": False, "run_id": "r1"}


def deploy(state: DeployState, sha: str, intent: Intent = Intent(), repo: str | None = "o/m",
           checkpoint: str | None = None) -> DeployState:
    state.activate(Deployed(Release(sha, repo, checkpoint), "t", "f", rollback=intent.rollback,
                            forced=intent.forced))
    return state


def marker_moved(state: DeployState) -> DeployState:
    assert state.active is not None
    state.active.marker = "moved"
    return state


def test_a_published_candidate_that_never_served_is_pending_rollout():
    args, why = pending_rollout(published(SHA_A), DeployState("local"))
    assert args == {"revision": SHA_A} and "not serving" in why


def test_a_serving_candidate_whose_marker_moved_is_not_rolled_out_again():
    state = marker_moved(deploy(DeployState("local"), SHA_A))
    assert pending_rollout(published(SHA_A), state) == (None, "it is serving")


def test_a_serving_candidate_whose_marker_move_failed_is_promoted_again():
    state = deploy(DeployState("local"), SHA_A)
    assert state.active.marker == "pending"  # recorded in the same write that made it active
    args, why = pending_rollout(published(SHA_A), state)
    assert args == {"revision": SHA_A} and "production marker" in why


def test_a_revision_rolled_back_by_hand_is_not_pushed_again_until_promoted_explicitly():
    state = DeployState("local")
    for sha, intent in ((SHA_A, Intent()), (SHA_B, Intent()), (SHA_A, Intent(rollback=True))):
        marker_moved(deploy(state, sha, intent))
    assert state.active.release.revision == SHA_A and state.withdrawn == [SHA_B]
    args, why = pending_rollout(published(SHA_B), state)
    assert args is None and "rolled it back" in why
    deploy(state, SHA_B)  # an operator promotes it again
    assert state.withdrawn == []


def test_a_dry_run_candidate_is_matched_by_its_checkpoint_folder(tmp_path):
    ckpt = tmp_path / "runs" / "r1" / "checkpoint"
    ckpt.mkdir(parents=True)
    hit = {"commit_sha": None, "dry_run": True, "checkpoint": str(ckpt)}
    assert pending_rollout(hit, DeployState("local"))[0] == {"checkpoint": str(ckpt.resolve())}
    state = deploy(DeployState("local"), "local-1234", repo=None, checkpoint=str(ckpt))
    assert state.active.marker is None  # no Hub repository: no marker to move
    assert pending_rollout(hit, state) == (None, "it is serving")
    ckpt.rmdir()
    assert pending_rollout(hit, DeployState("local")) == (
        None, "its dry-run checkpoint is gone; nothing to roll out")
