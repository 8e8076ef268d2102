"""The quantization stage's memory plan, from config.json and the settings, before anything is
loaded: what cannot fit is refused with the numbers and the setting to change, and the plan for
a real model is an upper bound of what the stage measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from requant.errors import SettingsError
from requant.gpu_memory import GIB
from requant.quantization.memory_plan import check_memory_plan, count_params, plan_memory

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": False}
LLAMA3_8B = LLAMA3_70B | {"hidden_size": 4096, "intermediate_size": 14336,
                          "num_hidden_layers": 32, "num_attention_heads": 32}


def test_parameter_counts_match_the_published_sizes_of_llama3_8b_and_70b():
    assert count_params(LLAMA3_8B) == pytest.approx(8.03e9, rel=0.005)
    assert count_params(LLAMA3_70B) == pytest.approx(70.55e9, rel=0.005)


def test_a_70b_job_that_cannot_fit_this_host_is_refused_with_the_numbers_and_the_settings():
    plan = plan_memory(LLAMA3_70B, gpus=2, on_gpu=True, fp32=False, samples=512,
                       max_seq_len=2048, gpu_total=141 * GIB)
    assert plan.copies == 2 and plan.weight_bytes == pytest.approx(141e9, rel=0.01)
    with pytest.raises(SettingsError) as err:
        check_memory_plan(plan, host_available=256 * GIB, gpu_total=141 * GIB)
    message = str(err.value)
    assert message.startswith("quantization: the plan needs")
    assert "256.0 GiB available" in message and "quantization.gpus=1" in message
    assert "calibration.num_samples" in message and "\n" not in message
    one = plan_memory(LLAMA3_70B, gpus=1, on_gpu=True, fp32=False, samples=512,
                      max_seq_len=2048, gpu_total=141 * GIB)
    check_memory_plan(one, host_available=256 * GIB, gpu_total=141 * GIB)  # one copy fits
    assert one.activations_on_gpu  # 16 GiB of hidden states fit half the H200


def test_keeping_layer_inputs_for_resuming_plans_one_more_host_copy_of_the_activations():
    kwargs = {"gpus": 1, "on_gpu": True, "fp32": False, "samples": 512, "max_seq_len": 2048,
              "gpu_total": 141 * GIB}
    plain = plan_memory(LLAMA3_70B, **kwargs)
    kept = plan_memory(LLAMA3_70B, **kwargs, kept_inputs=True)
    assert kept.host_bytes - plain.host_bytes == plain.activation_bytes == 512 * 2048 * 8192 * 2


def test_only_llm_compressors_ranks_put_a_weight_replica_on_each_gpu_and_only_when_it_fits():
    """The single pass's ranks keep the weights in host memory; llm-compressor's pipeline puts
    a replica on each GPU when it takes at most 40 % of it (8B on 80 GB: yes; 70B: no)."""
    def gpu(config: dict, pipeline: str) -> float:
        return plan_memory(config, gpus=2, on_gpu=True, fp32=False, samples=64,
                           max_seq_len=2048, gpu_total=80 * GIB,
                           pipeline=pipeline).gpu_bytes_per_rank / GIB

    weights_8b = count_params(LLAMA3_8B) * 2 / GIB
    assert gpu(LLAMA3_8B, "llm-compressor") - gpu(LLAMA3_8B, "single-pass") == pytest.approx(
        weights_8b)
    assert gpu(LLAMA3_70B, "llm-compressor") == gpu(LLAMA3_70B, "single-pass") < 80
    plan = plan_memory(LLAMA3_70B, gpus=2, on_gpu=True, fp32=False, samples=64,
                       max_seq_len=2048, gpu_total=80 * GIB)
    check_memory_plan(plan, host_available=2048 * GIB, gpu_total=80 * GIB)  # fits: no replica


def test_a_gpu_too_small_for_one_layer_is_refused_naming_the_gpu_figure():
    plan = plan_memory(LLAMA3_70B, gpus=1, on_gpu=True, fp32=False, samples=64,
                       max_seq_len=2048, gpu_total=4 * GIB)
    with pytest.raises(SettingsError, match=r"per GPU and each has 4\.0 GiB"):
        check_memory_plan(plan, host_available=2048 * GIB, gpu_total=4 * GIB)


def test_the_demo_models_plan_bounds_its_measured_peak_on_this_cpu():
    """SmolLM2-135M, 64 x 512, fp32 on a CPU without native bf16: the flow's measured peak RSS
    (benchmarks/bench_quantization_cpu.py) must be inside the plan, and the plan not absurd."""
    config = json.loads((ROOT / "models" / "SmolLM2-135M-Instruct" / "config.json").read_text()) \
        if (ROOT / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file() else {
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "tie_word_embeddings": True}
    measured = json.loads((ROOT / "docs" / "measurements" / "cpu-quantization.json")
                          .read_text())["median"]["flow"]["peak_rss_gib"] * GIB
    plan = plan_memory(config, gpus=1, on_gpu=False, fp32=True, samples=64, max_seq_len=512,
                       gpu_total=None)
    assert count_params(config) == pytest.approx(134.5e6, rel=0.01)
    assert measured <= plan.host_bytes <= 3 * measured


def test_70b_on_two_ranks_of_the_single_pass_plans_one_host_copy_and_fits_a_256_gib_host():
    """#24: rank 0 alone reads the weights, the other ranks receive each layer; the plan counts
    one copy, and 70B at 512 x 2048 on 2 H200s fits the 256 GiB host it was refused on, within
    one model copy + 20 %."""
    plan = plan_memory(LLAMA3_70B, gpus=2, on_gpu=True, fp32=False, samples=512,
                       max_seq_len=2048, gpu_total=141 * GIB, read_once=True)
    assert plan.copies == 1
    check_memory_plan(plan, host_available=256 * GIB, gpu_total=141 * GIB)
    assert plan.host_bytes <= 1.2 * plan.weight_bytes


def test_the_plan_reads_once_only_where_the_single_pass_runs_the_recipe(tiny_model):
    """A recipe quantizing lm_head goes to llm-compressor's pipeline, where every rank reads
    the model: the plan must count a copy per rank for it, or it would let through a job that
    runs out of memory."""
    from requant.quantization.memory_plan import plan_for_source
    from requant.quantization.recipes import resolve_recipe
    from requant.quantization.smoothing import fit_to_model
    from requant.settings import PipelineSettings, QuantizationSettings

    def copies(gpus: int, ignore: list[str], pipeline: str = "single-pass") -> int:
        q = {"gpus": gpus, "device": "cpu", "pipeline": pipeline, "ignore": ignore}
        settings = PipelineSettings.model_validate({"source": {"model": str(tiny_model)},
                                                    "quantization": q})
        text = fit_to_model(resolve_recipe(QuantizationSettings(ignore=ignore)), "llama").text
        return plan_for_source(tiny_model, settings, on_gpu=False, fp32=True, gpu_total=None,
                               recipe_text=text).copies

    assert copies(2, ["lm_head"]) == 1
    assert copies(2, []) == 2  # lm_head quantized: the single pass declines it
    assert copies(2, ["lm_head"], "llm-compressor") == 2
    assert copies(1, ["lm_head"]) == 1


def test_the_70b_projection_in_the_docs_is_what_its_script_computes_from_the_measured_layers(
        tmp_path):
    """docs/quantization.md's 70B table comes from benchmarks/project_70b.py over the measured
    JSON; the plan's figures in it are today's plan (a stale projection fails here)."""
    import subprocess
    import sys

    out = tmp_path / "projection.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "project_70b.py"), "--out",
                    str(out)], check=True, capture_output=True, timeout=120)
    shipped = ROOT / "docs" / "measurements" / "gpu-70b-projection.json"
    assert json.loads(out.read_text()) == json.loads(shipped.read_text())
    h100 = json.loads(out.read_text())["devices"][0]
    assert h100["fit"]["max_residual_s"] < 2.0  # the layers do cost the same each
    # the measured peak GPU stays under the plan's figure for the whole model on one GPU
    assert max(r["peak_gpu_gib"] for r in h100["measured"]) \
        <= h100["projection_80_layers"]["1"]["plan_gpu_gib_per_rank"]
