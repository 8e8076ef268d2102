"""A quantization killed midway continues at its first unfinished layer, and its checkpoint is
the uninterrupted run's to the bit (requant.quantization.resume). The kills are real: the worker
process sends itself SIGKILL at a named step (REQUANT_KILL_AT), between a layer's file and its
record, or just after the record; a stored layer whose file no longer verifies is computed
again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from requant.quantization.resume import RESUME_DIR
from tests.conftest import ROOT, build_tiny_llama, gsm8k_rows, write_jsonl

pytestmark = pytest.mark.slow  # processes killed and started again: about 3 minutes

LAYERS = 4


@pytest.fixture(scope="module")
def job_settings(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    model = build_tiny_llama(work / "tiny", layers=LAYERS)
    data = write_jsonl(work / "calib.jsonl", [{"text": r["question"]} for r in gsm8k_rows(16)])
    return {"source": {"model": str(model)},
            "calibration": {"dataset": str(data), "num_samples": 16, "max_seq_len": 64}}


def quantize(settings: dict, work: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    job = work / "job.json"
    job.write_text(json.dumps({"settings": settings | {"cache_dir": str(work / "cache")},
                               "calibration_cache": str(work / "calib-cache"),
                               "out": str(work / "checkpoint")}))
    env = {k: v for k, v in os.environ.items() if k != "REQUANT_KILL_AT"}
    if kill_at:
        env["REQUANT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "tests.quantize_worker", str(job)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def stored_layers(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "cache" / RESUME_DIR).glob("*/layer-*"))


def weights(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((work / "checkpoint").glob("*.safetensors"))}


def manifest(work: Path) -> dict:
    return json.loads((work / "checkpoint" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(job_settings, tmp_path_factory):
    work = tmp_path_factory.mktemp("whole")
    done = quantize(job_settings, work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_an_uninterrupted_run_keeps_no_layers_once_its_checkpoint_is_verified(uninterrupted):
    assert manifest(uninterrupted)["hardware"]["resumed_at_layer"] == 0
    assert stored_layers(uninterrupted) == []


@pytest.mark.parametrize("kill_at, resumed_at", [
    ("layer-1-recorded", 2),  # layers 0 and 1 finished
    ("layer-2-written", 2),   # layer 2's file is there, its record is not: not finished
])
def test_killed_midway_the_rerun_resumes_at_the_first_unfinished_layer_bit_identical(
        job_settings, uninterrupted, tmp_path, kill_at, resumed_at):
    killed = quantize(job_settings, tmp_path, kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "checkpoint").exists()
    assert f"layer-{resumed_at - 1:05d}.json" in stored_layers(tmp_path)

    rerun = quantize(job_settings, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest(tmp_path)["hardware"]["resumed_at_layer"] == resumed_at
    assert weights(tmp_path) == weights(uninterrupted)
    whole, resumed = manifest(uninterrupted), manifest(tmp_path)
    assert resumed["smoothing_check"] == whole["smoothing_check"] | {
        "probe_s": resumed["smoothing_check"]["probe_s"]}
    assert resumed["hardware"]["gptq_loss"] == whole["hardware"]["gptq_loss"]
    assert stored_layers(tmp_path) == []


def test_a_stored_layer_whose_file_no_longer_verifies_is_computed_again(
        job_settings, uninterrupted, tmp_path):
    assert quantize(job_settings, tmp_path, "layer-2-recorded").returncode == -9
    (layer1,) = (tmp_path / "cache" / RESUME_DIR).glob("*/layer-00001.safetensors")
    data = bytearray(layer1.read_bytes())
    data[-1] ^= 0xFF
    layer1.write_bytes(bytes(data))  # a torn or tampered file: its record no longer holds

    rerun = quantize(job_settings, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest(tmp_path)["hardware"]["resumed_at_layer"] == 1
    assert weights(tmp_path) == weights(uninterrupted)


@pytest.mark.parametrize("altered, inputs_at", [(False, 2), (True, 0)],
                         ids=["kept-inputs", "kept-inputs-altered"])
def test_a_rerun_starts_from_the_kept_inputs_of_a_layer_not_from_layer_0_bit_identical(
        job_settings, uninterrupted, tmp_path, altered, inputs_at):
    """With the hidden states entering layer 2 kept, the rerun runs nothing on layers 0 and 1
    (only reads them back); kept inputs whose file was altered are not trusted, and it
    re-derives them through the stored layers as before. Either way: the same bytes."""
    settings = job_settings | {"quantization": {"resume_inputs_every": 2}}
    assert quantize(settings, tmp_path, "inputs-2-recorded").returncode == -9
    (kept,) = (tmp_path / "cache" / RESUME_DIR).glob("*/inputs-00002")
    if altered:
        batch = next(kept.glob("batch-*.safetensors"))
        data = bytearray(batch.read_bytes())
        data[-1] ^= 0xFF
        batch.write_bytes(bytes(data))
    rerun = quantize(settings, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    hardware = manifest(tmp_path)["hardware"]
    assert hardware["resumed_at_layer"] >= 2 and hardware["resumed_inputs_at_layer"] == inputs_at
    assert weights(tmp_path) == weights(uninterrupted)
    assert hardware["gptq_loss"] == manifest(uninterrupted)["hardware"]["gptq_loss"]
    assert not (tmp_path / "cache" / RESUME_DIR).exists() or stored_layers(tmp_path) == []


def test_other_inputs_never_resume_from_these_layers(job_settings, uninterrupted, tmp_path):
    assert quantize(job_settings, tmp_path, "layer-1-recorded").returncode == -9
    other = job_settings | {"quantization": {"smoothing_strength": 0.5}}
    rerun = quantize(other, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest(tmp_path)["hardware"]["resumed_at_layer"] == 0
    assert weights(tmp_path) != weights(uninterrupted)
    # the killed run's layers stay for a rerun of its own inputs; the finished one's are gone
    assert len({p.parent for p in (tmp_path / "cache" / RESUME_DIR).glob("*/layer-*")}) == 1


@pytest.fixture(scope="module")
def two_ranks(job_settings):
    """The same job on two gloo ranks (quantization.gpus=2 on the CPU, real torchrun)."""
    return job_settings | {"quantization": {"gpus": 2, "device": "cpu"}}


@pytest.fixture(scope="module")
def uninterrupted_on_two_ranks(two_ranks, tmp_path_factory):
    work = tmp_path_factory.mktemp("whole-2")
    done = quantize(two_ranks, work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert manifest(work)["distributed"]["ranks"] == 2
    return work


def test_rank_0_killed_midway_the_two_rank_rerun_resumes_bit_identical(
        two_ranks, uninterrupted_on_two_ranks, tmp_path):
    """Rank 0 keeps the finished layers (every rank holds the same ones) and SIGKILLs itself
    just after the second layer's record (index 1): torchrun takes rank 1 down, the stage fails
    naming rank 0. The rerun on two ranks resumes at the third layer on both (the manifest's
    ``resumed_at_layer`` counts the layers read back: 2) and writes the uninterrupted run's
    bytes."""
    killed = quantize(two_ranks, tmp_path, "layer-1-recorded")
    assert killed.returncode != 0 and "rank 0 of 2 was killed by SIGKILL" in killed.stderr, \
        killed.stderr[-3000:]
    assert not (tmp_path / "checkpoint").exists()
    assert "layer-00001.json" in stored_layers(tmp_path)

    rerun = quantize(two_ranks, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest(tmp_path)["hardware"]["resumed_at_layer"] == 2
    assert weights(tmp_path) == weights(uninterrupted_on_two_ranks)
    whole = manifest(uninterrupted_on_two_ranks)
    assert manifest(tmp_path)["hardware"]["gptq_loss"] == whole["hardware"]["gptq_loss"]
    assert stored_layers(tmp_path) == []
