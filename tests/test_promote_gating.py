"""Promoting what the gate did not pass needs force, and is recorded as forced. The gate's own
record answers: a requant commit on the Hub carries its decision file, a run's checkpoint sits
beside its gate folder. Real huggingface_hub client against the test Hub."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi

from requant.errors import SettingsError
from requant.flows.promote import check_gated
from requant.hub.commits import trailer
from requant.rollout.gate_record import HUB_DECISION, gate_record
from requant.rollout.state import Deployed, DeployState, Release, load_state, save_state
from requant.settings import HubSettings, PipelineSettings
from tests.fakehub import FakeHub

TOKEN = "hf_gatingTESTsecret0123456789"
REPO = "acme/gated"


def run_checkpoint(tmp_path, decision: dict | None):
    ckpt = tmp_path / "runs" / "r1" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    if decision is not None:
        (ckpt.parent / "gate").mkdir()
        (ckpt.parent / "gate" / "decision.json").write_text(json.dumps(decision))
    return Release("local-abc", checkpoint=str(ckpt))


def test_a_checkpoint_whose_run_passed_the_gate_is_promoted_without_force(tmp_path):
    release = run_checkpoint(tmp_path, {"status": "pass", "promote": True})
    assert check_gated(PipelineSettings(), release, force=False, warn=print) is False


@pytest.mark.parametrize("decision", [None, {"status": "fail", "promote": False},
                                      {"status": "inconclusive", "promote": False}])
def test_an_ungated_or_failed_checkpoint_is_refused_without_force_naming_the_flag(
        tmp_path, decision):
    release = run_checkpoint(tmp_path, decision)
    with pytest.raises(SettingsError, match=r"did not pass the gate .*--force"):
        check_gated(PipelineSettings(), release, force=False, warn=print)
    warned = []
    assert check_gated(PipelineSettings(), release, force=True, warn=warned.append) is True
    assert warned and warned[0].startswith("FORCED: promoting local-abc")


def test_a_forced_deployment_is_recorded_as_forced(tmp_path):
    state = DeployState("local")
    state.activate(Deployed(Release("local-abc", checkpoint=str(tmp_path)), "t", "f",
                            forced=True))
    save_state(tmp_path, state)
    assert load_state(tmp_path, "local").active.forced is True


def test_a_hub_revision_answers_from_the_decision_file_in_its_own_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub(TOKEN, tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo(REPO)
        folder = tmp_path / "model"
        (folder / "eval").mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        published = api.upload_folder(repo_id=REPO, folder_path=folder,
                                      commit_description=trailer("a" * 64)).oid  # no decision
        (folder / "eval" / "gate-decision.json").write_text(json.dumps(
            {"status": "pass", "promote": True}))
        gated = api.upload_folder(repo_id=REPO, folder_path=folder,
                                  commit_description=trailer("b" * 64)).oid
        (folder / "README.md").write_text("edited by hand")
        on_top = api.upload_folder(repo_id=REPO, folder_path=folder).oid  # inherits the file
        settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        decision, where = gate_record(settings, Release(gated, repo_id=REPO))
        assert decision == {"status": "pass", "promote": True} and HUB_DECISION in where
        decision, where = gate_record(settings, Release(published, repo_id=REPO))
        assert decision is None and where.startswith(f"no gate decision at {HUB_DECISION}")
        decision, where = gate_record(settings, Release(on_top, repo_id=REPO))
        assert decision is None and "is not a requant publish" in where
