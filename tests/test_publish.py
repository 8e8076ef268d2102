"""Publishing with the real huggingface_hub client against a Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime

import pytest

from requant.atomic import write_json_atomic
from requant.errors import PublishError, SettingsError, is_transient
from requant.evaluation.gate import EvidenceRecord, decide, rule_key
from requant.hub.client import check_publish_settings, resolve_token
from requant.hub.marker import move_production_marker, production_revision
from requant.hub.publish import publish_checkpoint
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


def with_hub_id(manifest: dict, hub_id: str) -> dict:
    settings = manifest.get("settings", {})
    return manifest | {"settings": settings | {"source": settings.get("source", {}) |
                                               {"hub_id": hub_id}}}


def changed_copy(candidate: dict, tmp_path) -> object:
    """The candidate's checkpoint with one changed file: another candidate, another digest."""
    copy = tmp_path / "ckpt2"
    shutil.copytree(candidate["checkpoint"], copy)
    (copy / "recipe.yaml").write_text((copy / "recipe.yaml").read_text() + "\n# v2\n")
    return copy


def run_publish(hub_server, candidate, out, token=TOKEN, **hub_kwargs):
    settings = HubSettings(repo_id=REPO, endpoint=hub_server.endpoint, **hub_kwargs)
    return publish_checkpoint(settings, candidate["checkpoint"], candidate["eval_dir"],
                              candidate["gate_dir"], candidate["manifest"], candidate["gate"],
                              out, token, now=NOW)


def test_everything_goes_up_in_one_commit_pinned_by_an_immutable_tag(hub, candidate, tmp_path):
    result = run_publish(hub, candidate, tmp_path / "publish")
    repo = hub.state.repos[REPO]
    assert repo.private is True
    assert hub.state.commit_count(REPO) == 1  # after the repo's own initial commit
    commit = repo.commits[repo.branches["main"]]
    assert result.commit_sha == commit.sha
    assert repo.tags[result.tag] == commit.sha
    assert result.tag.startswith("w8a8-20261123-local-")
    expected = {p.name for p in candidate["checkpoint"].iterdir()} | {
        "README.md", "eval/baseline/results_gsm8k_stage1.json",
        "eval/candidate/results_gsm8k_stage1.json",
        "eval/baseline/samples_gsm8k.jsonl", "eval/candidate/samples_gsm8k.jsonl",
        "eval/gate-decision.json", ".gitattributes"}
    assert set(commit.files) == expected
    assert commit.files["model.safetensors"].lfs  # weights went through LFS, content-addressed
    assert commit.message.startswith("requant: W8A8 of ") and "gate pass (recovery 1.0000)" in \
        commit.message
    assert "Inputs fingerprint" in commit.description
    assert f"Requant-Content-Digest: {result.content_digest}" in commit.description
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
    repo = hub.state.repos[REPO]
    commit = repo.commits[repo.branches["main"]]
    weights = commit.files["model.safetensors"]
    stored = (hub.state.storage / weights.oid).read_bytes()
    assert stored == (candidate["checkpoint"] / "model.safetensors").read_bytes()
    assert result.commit_sha == commit.sha
    # the cut-off attempt's bytes plus one whole upload: resumed by the client's own retry
    assert hub.state.lfs_bytes_received == weights.size + 65536


def test_unauthorized_token_publishes_nothing_and_is_not_retried(hub, candidate, tmp_path,
                                                                 prefect_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)
    with pytest.raises(PublishError, match=r"rejected the token \(401\)\. \$HF_TOKEN or "
                       r"hub\.token_secret .* create a write token") as err:
        publish.with_options(retries=2, retry_delay_seconds=0)(
            settings, candidate["checkpoint"], candidate["eval_dir"], candidate["gate_dir"],
            candidate["manifest"], candidate["gate"], tmp_path / "publish")
    assert err.value.status == 401 and not is_transient(err.value)
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


def test_a_card_after_an_early_stop_labels_the_subset_and_claims_no_whole_set_score(candidate):
    from huggingface_hub import ModelCard

    from requant.hub.modelcard import render_card

    per_doc = {rule_key("gsm8k", "exact_match,strict-match"): {i: float(i % 4 != 2)
                                                               for i in range(1319)}}
    asked = {k: {i: v[i] for i in range(660)} for k, v in per_doc.items()}
    gate = GateSettings(rules=[GateRule(task="gsm8k", metric="exact_match,strict-match")])
    early = decide(EvidenceRecord(per_doc, {}), EvidenceRecord(asked, {}), gate, look=2,
                   looks=4, z=2.451).as_record()
    assert early["status"] == "pass" and early["stopped_early"]
    card = ModelCard(render_card(repo_id=REPO, tag="t", manifest=candidate["manifest"],
                                 gate=early, baseline=None, candidate=None, quant_config=None))
    assert card.data.eval_results is None  # model-index: whole-set scores only
    assert "| 660 of 1319 (a subset: the gate stopped early) | 0.7500 | 0.7500 |" in card.text


def test_model_card_carries_hub_metadata_scores_recipe_and_serve_command(hub, candidate,
                                                                         tmp_path):
    from huggingface_hub import ModelCard

    declared = candidate | {"manifest": with_hub_id(candidate["manifest"], "acme/tiny-llama")}
    result = run_publish(hub, declared, tmp_path / "publish")
    card = ModelCard((tmp_path / "publish" / "README.md").read_text())
    assert card.data.base_model_relation == "quantized"
    assert card.data.base_model == "acme/tiny-llama"  # the Hub id the local source declared
    assert card.data.eval_results[0].metric_value == 0.75
    assert {"w8a8", "int8", "smoothquant", "gptq"} <= set(card.data.tags)
    text = card.text
    assert f"vllm serve {REPO} --revision {result.tag}" in text
    assert "INT8 weights (per-channel) and dynamic per-token INT8 activations" in text
    assert "SmoothQuant, smoothing strength 0.8 + GPTQ" in text
    assert "Left unquantized: `lm_head`." in text
    assert "| gsm8k | exact_match,strict-match | 400 of 400 | 0.7500 | 0.7500 | 100.00% |" \
        in text and "| 0.957 | pass |" in text  # every rule's numbers, on the whole set
    assert "llmcompressor" in text and "compressed-tensors" in text


def test_local_source_without_a_hub_id_gets_no_base_model_and_the_card_says_why(hub, candidate,
                                                                                tmp_path):
    from huggingface_hub import ModelCard

    run_publish(hub, candidate, tmp_path / "publish")  # the Hub accepts it: no invalid field
    card = ModelCard((tmp_path / "publish" / "README.md").read_text())
    assert card.data.base_model is None
    assert "base_model_relation" not in card.content.split("---")[1]
    assert "a local model (`tiny-vllm-bf16`; it declared no Hub id in source.hub_id" in card.text


def test_card_text_and_tags_follow_the_applied_scheme_not_a_fixed_w8a8_story(candidate):
    from huggingface_hub import ModelCard

    from requant.hub.modelcard import render_card

    fp8 = {"config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True}}},
        "ignore": ["lm_head", "re:.*mlp.gate$"]}
    manifest = with_hub_id(candidate["manifest"], "acme/tiny-llama")
    manifest["recipe"] = manifest["recipe"] | {
        "scheme": "FP8_DYNAMIC",
        "text": "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: "
                "FP8_DYNAMIC\n"}
    card = ModelCard(render_card(repo_id=REPO, tag="t", manifest=manifest, gate=None,
                                 baseline=None, candidate=None, quant_config=fp8))
    assert {"w8a8", "fp8"} <= set(card.data.tags) and not {"int8", "smoothquant", "gptq"} & set(
        card.data.tags)
    assert "FP8 weights (per-channel) and dynamic per-token FP8 activations" in card.text
    assert "(Quantization)" in card.text and "SmoothQuant" not in card.text
    assert "Left unquantized: `lm_head`, `re:.*mlp.gate$`." in card.text


def test_base_model_the_hub_does_not_know_fails_before_any_upload(hub, candidate, tmp_path):
    bad = candidate | {"manifest": with_hub_id(candidate["manifest"], "acme/no-such-model")}
    with pytest.raises(PublishError, match=r"metadata validation refused it: \"base_model\" with "
                       r"value \"acme/no-such-model\" is not valid.*source\.hub_id"):
        run_publish(hub, bad, tmp_path / "publish")
    assert hub.state.lfs_bytes_received == 0 and hub.state.commit_count(REPO) == 0
    assert not (tmp_path / "publish").exists()


def test_production_marker_moves_only_when_asked_and_to_the_given_sha(hub, candidate, tmp_path):
    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)
    first = run_publish(hub, candidate, tmp_path / "p1")
    repo = hub.state.repos[REPO]
    assert "production" not in repo.branches  # publishing alone never promotes
    move_production_marker(settings, first.commit_sha, TOKEN)
    assert repo.branches["production"] == first.commit_sha  # created at the commit itself
    assert production_revision(settings, TOKEN) == first.commit_sha
    # a newer candidate: another commit on main; the marker stays until it is moved
    second = run_publish(hub, candidate | {"checkpoint": changed_copy(candidate, tmp_path)},
                         tmp_path / "p2")
    assert second.commit_sha != first.commit_sha
    assert production_revision(settings, TOKEN) == first.commit_sha
    uploaded = hub.state.lfs_bytes_received
    move_production_marker(settings, second.commit_sha, TOKEN)
    assert production_revision(settings, TOKEN) == second.commit_sha
    marker = repo.commits[repo.branches["production"]]
    # the marker's tree is the promoted commit's, file for file; LFS copied on the Hub
    assert {p: f.oid for p, f in marker.files.items()} == {
        p: f.oid for p, f in repo.commits[second.commit_sha].files.items()}
    assert hub.state.lfs_bytes_received == uploaded
    move_production_marker(settings, second.commit_sha, TOKEN)  # again: nothing to do
    assert repo.branches["production"] == marker.sha
    # back to the first (a rollback): the same mechanism, still never deleted
    move_production_marker(settings, first.commit_sha, TOKEN)
    assert production_revision(settings, TOKEN) == first.commit_sha
    assert not [c for c in hub.state.calls if c[0] == "DELETE"]


def test_production_marker_always_resolves_while_it_moves(hub, candidate, tmp_path):
    """A reader resolving `production` (as `vllm serve --revision production` does) during
    many moves never gets a 404: the branch is moved by commits, never deleted."""
    import threading

    import httpx

    settings = HubSettings(repo_id=REPO, endpoint=hub.endpoint)
    first = run_publish(hub, candidate, tmp_path / "p1")
    second = run_publish(hub, candidate | {"checkpoint": changed_copy(candidate, tmp_path)},
                         tmp_path / "p2")
    move_production_marker(settings, first.commit_sha, TOKEN)
    statuses: list[int] = []
    done = threading.Event()

    def reader() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            while not done.is_set():
                statuses.append(client.head(
                    f"{hub.endpoint}/{REPO}/resolve/production/config.json").status_code)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(3):
            move_production_marker(settings, second.commit_sha, TOKEN)
            move_production_marker(settings, first.commit_sha, TOKEN)
    finally:
        done.set()
        thread.join(30)
    assert len(statuses) > 10 and set(statuses) == {200}


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


def test_objects_over_the_single_put_limit_go_up_in_signed_parts_and_arrive_intact(
        hub, candidate, tmp_path):
    """The multipart LFS protocol the Hub uses for shards over 5 GB, scaled down: every part
    through its own presigned URL, assembled and checked against the declared oid and size."""
    weights = candidate["checkpoint"] / "model.safetensors"
    hub.state.multipart_threshold, hub.state.chunk_size = 64 * 1024, 64 * 1024
    result = run_publish(hub, candidate, tmp_path / "publish")
    parts = [c for c in hub.state.calls if c[1].startswith("/lfs-part/")]
    assert len(parts) >= weights.stat().st_size // (64 * 1024)
    entry = hub.state.repos[REPO].commits[result.commit_sha].files["model.safetensors"]
    assert (hub.state.storage / entry.oid).read_bytes() == weights.read_bytes()
    assert not list(hub.state.storage.glob("*.partial")) + list(hub.state.storage.glob("*.0*"))
