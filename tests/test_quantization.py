"""Real llm-compressor oneshot on a tiny real Llama, on the CPU: seconds, not minutes."""

from __future__ import annotations

import json

import pytest

from requant.calibration import build_calibration_set
from requant.errors import CheckpointVerificationError
from requant.quantization.checkpoint import quantize_checkpoint
from requant.quantization.hardware import Accelerator
from requant.quantization.recipes import resolve_recipe
from requant.quantization.verification import saved_tensors
from requant.settings import PipelineSettings
from requant.source import resolve_source_files

CPU = Accelerator("cpu", "test-cpu")


def settings_for(model, data, **quant):
    return PipelineSettings.model_validate({
        "source": {"model": str(model)},
        "calibration": {"dataset": str(data), "num_samples": 8, "max_seq_len": 128},
        "quantization": quant,
    })


def run(settings, tmp_path):
    source = resolve_source_files(settings.source, with_weights=False)
    calib = build_calibration_set(settings.calibration, source, tmp_path / "cache")
    recipe = resolve_recipe(settings.quantization)
    out = tmp_path / "run" / "checkpoint"
    return quantize_checkpoint(settings, source, calib, recipe, CPU, out, {"flow_run_id": "t"})


def test_tiny_llama_becomes_a_verified_int8_checkpoint_with_manifest(tiny_model, chat_file, tmp_path):
    ckpt = run(settings_for(tiny_model, chat_file), tmp_path)
    files = {p.name for p in ckpt.path.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "manifest.json",
            "tokenizer.json", "tokenizer_config.json"} <= files
    tensors = saved_tensors(ckpt.path)
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == "I8"
    assert tensors["lm_head.weight"] == "BF16"
    assert "lm_head.weight_scale" not in tensors
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(ckpt.manifest, default=str))
    assert manifest["verification"] == {"ok": True, "problems": [], "quantized_linear": 14,
                                        "ignored_linear": ["lm_head"], "reload_ok": True}
    assert manifest["source"]["files"]["model.safetensors"]  # source weights are hashed
    assert manifest["recipe"]["origin"] == "preset:w8a8-int8"
    assert "SmoothQuantModifier" in manifest["recipe"]["text"]
    assert manifest["calibration"]["stats"]["samples"] == 8
    assert manifest["versions"]["llmcompressor"] == "0.14.0.1"
    assert manifest["peak_memory_gib"]["host_rss"] > 0
    assert manifest["timings_s"]["oneshot"] > 0
    assert [p.name for p in ckpt.path.parent.iterdir()] == ["checkpoint"]


def test_failure_inside_oneshot_leaves_no_checkpoint_behind(tiny_model, chat_file, tmp_path):
    settings = settings_for(tiny_model, chat_file)
    source = resolve_source_files(settings.source, with_weights=False)
    calib = build_calibration_set(settings.calibration, source, tmp_path / "cache")
    # Corrupt the prepared set: token ids past the vocabulary make the model's forward fail.
    from datasets import Dataset

    data = calib.path / "data"
    Dataset.from_dict({"input_ids": [[10**6, 1, 2]], "attention_mask": [[1, 1, 1]]}) \
        .save_to_disk(str(data.with_name("broken")))
    calib = type(calib)(calib.path, calib.fingerprint, calib.stats, calib.row_format, False)
    import shutil

    shutil.rmtree(data)
    data.with_name("broken").rename(data)
    out = tmp_path / "run" / "checkpoint"
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises, the point is the aftermath
        quantize_checkpoint(settings, source, calib, resolve_recipe(settings.quantization), CPU,
                            out, {})
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_checkpoint_missing_a_quantized_layer_is_rejected_and_moved_aside(
        tiny_model, chat_file, tmp_path):
    # A recipe whose targets quietly miss the MLPs, while it declares only lm_head as ignored.
    recipe = tmp_path / "partial.yaml"
    recipe.write_text(
        "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n"
        "      targets: ['re:.*self_attn.*_proj$']\n      scheme: W8A8\n      ignore: [lm_head]\n"
    )
    settings = settings_for(tiny_model, chat_file, recipe=str(recipe), verify_reload=False)
    with pytest.raises(CheckpointVerificationError) as err:
        run(settings, tmp_path)
    msg = str(err.value)
    assert "model.layers.0.mlp.gate_proj was not quantized" in msg
    out = tmp_path / "run" / "checkpoint"
    assert not out.exists()
    rejected = out.with_name("checkpoint.rejected")
    assert (rejected / "verification.json").is_file()
    assert not (rejected / "manifest.json").exists()
