"""Publishing with the real huggingface_hub client against a Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime

import pytest

from requant.atomic import write_json_atomic
from requant.errors import SettingsError, is_transient
from requant.evaluation.gate import EvidenceRecord, decide, rule_key
from requant.hub.publish import check_publish_settings, move_production_marker, publish_checkpoint
from requant.settings import GateRule, GateSettings, HubSettings
from requant.tasks.publish import publish
from tests.fakehub import FakeHub

TOKEN = "hf_requantTESTsecret0123456789"
REPO = "acme/tiny-w8a8"
NOW = datetime(2026, 11, 23, tzinfo=UTC)


@pytest.fixture
def hub(tmp_path):
    with FakeHub(TOKEN, tmp_path / "hub-storage") as server:
        yield server


@pytest.fixture
def candidate(vllm_tiny_w8a8, tmp_path):
    """A real checkpoint (quantized by the pipeline) plus eval and gate records beside it."""
    eval_dir, gate_dir = tmp_path / "eval", tmp_path / "gate"
    scores = {rule_key("gsm8k", "exact_match,strict-match"): {i: float(i % 4 != 2)
                                                               for i in range(400)}}
    for label in ("baseline", "candidate"):
        (eval_dir / label).mkdir(parents=True)
        write_json_atomic(eval_dir / label / "results_gsm8k_stage1.json",
                          {"results": {"gsm8k": {}}})
        (eval_dir / label / "samples_gsm8k.jsonl").write_text('{"doc_id": 0}\n')
    gate = GateSettings(rules=[GateRule(task="gsm8k", metric="exact_match,strict-match")])
    evidence = EvidenceRecord(scores, {"lm_eval": "0.4.13"})
    decision = decide(evidence, evidence, gate, look=1, looks=1, z=1.645)
    assert decision.status == "pass"
    record = decision.as_record() | {"baseline": {"label": "baseline"},
                                     "candidate": {"label": "candidate"}}
    gate_dir.mkdir()
    write_json_atomic(gate_dir / "decision.json", record)
    manifest = json.loads((vllm_tiny_w8a8 / "manifest.json").read_text())
    return {"checkpoint": vllm_tiny_w8a8, "eval_dir": eval_dir, "gate_dir": gate_dir,
            "manifest": manifest, "gate": decision.as_record()}


def run_publish(hub_server, candidate, out, token=TOKEN, **hub_kwargs):
    settings = HubSettings(repo_id=REPO, endpoint=hub_server.endpoint, **hub_kwargs)
    return publish_checkpoint(settings, candidate["checkpoint"], candidate["eval_dir"],
                              candidate["gate_dir"], candidate["manifest"], candidate["gate"],
                              out, token, now=NOW)


def test_everything_goes_up_in_one_commit_pinned_by_an_immutable_tag(hub, candidate, tmp_path):
    result = run_publish(hub, candidate, tmp_path / "publish")
    repo = hub.state.repos[REPO]
    assert repo.private is True
    assert hub.state.commit_count(REPO) == 1
    (commit,) = repo.commits.values()
    assert result.commit_sha == commit.sha == repo.branches["main"]
    assert repo.tags[result.tag] == commit.sha
    assert result.tag.startswith("w8a8-20261123-local-")
    expected = {p.name for p in candidate["checkpoint"].iterdir()} | {
        "README.md", "eval/baseline/results_gsm8k_stage1.json",
        "eval/candidate/results_gsm8k_stage1.json",
        "eval/baseline/samples_gsm8k.jsonl", "eval/candidate/samples_gsm8k.jsonl",
        "eval/gate-decision.json"}
    assert set(commit.files) == expected
    assert commit.files["model.safetensors"].lfs  # weights went through LFS, content-addressed
    assert commit.message.startswith("requant: W8A8 of ") and "gate pass (recovery 1.0000)" in \
        commit.message
    assert "Inputs fingerprint" in commit.description
    local = json.loads((tmp_path / "publish" / "publish.json").read_text())
    assert local["commit_sha"] == commit.sha and not local["dry_run"]


def test_publishing_the_same_content_again_makes_no_commit_and_says_so(hub, candidate, tmp_path):
    first = run_publish(hub, candidate, tmp_path / "p1")
    calls_before = len(hub.state.calls)
    again = run_publish(hub, candidate, tmp_path / "p2")
    assert again.no_op and not first.no_op
    assert (again.commit_sha, again.tag) == (first.commit_sha, first.tag)
    assert hub.state.commit_count(REPO) == 1
    new_calls = hub.state.calls[calls_before:]
    assert not any("/commit/" in path or "lfs" in path for _, path in new_calls)


def test_commit_failing_with_500_is_retried_without_resending_uploaded_bytes(
        hub, candidate, tmp_path, prefect_server, monkeypatch):
    weights = (candidate["checkpoint"] / "model.safetensors").stat().st_size
    hub.state.inject("commit", 500)
    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint, retries=1)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = publish.with_options(retries=1, retry_delay_seconds=0)(
        settings, candidate["checkpoint"], candidate["eval_dir"], candidate["gate_dir"],
        candidate["manifest"], candidate["gate"], tmp_path / "publish")
    commits = [c for c in hub.state.calls if "/commit/" in c[1]]
    puts = [c for c in hub.state.calls if c[0] == "PUT"]
    assert len(commits) == 2  # the failed one and the retry
    assert len(puts) == len({c[1] for c in puts})  # every object crossed the wire once
    assert hub.state.commit_count(REPO) == 1 and result.commit_sha
    lfs_sizes = sum(f.size for f in hub.state.repos[REPO].commits[result.commit_sha].files.values()
                    if f.lfs)
    assert lfs_sizes >= weights
    assert hub.state.lfs_bytes_received == lfs_sizes  # nothing uploaded twice


def test_connection_dropped_mid_upload_resumes_and_commits_intact_content(hub, candidate,
                                                                          tmp_path):
    hub.state.inject("lfs-put", "drop:65536")
    result = run_publish(hub, candidate, tmp_path / "publish")
    (commit,) = hub.state.repos[REPO].commits.values()
    weights = commit.files["model.safetensors"]
    stored = (hub.state.storage / weights.oid).read_bytes()
    assert stored == (candidate["checkpoint"] / "model.safetensors").read_bytes()
    assert result.commit_sha == commit.sha
    # the cut-off attempt's bytes plus one whole upload: resumed by the client's own retry
    assert hub.state.lfs_bytes_received == weights.size + 65536


def test_unauthorized_token_publishes_nothing_and_is_not_retried(hub, candidate, tmp_path,
                                                                 prefect_server, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)
    with pytest.raises(HfHubHTTPError) as err:
        publish.with_options(retries=2, retry_delay_seconds=0)(
            settings, candidate["checkpoint"], candidate["eval_dir"], candidate["gate_dir"],
            candidate["manifest"], candidate["gate"], tmp_path / "publish")
    assert err.value.response.status_code == 401 and not is_transient(err.value)
    # One attempt (the client probes repo_info after a 401 on create), then no retry.
    assert [c for c in hub.state.calls if c[0] == "POST"] == [("POST", "/api/repos/create")]
    assert hub.state.repos == {}
    assert not (tmp_path / "publish").exists()


def test_token_never_reaches_logs_artifacts_files_or_the_card(hub, candidate, tmp_path,
                                                              prefect_server, monkeypatch,
                                                              caplog):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)

    @flow
    def publish_only():
        from prefect.runtime import flow_run

        publish(settings, candidate["checkpoint"], candidate["eval_dir"], candidate["gate_dir"],
                candidate["manifest"], candidate["gate"], tmp_path / "publish")
        return flow_run.get_id()

    caplog.set_level("DEBUG")
    run_id = publish_only()
    assert f"Bearer {TOKEN}" in hub.state.seen_auth  # it was used ...
    APILogHandler().flush()  # logs reach the API in background batches: wait for this run's
    with get_client(sync_client=True) as client:  # ... and recorded nowhere
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
        deadline = time.monotonic() + 30
        while not (logs := client.read_logs(log_filter=log_filter)) and time.monotonic() < deadline:
            time.sleep(0.5)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        flow_run = client.read_flow_run(run_id)
    haystacks = [m.message for m in logs] + [str(a.data) for a in artifacts]
    haystacks.append(json.dumps(flow_run.parameters, default=str))
    haystacks.append(caplog.text)
    haystacks += [p.read_text(errors="replace") for p in (tmp_path / "publish").rglob("*")
                  if p.is_file()]
    repo = hub.state.repos[REPO]
    haystacks += [f.content.decode(errors="replace") for c in repo.commits.values()
                  for f in c.files.values() if f.content]
    assert logs and artifacts
    assert not [h for h in haystacks if TOKEN in h]


def test_without_a_repo_it_is_a_loud_dry_run_that_writes_what_would_be_committed(candidate,
                                                                                  tmp_path):
    out = tmp_path / "publish"
    result = publish_checkpoint(HubSettings(), candidate["checkpoint"], candidate["eval_dir"],
                                candidate["gate_dir"], candidate["manifest"], candidate["gate"],
                                out, token=None, now=NOW)
    assert result.dry_run and result.commit_sha is None and result.repo_id is None
    assert "nothing was published" in (out / "DRY_RUN.md").read_text()
    listed = {f["path"] for f in json.loads((out / "files.json").read_text())}
    assert {"model.safetensors", "manifest.json", "README.md", "eval/gate-decision.json"} <= listed
    assert (out / "commit_message.txt").read_text().startswith("requant: W8A8 of ")


def test_model_card_carries_hub_metadata_scores_recipe_and_serve_command(hub, candidate,
                                                                         tmp_path):
    from huggingface_hub import ModelCard

    result = run_publish(hub, candidate, tmp_path / "publish")
    card = ModelCard((tmp_path / "publish" / "README.md").read_text())
    assert card.data.base_model_relation == "quantized"
    assert card.data.base_model == "tiny-vllm-bf16"  # a local source is named by its folder
    assert card.data.eval_results[0].metric_value == 0.75
    text = card.text
    assert f"vllm serve {REPO} --revision {result.tag}" in text
    assert "SmoothQuantModifier" in text and "GPTQModifier" in text
    assert ("| gsm8k | exact_match,strict-match | 0.7500 | 0.7500 | 100.00% |" in text
            and "| pass | 400 of 400 |" in text)  # every rule's numbers
    assert "llmcompressor" in text and "compressed-tensors" in text


def test_production_marker_moves_only_when_asked_and_to_the_given_sha(hub, candidate, tmp_path):
    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)
    first = run_publish(hub, candidate, tmp_path / "p1")
    repo = hub.state.repos[REPO]
    assert "production" not in repo.branches  # publishing alone never promotes
    move_production_marker(settings, first.commit_sha, TOKEN)
    assert repo.branches["production"] == first.commit_sha
    # a newer candidate: another commit on main; the marker stays until it is moved
    second_ckpt = tmp_path / "ckpt2"
    shutil.copytree(candidate["checkpoint"], second_ckpt)
    (second_ckpt / "recipe.yaml").write_text((second_ckpt / "recipe.yaml").read_text() + "\n# v2\n")
    second = run_publish(hub, candidate | {"checkpoint": second_ckpt}, tmp_path / "p2")
    assert second.commit_sha != first.commit_sha
    assert repo.branches["production"] == first.commit_sha
    move_production_marker(settings, second.commit_sha, TOKEN)
    assert repo.branches["production"] == second.commit_sha


def test_a_repo_without_a_token_fails_preflight(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SettingsError, match=r"hub\.repo_id: acme/x is set but there is no token"):
        check_publish_settings(HubSettings(repo_id="acme/x"))
    check_publish_settings(HubSettings())  # dry run needs none


def test_bad_repo_id_is_rejected_by_settings():
    from requant.settings import load_settings

    with pytest.raises(SettingsError, match=r"hub\.repo_id"):
        load_settings(None, ["hub.repo_id=not a repo"])




def test_token_from_a_prefect_secret_block_and_endpoint_from_hf_endpoint(hub, candidate, tmp_path,
                                                                         prefect_server,
                                                                         monkeypatch):
    from prefect.blocks.system import Secret

    from requant.hub.publish import resolve_token

    Secret(value=TOKEN).save("requant-hf-token", overwrite=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)  # the client's own variable, no hub.endpoint
    settings = HubSettings(repo_id=REPO, token_secret="requant-hf-token")
    assert resolve_token(settings) == TOKEN
    result = publish(settings, candidate["checkpoint"], candidate["eval_dir"],
                     candidate["gate_dir"], candidate["manifest"], candidate["gate"],
                     tmp_path / "publish")
    assert result.commit_sha in hub.state.repos[REPO].commits
    with pytest.raises(SettingsError, match=r"hub\.token_secret: no Prefect Secret block"):
        resolve_token(HubSettings(repo_id=REPO, token_secret="no-such-block"))
