"""The candidate ledger's two records: published (by the run) and deployed (by promote)."""

from __future__ import annotations

from requant.ledger import find_deployed, pending_rollout, record_deployed

SHA_A, SHA_B = "a" * 40, "b" * 40


def published(sha: str) -> dict:
    return {"commit_sha": sha, "dry_run": False, "run_id": "r1"}


def test_a_published_candidate_that_never_served_is_pending_rollout(tmp_path):
    args, why = pending_rollout(published(SHA_A), find_deployed(tmp_path, "local"))
    assert args == {"revision": SHA_A} and "not serving" in why


def test_a_serving_candidate_is_not_rolled_out_again(tmp_path):
    record_deployed(tmp_path, "local", revision=SHA_A, repo_id="o/m", checkpoint=None,
                    flow_run_id="f1")
    assert pending_rollout(published(SHA_A), find_deployed(tmp_path, "local")) == (
        None, "it is serving")


def test_a_revision_rolled_back_by_hand_is_not_pushed_again_until_promoted_explicitly(tmp_path):
    record_deployed(tmp_path, "local", revision=SHA_A, repo_id="o/m", checkpoint=None,
                    flow_run_id="f1")
    record_deployed(tmp_path, "local", revision=SHA_B, repo_id="o/m", checkpoint=None,
                    flow_run_id="f2")
    record_deployed(tmp_path, "local", revision=SHA_A, repo_id="o/m", checkpoint=None,
                    flow_run_id="f3", rollback=True)
    deployed = find_deployed(tmp_path, "local")
    assert deployed["active"]["revision"] == SHA_A and deployed["withdrawn"] == [SHA_B]
    args, why = pending_rollout(published(SHA_B), deployed)
    assert args is None and "rolled it back" in why
    record_deployed(tmp_path, "local", revision=SHA_B, repo_id="o/m", checkpoint=None,
                    flow_run_id="f4")  # an operator promotes it again
    assert find_deployed(tmp_path, "local")["withdrawn"] == []


def test_a_dry_run_candidate_is_matched_by_its_checkpoint_folder(tmp_path):
    ckpt = tmp_path / "runs" / "r1" / "checkpoint"
    ckpt.mkdir(parents=True)
    hit = {"commit_sha": None, "dry_run": True, "checkpoint": str(ckpt)}
    assert pending_rollout(hit, None)[0] == {"checkpoint": str(ckpt.resolve())}
    record_deployed(tmp_path, "local", revision="local-1234", repo_id=None,
                    checkpoint=str(ckpt), flow_run_id="f1")
    assert pending_rollout(hit, find_deployed(tmp_path, "local"))[0] is None
    ckpt.rmdir()
    assert pending_rollout(hit, None) == (None, "its dry-run checkpoint is gone; nothing to "
                                                "roll out")
