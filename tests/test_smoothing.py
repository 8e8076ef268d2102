"""SmoothQuant exact for every architecture requant accepts: mappings named per model_type, Gemma's
offset norms handled, and a check on every run that stops a smoothing which changed the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from requant.errors import SettingsError, SmoothingNotExact
from requant.quantization.smoothing import ARCHITECTURES, fit_recipe, split_recipe
from tests.conftest import needs_vllm
from tests.tinymodels import ARCHS, build_tiny_model

SMOOTH_ONLY = ("quant_stage:\n  quant_modifiers:\n    SmoothQuantModifier:\n"
               "      smoothing_strength: 0.8\n")
PRESET = SMOOTH_ONLY + ("    GPTQModifier:\n      targets: [Linear]\n      scheme: W8A8\n"
                        "      ignore: [lm_head]\n")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_every_supported_architecture_is_a_real_config_class_with_named_mappings():
    assert set(ARCHITECTURES) == set(ARCHS)
    for model_type in ARCHITECTURES:
        text, arch = fit_recipe(PRESET, model_type)
        smooth = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["SmoothQuantModifier"]
        assert smooth["mappings"] == [list(m) for m in arch.mappings]
    gemma, _ = fit_recipe(PRESET, "gemma2")
    assert "pre_feedforward_layernorm" in gemma and "post_attention_layernorm" not in gemma
    assert ARCHITECTURES["gemma2"].offset_norm and not ARCHITECTURES["llama"].offset_norm


def test_unknown_architecture_is_refused_before_calibration_naming_the_recipe_fix():
    with pytest.raises(SettingsError, match=r"no verified mapping for model_type 'falcon'.*"
                       r"quantization\.recipe.*`mappings`.*fp8-dynamic"):
        fit_recipe(PRESET, "falcon")
    own = PRESET.replace("smoothing_strength: 0.8\n", "smoothing_strength: 0.8\n      mappings: "
                         "[[['re:.*query_key_value'], 're:.*input_layernorm']]\n")
    assert fit_recipe(own, "falcon")[0] == own  # a recipe's own mappings: the run's check judges
    assert fit_recipe("q:\n  m:\n    QuantizationModifier: {scheme: FP8_DYNAMIC}\n",
                      "falcon")[1] is None  # no SmoothQuant, nothing to fit


def test_recipe_splits_into_smoothquant_alone_and_the_rest():
    smooth, rest = split_recipe(fit_recipe(PRESET, "llama")[0])
    assert "SmoothQuantModifier" in smooth and "GPTQModifier" not in smooth
    assert "GPTQModifier" in rest and "SmoothQuantModifier" not in rest


def smooth(model_dir: Path, recipe: str):
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from requant.quantization.oneshot import load_model, smooth_checked

    torch.manual_seed(1)
    model, tok = load_model(model_dir)
    ids = torch.randint(5, len(tok), (8, 64)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 64] * 8})
    smooth_text, _ = split_recipe(recipe)
    return smooth_checked(model, smooth_text, data, None, lambda text: oneshot(
        model=model, processor=tok, recipe=text, dataset=data, num_calibration_samples=8,
        max_seq_length=64, shuffle_calibration_samples=False))


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3"])
def test_requant_mappings_leave_the_model_unchanged_up_to_rounding(model_type, tokenizer,
                                                                   tmp_path):
    record = smooth(build_tiny_model(tmp_path / model_type, model_type, tokenizer),
                    fit_recipe(SMOOTH_ONLY, model_type)[0])
    assert record["max_layer_update_rel_change"] < record["layer_tolerance"]
    assert max(record["first_layer_balance_rel_change"].values()) < \
        record["first_layer_tolerance"]
    assert len(record["layer_update_rel_change"]) == 2  # every decoder layer checked


def test_planted_wrong_mapping_stops_the_run_naming_the_mapping(tokenizer, tmp_path):
    """llm-compressor's own Gemma mapping: post_attention_layernorm feeds the residual, not the
    MLP, and the norm is x̂ · (1 + w). The check stops it and names the mapping."""
    model = build_tiny_model(tmp_path / "gemma2", "gemma2", tokenizer)
    wrong = SMOOTH_ONLY.replace("smoothing_strength: 0.8\n", "smoothing_strength: 0.8\n"
                                "      mappings:\n      - [['re:.*gate_proj$', 're:.*up_proj$'], "
                                "'re:.*post_attention_layernorm$']\n")
    with pytest.raises(SmoothingNotExact, match=r"\(gemma2\): decoder layers \[0, 1\] compute "
                       r"something else.*Mapping at fault: \.\*post_attention_layernorm\$ -> "
                       r".*Fix: write a recipe") as err:
        smooth(model, wrong)
    assert err.value.record["max_layer_update_rel_change"] > 0.5


def test_a_norm_feeding_linears_its_mapping_leaves_out_is_caught_by_the_logits(tokenizer,
                                                                               tmp_path):
    model = build_tiny_model(tmp_path / "llama", "llama", tokenizer)
    partial = SMOOTH_ONLY.replace("smoothing_strength: 0.8\n", "smoothing_strength: 0.8\n"
                                  "      mappings:\n      - [['re:.*q_proj$'], "
                                  "'re:.*input_layernorm$']\n")
    with pytest.raises(SmoothingNotExact, match="a norm also feeds Linears its mapping leaves out"):
        smooth(model, partial)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_each_architecture_goes_through_the_flow_to_a_verified_exact_checkpoint(
        model_type, tokenizer, chat_file, tmp_path, prefect_server):
    from tests.conftest import requantize
    from tests.test_flow import settings_for

    model = build_tiny_model(tmp_path / model_type, model_type, tokenizer)
    summary = requantize(settings_for(model, chat_file, tmp_path))
    manifest = json.loads((Path(summary["run_dir"]) / "checkpoint" / "manifest.json").read_text())
    assert summary["verification"]["ok"] is True
    check = manifest["smoothing_check"]
    assert check["max_layer_update_rel_change"] < check["layer_tolerance"]
    config = json.loads((Path(summary["run_dir"]) / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == model_type and "quantization_config" in config


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("model_type", ["qwen3"])  # gemma2, phi3: docs/testing.md
def test_other_architectures_quantized_by_the_flow_are_served_by_vllm(
        model_type, tokenizer, chat_file, tmp_path, prefect_server):
    """The families whose code differs from Llama's (offset norms, fused projections, q/k
    norms): their W8A8 checkpoints load and generate in vLLM, not only in transformers."""
    import httpx

    from requant.serving.server import running_server
    from tests.conftest import requantize, tiny_server_settings
    from tests.test_flow import settings_for
    from tests.tinymodels import SERVABLE

    model = build_tiny_model(tmp_path / model_type, model_type, tokenizer, **SERVABLE)
    summary = requantize(settings_for(model, chat_file, tmp_path))
    checkpoint = Path(summary["run_dir"]) / "checkpoint"
    with running_server(checkpoint, tiny_server_settings(), tmp_path / "server.log",
                        served_name=model_type) as server:
        reply = httpx.post(server.completions_url, timeout=120, json={
            "model": model_type, "prompt": "Question: 1+1?\nAnswer:", "max_tokens": 8,
            "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] >= 1
    assert "compressed" in (tmp_path / "server.log").read_text().lower()
