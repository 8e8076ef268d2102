"""The target's record is the one record of what serves, and the Hub's production marker follows
it: a marker move that fails, or a ``kill -9`` between the marker's move and its record, leaves
the record saying "marker pending" (never "moved" while it is not), ``requant status`` says so,
the nightly check promotes that revision again, and the next promote moves the marker without a
second rollout.

The real ``requant promote`` against a real Prefect server, a Hub-compatible server (the fake at
the network boundary, the real client) and the real router; the model servers are the stand-in
(tests/standin_vllm.py): the subject is the records, not vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

from requant.hub.commits import trailer
from requant.hub.marker import production_revision
from requant.killpoints import ENV, MARKER
from requant.ledger import pending_rollout
from requant.rollout.local import router_status, shutdown_local
from requant.rollout.state import load_state
from requant.serving.server import free_port
from requant.settings import HubSettings, load_settings
from tests.conftest import processes_mentioning, tiny_server_settings
from tests.fakehub import FakeHub
from tests.standin_vllm import standin_python

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
REQUANT = shutil.which("requant") or str(Path(os.sys.executable).parent / "requant")
TOKEN = "hf_markerTESTsecret0123456789"
REPO = "acme/tiny-chat"


def publish_gated(api: HfApi, folder: Path, tmp_path: Path, name: str) -> str:
    """A commit as requant publishes one: the gate's passed decision inside, the trailer."""
    copy = tmp_path / "published" / name
    shutil.copytree(folder, copy)
    (copy / "REVISION").write_text(name)
    (copy / "eval").mkdir()
    (copy / "eval" / "gate-decision.json").write_text(json.dumps({"status": "pass",
                                                                  "promote": True}))
    return api.upload_folder(repo_id=REPO, folder_path=copy,
                             commit_description=trailer(name[-1] * 64)).oid


def test_a_failed_or_killed_marker_move_leaves_one_consistent_record_that_the_next_promote_completes(
        prefect_server, vllm_tiny_source, tmp_path):
    from prefect.settings import PREFECT_API_URL

    with FakeHub(TOKEN, tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        api.create_repo(REPO)
        sha_a, sha_b = (publish_gated(api, vllm_tiny_source, tmp_path, name)
                        for name in ("rev-a", "rev-b"))
        config = tmp_path / "settings.yaml"
        config.write_text(yaml.safe_dump({
            "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs"),
            "hub": {"repo_id": REPO, "endpoint": hub.endpoint},
            "rollout": {"target": "local", "served_model_name": "tiny-chat",
                        "state_dir": str(tmp_path / "state"),
                        "local": {"port": free_port(), "keep_previous_s": 0,
                                  "server": tiny_server_settings().model_dump(mode="json")},
                        "slo": {"requests": 4, "concurrency": 2, "max_tokens": 8}}}))
        settings = load_settings(config, [])
        env = {**{k: v for k, v in os.environ.items() if k != ENV}, "HF_TOKEN": TOKEN,
               "PREFECT_API_URL": PREFECT_API_URL.value(),
               "REQUANT_SERVING_PYTHON": str(standin_python(tmp_path / "serving-env" / "bin"))}

        def promote(sha: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([REQUANT, "promote", "--config", str(config), "--revision",
                                   sha], capture_output=True, text=True, timeout=600, cwd=ROOT,
                                  env=env | extra)

        def marker() -> str | None:
            return production_revision(HubSettings(repo_id=REPO, endpoint=hub.endpoint), TOKEN)

        def record():
            return load_state(settings.rollout.state_dir, "local")

        try:
            first = promote(sha_a)
            assert first.returncode == 0, first.stderr[-3000:]
            assert marker() == sha_a and record().active.marker == "moved"

            hub.state.inject("commit", 403)  # the Hub refuses the marker's move
            refused = promote(sha_b)
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
            error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
            assert len(error) == 1 and "production" in error[0], refused.stderr[-3000:]
            serving = record().active
            assert serving.release.revision == sha_b and serving.marker == "pending"
            assert marker() == sha_a  # not moved, and the record does not claim it moved
            assert router_status(f"http://127.0.0.1:{settings.rollout.local.port}")[
                "revision"] == sha_b
            status = subprocess.run([REQUANT, "status", "--config", str(config)], env=env,
                                    capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert f"PRODUCTION MARKER NOT MOVED: {REPO}'s production branch does not point " \
                   f"at {sha_b}" in status.stdout, status.stdout + status.stderr
            nightly = {"commit_sha": sha_b, "dry_run": False}
            assert pending_rollout(nightly, record())[0] == {"revision": sha_b}

            killed = promote(sha_b, **{ENV: MARKER})  # moved on the Hub, then kill -9
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
            assert marker() == sha_b and record().active.marker == "pending"
            pid = record().active.server["pid"]

            done = promote(sha_b)
            assert done.returncode == 0, done.stderr[-3000:]
            assert "already serving" in done.stdout + done.stderr  # no second rollout
            after = record()
            assert after.active.release.revision == sha_b and after.active.marker == "moved"
            assert after.active.server["pid"] == pid and marker() == sha_b
            assert pending_rollout(nightly, after) == (None, "it is serving")
        finally:
            shutdown_local(settings)
    assert processes_mentioning(str(tmp_path)) == []
