"""The requantize flow on a real (temporary, SQLite) Prefect server, with the tiny model."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from requant.errors import SettingsError
from requant.rundir import MARKER
from requant.settings import PipelineSettings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("prefect_server")


def settings_for(model, data, tmp_path, **calibration):
    return PipelineSettings.model_validate({
        "source": {"model": str(model)},
        "calibration": {"dataset": str(data), "num_samples": 8, "max_seq_len": 128, **calibration},
        "output_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
        "evaluation": {"enabled": False},  # the gate path is tested in test_flow_gate.py
    })


def _task_names(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0] for r in runs}


def test_flow_writes_run_dir_checkpoint_summary_and_artifacts(tiny_model, chat_file, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tests.conftest import requantize

    summary = requantize(settings_for(tiny_model, chat_file, tmp_path))
    run_dir = Path(summary["run_dir"])
    # the run made the GPU limit production's prefect-apply makes, so it waited as they do
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("requant-gpu").limit >= 1
    assert run_dir.parent == tmp_path / "runs"
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "calibration", "checkpoint",
                                                         "summary.json"]
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (run_dir / "checkpoint" / "manifest.json").is_file()
    assert summary["verification"]["ok"] is True
    assert summary["manifest_run"]["flow_run_id"] == summary["run_id"]
    assert _task_names(summary["run_id"]) == {"preflight", "resolve-source", "fit-recipe",
                                               "plan-memory",
                                               "prepare-calibration", "quantize"}
    manifest = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())
    check = manifest["smoothing_check"]  # SmoothQuant proven exact before GPTQ, on every run
    assert check["max_layer_update_rel_change"] < check["layer_tolerance"] and check["tokens"] > 0
    recipe = (run_dir / "checkpoint" / "recipe.yaml").read_text()
    assert "post_attention_layernorm" in recipe and "GPTQModifier" in recipe  # all of it
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[summary["run_id"]])))
    keys = {a.key for a in artifacts}
    assert {"calibration-stats", "requant-run-summary"} <= keys
    table = next(a for a in artifacts if a.key == "calibration-stats")
    assert "total_tokens" in str(table.data)


def test_rerun_with_same_inputs_reuses_calibration_and_reproduces_fingerprint(
        tiny_model, chat_file, tmp_path):
    from tests.conftest import requantize

    settings = settings_for(tiny_model, chat_file, tmp_path)
    first = requantize(settings)
    second = requantize(settings)
    assert second["run_id"] != first["run_id"]
    assert second["inputs_fingerprint"] == first["inputs_fingerprint"]
    reused = json.loads((Path(second["run_dir"]) / "calibration" / "calibration.json").read_text())
    assert reused["reused"] is True


def test_bad_calibration_input_fails_before_the_model_is_loaded(tiny_model, chat_file, tmp_path):
    from prefect import flow

    from tests.conftest import requantize

    holder = {}

    @flow
    def parent():
        try:
            requantize(settings_for(tiny_model, chat_file, tmp_path, num_samples=1000))
        except SettingsError as exc:
            holder["error"] = exc
        from prefect.runtime import flow_run

        holder["parent"] = flow_run.get_id()

    parent()
    assert "calibration.num_samples: 1000 asked for" in str(holder["error"])
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and not (runs[0] / "checkpoint").exists()
    # the failed run's record says where and why (requant status lists it)
    failure = json.loads((runs[0] / "summary.json").read_text())["failure"]
    assert failure["error"] == "SettingsError"
    assert "calibration.num_samples: 1000 asked for" in failure["message"]
    assert failure["where"].startswith("calibration.py:") and failure["stage"] == "calibration"
    from requant.status import run_line

    line = run_line(runs[0].name, runs[0], json.loads((runs[0] / "summary.json").read_text()))
    assert line["state"].startswith("FAILED in calibration: SettingsError at calibration.py:")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        (child,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[holder["parent"]])))
    assert child.state.is_failed()
    assert "quantize" not in _task_names(child.id)


def test_cli_rejects_bad_settings_naming_field_without_starting_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "requant", "run", "--set", "calibration.max_seq_len=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "calibration.max_seq_len" in proc.stderr and "Set a larger value" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_waits_for_the_gpu_slot_held_by_another_run_says_so_then_proceeds(
        tiny_model, chat_file, tmp_path):
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    from requant.gpu_limit import GPU_LIMIT, WAITING_MARK
    from requant.status import collect_status, render_status
    from tests.conftest import requantize, wait_until

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(  # unless an earlier test made it
            GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
    outcome = {}
    settings = settings_for(tiny_model, chat_file, tmp_path)
    with concurrency(GPU_LIMIT, occupy=1):  # "the nightly run" holds the GPU
        worker = threading.Thread(target=lambda: outcome.setdefault("summary",
                                                                    requantize(settings)))
        worker.start()
        mark = wait_until(lambda: next((tmp_path / "runs").glob(f"*/{WAITING_MARK}"), None),
                          180, "the run's WAITING_FOR_GPU mark")
        run_dir = mark.parent
        assert worker.is_alive() and (run_dir / "calibration").exists()  # cheap stages ran
        assert not (run_dir / "checkpoint").exists()  # ...the GPU stage waits for the slot
        assert json.loads(mark.read_text())["slots"] == 1
        assert f"{run_dir.name}: waiting for 1 GPU slot(s)" in render_status(
            collect_status(settings))
    worker.join(300)
    assert outcome["summary"]["verification"]["ok"] is True  # then it proceeded
    assert not mark.exists()


def test_a_run_needing_more_gpus_than_the_limit_counts_is_refused_before_any_stage(
        tiny_model, chat_file, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    from requant.gpu_limit import GPU_LIMIT
    from tests.conftest import requantize

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT,
                                                                            limit=1))
    settings = settings_for(tiny_model, chat_file, tmp_path).model_copy(update={
        "quantization": PipelineSettings.model_validate(
            {"quantization": {"gpus": 2, "device": "cpu"}}).quantization})
    with pytest.raises(SettingsError, match=r"needs 2 slots of the global concurrency limit "
                       r"'requant-gpu', which has 1 \(it counts GPUs\)"):
        requantize(settings)
    assert not (tmp_path / "runs").exists()
