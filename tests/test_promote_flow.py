"""The promote flow end to end: published revisions fetched from a Hub-compatible server with
the real client, rolled out locally on real vLLM servers, the production marker moved only after
verification, and a manual rollback through the same path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from prefect.exceptions import ParameterTypeError

from requant.atomic import TMP_PREFIX
from requant.errors import RolloutFailed, SettingsError
from requant.hub.commits import trailer
from requant.rollout.local import router_status, shutdown_local
from requant.rollout.state import load_state
from requant.serving.server import free_port
from requant.settings import PipelineSettings
from tests.conftest import needs_vllm, processes_mentioning, promote, tiny_server_settings
from tests.fakehub import FakeHub

pytestmark = [pytest.mark.slow, needs_vllm]

TOKEN = "hf_promoteTESTsecret0123456789"
REPO = "acme/tiny-chat"


def production_sha(api: HfApi) -> str | None:
    """The commit the production branch mirrors (it moves by commits, never deleted)."""
    from requant.hub.marker import production_revision
    from requant.settings import HubSettings

    return production_revision(HubSettings(repo_id=REPO, endpoint=api.endpoint), TOKEN)


def gated(folder: Path, tmp_path: Path) -> Path:
    """A copy of ``folder`` with a passed gate's decision file, as a requant publish uploads."""
    copy = tmp_path / "gated" / Path(folder).name
    shutil.copytree(folder, copy)
    (copy / "eval").mkdir(exist_ok=True)
    (copy / "eval" / "gate-decision.json").write_text(json.dumps({"status": "pass",
                                                                  "promote": True}))
    return copy


def test_promote_moves_the_marker_only_after_a_verified_rollout_and_rolls_back_on_request(
        prefect_server, vllm_tiny_source, vllm_tiny_w8a8, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN, tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo(REPO)
        sha_a, sha_b = (api.upload_folder(  # as requant publishes: decision file + trailer
            repo_id=REPO, folder_path=gated(folder, tmp_path),
            commit_description=trailer(str(i) * 64)).oid
            for i, folder in enumerate((vllm_tiny_source, vllm_tiny_w8a8)))
        broken = tmp_path / "broken"
        shutil.copytree(vllm_tiny_w8a8, broken)
        config = json.loads((broken / "config.json").read_text())
        config["architectures"] = ["NoSuchModelForCausalLM"]
        (broken / "config.json").write_text(json.dumps(config))
        sha_broken = api.upload_folder(repo_id=REPO, folder_path=broken).oid

        port = free_port()
        settings = PipelineSettings.model_validate({
            "hub": {"repo_id": REPO, "endpoint": hub.endpoint},
            "cache_dir": str(tmp_path / "cache"),
            "rollout": {"target": "local", "served_model_name": "tiny-chat",
                        "state_dir": str(tmp_path / "state"),
                        "local": {"port": port, "keep_previous_s": 3,
                                  "server": tiny_server_settings().model_dump()},
                        "slo": {"requests": 16, "concurrency": 8, "max_tokens": 16}},
        })
        try:
            # the flow's own parameter schema refuses a branch name (the UI's form too; the
            # CLI says it in one line before Prefect: test_cli)
            with pytest.raises(ParameterTypeError, match=r"revision: String should match"):
                promote(settings, revision="main")
            first = promote(settings, revision=sha_a)
            assert first["production_marker_moved"] and production_sha(api) == sha_a
            promote(settings, revision=sha_b)
            assert production_sha(api) == sha_b
            assert router_status(f"http://127.0.0.1:{port}")["revision"] == sha_b

            with pytest.raises(SettingsError, match=r"did not pass the gate.*--force"):
                promote(settings, revision=sha_broken)  # not a requant publish
            with pytest.raises(RolloutFailed, match="NoSuchModelForCausalLM"):
                promote(settings, revision=sha_broken, force=True)
            assert production_sha(api) == sha_b  # the marker did not move
            assert router_status(f"http://127.0.0.1:{port}")["revision"] == sha_b

            back = promote(settings, rollback=True)
            assert back["release"]["revision"] == sha_a
            assert production_sha(api) == sha_a
            state = load_state(settings.rollout.state_dir, "local")
            assert state.active.release.revision == sha_a
            assert state.previous.release.revision == sha_b
            assert state.withdrawn == [sha_b] and state.active.rollback
            assert state.active.marker == "moved"  # the one record: the marker followed
            assert [h["event"] for h in state.history] == [
                "deployed", "deployed", "rolled-back", "deployed"]
            # the files served were fetched by the real client, pinned to the commit
            served = state.active.release.checkpoint
            assert served.endswith(sha_a)
            assert (Path(served) / "config.json").is_file()
            assert not list((tmp_path / "cache").rglob(f"{TMP_PREFIX}*"))  # no half download
        finally:
            shutdown_local(settings)
        assert processes_mentioning(str(tmp_path)) == []
