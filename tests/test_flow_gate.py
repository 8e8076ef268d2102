"""The whole flow with evaluation and gate on a tiny model (slow): real Prefect, llm-compressor,
lm-eval and Hub client; the model servers are the stand-in (tests/standin_vllm.py, through the
worker's REQUANT_SERVING_PYTHON), because the subject is the flow's decisions and records, not
vLLM: it answers as the random tiny model does (score 0) in a second instead of ~45 s per
start. The same flow runs on real vLLM servers in test_e2e_demo (`make demo`) and the
evaluation path in test_vllm_integration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from requant.errors import GateFailed, RolloutFailed
from requant.rundir import MARKER
from requant.settings import PipelineSettings
from tests.conftest import ROOT, gsm8k_rows, processes_mentioning, tiny_settings, write_jsonl
from tests.standin_vllm import standin_python

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server", "standin_servers")]


@pytest.fixture
def standin_servers(tmp_path, monkeypatch):
    """The worker's operator points the serving Python at the stand-in."""
    monkeypatch.setenv("REQUANT_SERVING_PYTHON",
                       str(standin_python(tmp_path / "serving-env" / "bin")))


def test_a_source_that_cannot_do_the_task_ends_before_quantization_and_inconclusive_fails_closed(
        vllm_tiny_source, tmp_path, monkeypatch):
    from requant.errors import SettingsError
    from tests.conftest import requantize
    from tests.fakehub import FakeHub

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_TOKEN", "hf_gatetest")
    hub = FakeHub("hf_gatetest", tmp_path / "hub").__enter__()
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": r["question"]} for r in gsm8k_rows(8)])
    base = {
        "source": {"model": str(vllm_tiny_source)},
        "calibration": {"dataset": str(data), "num_samples": 8, "max_seq_len": 128},
        "evaluation": {"tasks": ["gsm8k_local"], "task_limits": {}, "limit": 4,
                       "num_fewshot": 0, "max_gen_toks": 16,
                       "server": {"max_model_len": 1024, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}},
        "hub": {"repo_id": "acme/never", "endpoint": hub.endpoint},
        "gate": {"rules": [{"task": "gsm8k_local"}], "looks": [0.5, 1.0]},
        "cache_dir": str(tmp_path / "cache"),
    }
    try:
        # the default rules ask a baseline of at least 0.10; a random model scores 0
        with pytest.raises(SettingsError, match=r"gate\.rules\.0: the source scores 0\.0000"):
            requantize(PipelineSettings.model_validate(
                base | {"output_dir": str(tmp_path / "runs1")}))
        (run1,) = (tmp_path / "runs1").iterdir()
        assert not (run1 / "checkpoint").exists()  # no quantization was spent on it
        assert (run1 / "eval" / "baseline" / "summary.json").is_file()

        # the operator measures the baseline's noise (A/A) for this evaluation: later runs'
        # gate records carry it
        from requant.cli import main
        config = tmp_path / "settings.yaml"
        config.write_text(json.dumps(base | {"output_dir": str(tmp_path / "runs1")}))
        assert main(["noise", "--config", str(config)]) == 0

        # with no minimum, the same zero scores decide nothing: inconclusive fails closed
        with pytest.raises(GateFailed) as err:
            requantize(PipelineSettings.model_validate(base | {
                "output_dir": str(tmp_path / "runs2"),
                "gate": {"rules": [{"task": "gsm8k_local", "min_baseline": 0.0}],
                         "looks": [0.5, 1.0]}}))
    finally:
        hub.__exit__(None, None, None)
    assert hub.state.calls == []  # the Hub never heard from us
    assert err.value.decision.status == "inconclusive"
    assert "nothing leaves the machine" in str(err.value)
    (run_dir,) = (tmp_path / "runs2").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        MARKER, "calibration", "checkpoint", "eval", "gate", "summary.json"]
    decision = json.loads((run_dir / "gate" / "decision.json").read_text())
    assert decision["status"] == "inconclusive" and decision["promote"] is False
    assert decision["noise"]["measured"] is True and decision["noise"]["prompts_paired"]
    assert decision["noise"]["rules"][0]["questions"] == 2  # the first stage of 4 questions
    assert decision["noise"]["rules"][0]["flips"] == 0  # the stand-in answers alike each time
    # the first run's baseline stage came from the cache (the same file, byte for byte); look 1
    # undecided, the baseline then answered stage 2 only, and the candidate continued
    stage1 = "eval/baseline/results_gsm8k_local_stage1.json"
    assert (run_dir / stage1).read_bytes() == (run1 / stage1).read_bytes()
    assert decision["baseline"]["stages"] == decision["candidate"]["stages"] == 2
    assert decision["questions"] == decision["total"] == 4 and decision["look"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gate"]["promote"] is False
    assert summary["failure"]["error"] == "GateFailed"  # the record says why the run failed
    assert summary["failure"]["stage"] == "gate"
    assert processes_mentioning("requant-baseline", str(vllm_tiny_source)) == []
    assert processes_mentioning("requant-candidate", str(tmp_path)) == []


def test_bad_task_name_fails_in_preflight_before_any_quantization(vllm_tiny_source, tmp_path,
                                                                 monkeypatch):
    from requant.errors import SettingsError
    from tests.conftest import requantize

    monkeypatch.chdir(ROOT)
    settings = PipelineSettings.model_validate({
        "source": {"model": str(vllm_tiny_source)},
        "evaluation": {"tasks": ["gsm8k_locall"]},
        "gate": {"rules": [{"task": "gsm8k_locall"}]},
        "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
    })
    with pytest.raises(SettingsError, match="gsm8k_local"):
        requantize(settings)
    assert not (tmp_path / "runs").exists()  # a failed preflight leaves no run folder
    assert not Path(tmp_path / "cache").exists()


def test_passing_run_publishes_and_a_failed_rollout_is_retried_by_the_next_run_then_no_op(
        vllm_tiny_source, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from prefect.client.orchestration import get_client

    from requant.rollout.local import router_status, shutdown_local
    from requant.rollout.state import load_state
    from requant.serving.server import free_port
    from tests.conftest import requantize, tiny_server_settings
    from tests.fakehub import FakeHub
    from tests.platformkit import wait_events

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_TOKEN", "hf_inlinetest")
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": r["question"]} for r in gsm8k_rows(8)])
    port = free_port()
    with FakeHub("hf_inlinetest", tmp_path / "hub") as hub:
        settings = PipelineSettings.model_validate({
            "source": {"model": str(vllm_tiny_source)},
            "calibration": {"dataset": str(data), "num_samples": 8, "max_seq_len": 128},
            "evaluation": {"tasks": ["gsm8k_local"], "task_limits": {}, "limit": 4,
                           "num_fewshot": 0, "max_gen_toks": 16,
                           "server": tiny_server_settings().model_dump()},
            # a random tiny model scores 0: no minimum baseline, and the inconclusive result
            # is let through to exercise publish and rollout
            "gate": {"rules": [{"task": "gsm8k_local", "min_baseline": 0.0}], "looks": [1.0],
                     "allow_inconclusive": True},
            "hub": {"repo_id": "acme/inline", "endpoint": hub.endpoint},
            "rollout": {"target": "local", "served_model_name": "tiny-chat",
                        "state_dir": str(tmp_path / "state"),
                        "local": {"port": port, "keep_previous_s": 3,
                                  "server": tiny_server_settings().model_dump()},
                        "slo": {"requests": 16, "concurrency": 8, "max_tokens": 16}},
            "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        })
        try:
            # the first run publishes, but its rollout fails (an SLO no server meets): published,
            # not deployed
            strict = settings.model_copy(deep=True)
            strict.rollout.slo.max_p95_latency_s = 1e-6
            with pytest.raises(RolloutFailed, match="max_p95_latency_s"):
                requantize(strict)
            (published,) = (tmp_path / "cache" / "ledger").glob("[0-9a-f]*.json")
            sha, publisher = (json.loads(published.read_text())[k] for k in ("commit_sha",
                                                                             "run_id"))
            # the failed run's record: the stage, the why, and what it had done before
            assert_failed_in(tmp_path / "runs" / publisher, "rollout", "RolloutFailed",
                             "max_p95_latency_s")
            assert load_state(tmp_path / "state", "local").active is None
            # the next run rolls that candidate out, without requantizing
            first = requantize(settings)
            assert first["promoted_published"]["revision"] == sha
            assert first["rollout"]["deployed"]["release"]["revision"] == sha
            (first_dir,) = [p for p in (tmp_path / "runs").iterdir()
                            if p.name == first["run_id"]]
            assert not (first_dir / "checkpoint").exists()
            assert router_status(f"http://127.0.0.1:{port}")["revision"] == sha
            refs = HfApi(endpoint=hub.endpoint, token="hf_inlinetest").list_repo_refs(
                "acme/inline")
            assert {b.name: b.target_commit for b in refs.branches}["production"] == sha
            assert load_state(tmp_path / "state", "local").active.release.revision == sha

            calls_before = len(hub.state.calls)
            second = requantize(settings)
            assert second["no_op"] is True and second["already_published"]["commit_sha"] == sha
            assert second["timings_s"]["flow"] < 60
            assert len(hub.state.calls) == calls_before  # not even a Hub call
            (second_dir,) = [p for p in (tmp_path / "runs").iterdir()
                             if p.name == second["run_id"]]
            assert sorted(p.name for p in second_dir.iterdir()) == [MARKER, "calibration",
                                                                    "summary.json"]
        finally:
            shutdown_local(settings)

    with get_client(sync_client=True) as client:
        events = wait_events(client, "requant.gate.",
                             lambda e: e["payload"].get("run_id") == publisher)
    gate_record = json.loads((tmp_path / "runs" / publisher / "gate" / "decision.json")
                             .read_text())
    assert gate_record["noise"]["measured"] is False  # none measured for this evaluation
    passed = [e for e in events if e["event"] == "requant.gate.passed"
              and e["payload"]["run_id"] == publisher]
    assert passed and passed[0]["payload"]["revision"] == sha
    assert passed[0]["resource"]["prefect.resource.id"] == "requant.model.acme/inline"
    assert "hf_inlinetest" not in json.dumps(events)


def assert_failed_in(run_dir: Path, stage: str, error: str, why: str) -> dict:
    """The run's record says where (the stage) and why, and requant status prints it."""
    from requant.status import run_line

    summary = json.loads((run_dir / "summary.json").read_text())
    failure = summary["failure"]
    assert (failure["stage"], failure["error"]) == (stage, error), failure
    assert why in failure["message"], failure
    line = run_line(run_dir.name, run_dir, summary)
    assert line["state"].startswith(f"FAILED in {stage}: {error} at "), line
    assert why in line["why"]
    return summary


def test_runs_failing_in_each_stage_leave_their_stage_and_why(vllm_tiny_source, tmp_path,
                                                              monkeypatch):
    """#39: a run that fails leaves its record whatever stage stopped it (calibration:
    test_flow.py; gate and rollout: the tests above; settings and preflight refuse before a run
    folder exists: test_hostile_parameters.py, test_preflight_errors.py). Evaluation: a server
    not ready within its deadline. Quantization: SmoothQuant mappings that do not match the
    model (its exactness check). Verification: a recipe that quantizes q_proj only. Publish: a
    Hub branch that does not exist (the Hub's 404 at the commit); nothing published."""
    from tests.conftest import requantize
    from tests.fakehub import FakeHub

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_TOKEN", "hf_stagetest")
    with FakeHub("hf_stagetest", tmp_path / "hub") as hub:
        base = tiny_settings(tmp_path, vllm_tiny_source, rollout={"target": "none"},
                             hub={"repo_id": "acme/stages", "endpoint": hub.endpoint})

        def failed_run(name: str, match: str, **sections) -> Path:
            """A run that must fail (``match``): its run folder."""
            with pytest.raises(Exception, match=match):
                requantize(PipelineSettings.model_validate(
                    base | {"output_dir": str(tmp_path / name)} | sections))
            (run_dir,) = (tmp_path / name).iterdir()
            return run_dir

        # a server that takes 5 s to answer, given 0.2 s: not ready at its deadline however
        # the host's load shifts the polls (with the stand-in's usual 1 s it could be ready
        # by the second poll, and the run went on: seen in CI beside other test files)
        monkeypatch.setenv("STANDIN_STARTUP_S", "5")
        evaluated = failed_run("runs-e", "startup_timeout_s", evaluation=base["evaluation"] | {
            "server": base["evaluation"]["server"] | {"startup_timeout_s": 0.2}})
        monkeypatch.setenv("STANDIN_STARTUP_S", "1")
        assert_failed_in(evaluated, "evaluation", "ServerError",
                         "evaluation.server.startup_timeout_s")
        assert not (evaluated / "checkpoint").exists()  # before any quantization

        verified = failed_run("runs-v", "failed verification", quantization={
            "recipe": str(ROOT / "tests/data/partial-w8a8-recipe.yaml")})
        assert_failed_in(verified, "verification", "CheckpointVerificationError",
                         "was not quantized")
        assert (verified / "checkpoint.rejected" / "verification.json").is_file()
        assert not (verified / "checkpoint").exists()

        quantized = failed_run("runs-q", "SmoothQuant", quantization={
            "recipe": str(ROOT / "tests/data/broken-smoothing-recipe.yaml")})
        assert_failed_in(quantized, "quantization", "SmoothingNotExact",
                         "SmoothQuant changed the model")
        assert not (quantized / "checkpoint").exists()

        published = failed_run("runs-p", r"hub\.branch", hub=base["hub"] | {"branch": "release"})
        summary = assert_failed_in(published, "publish", "PublishError", "hub.branch")
        assert summary["gate"]["promote"] is True  # it got that far, and no further
        assert hub.state.commit_count("acme/stages") == 0
