"""Progress you can watch: the quantization's progress artifact, read from a real Prefect server
while the run is still going, then complete when it ends."""

from __future__ import annotations

import threading
import time

import pytest

from requant.progress import StageProgress
from requant.quantization.progress import calibration_passes, decoder_layers, layer_progress
from requant.settings import PipelineSettings

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_recipe_passes_count_one_per_data_driven_modifier():
    from requant.quantization.recipes import resolve_recipe

    assert calibration_passes(resolve_recipe(PipelineSettings().quantization).text) == 2
    assert calibration_passes("QuantizationModifier: {scheme: FP8_DYNAMIC}") == 1


def test_layer_hooks_count_every_layer_call_and_leave_the_model_untouched(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 12]])
    before = model(ids).logits
    seen = []
    with layer_progress(model, samples=1, passes=1, report=lambda f, m: seen.append((f, m))):
        during = model(ids).logits
    assert torch.equal(before, during)
    assert len(seen) == len(decoder_layers(model)) == 2
    assert seen[-1][1].startswith("calibration pass 1 of 1, layer 2 of 2")
    assert 0 < seen[0][0] < seen[-1][0] <= 0.99
    model(ids)  # hooks removed on exit: nothing more is reported
    assert len(seen) == 2


def test_progress_outside_a_run_writes_the_terminal_line_only(capsys):
    progress = StageProgress("demo", "a stage", min_interval_s=0)
    progress(0.5, "half way")
    progress.done()
    err = capsys.readouterr().err
    assert "[demo]  50.0%  half way" in err and "[demo] 100.0%  done" in err


def test_quantization_progress_artifact_moves_while_the_run_is_going(
        tiny_model, chat_file, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from tests.conftest import requantize

    monkeypatch.setenv("REQUANT_PROGRESS_INTERVAL_S", "0")
    settings = PipelineSettings.model_validate({
        "source": {"model": str(tiny_model)},
        "calibration": {"dataset": str(chat_file), "num_samples": 40, "max_seq_len": 256},
        "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "evaluation": {"enabled": False}, "rollout": {"target": "none"}})
    key = ArtifactFilterKey(any_=["requant-progress-quantization"])
    result: dict = {}
    seen: list[float] = []
    deadline = time.monotonic() + 600
    with get_client(sync_client=True) as client:
        earlier = {a.id for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=key))}
        def run() -> None:
            try:
                result["summary"] = requantize(settings)
            except Exception as exc:  # surfaced below, in the test's own thread
                result["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        while worker.is_alive():
            assert time.monotonic() < deadline, "the run did not finish in 10 minutes"
            for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(key=key)):
                if artifact.id not in earlier and not result:  # the run is still going
                    seen.append(float(artifact.data))
            time.sleep(0.05)
        worker.join()
        assert "error" not in result, result.get("error")
        (final,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=key, flow_run_id=ArtifactFilterFlowRunId(any_=[result["summary"]["run_id"]])))
    assert result["summary"]["verification"]["ok"]
    assert any(0 < value < 100 for value in seen), seen  # a real intermediate value
    assert final.data == 100 and "checkpoint verified" in final.description
    assert str(final.flow_run_id) == result["summary"]["run_id"]
