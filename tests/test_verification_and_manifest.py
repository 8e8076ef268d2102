from __future__ import annotations

import copy
from datetime import UTC, datetime

from requant.quantization.manifest import render_manifest
from requant.quantization.verification import (
    ExpectedScheme,
    check_coverage,
    check_quantization_config,
    is_ignored,
)

W8A8_CONFIG = {
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "strategy": "channel",
                            "dynamic": False, "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                      "dynamic": True, "symmetric": True},
            }
        },
    }
}


def test_w8a8_config_with_dynamic_per_token_int8_activations_passes():
    assert check_quantization_config(W8A8_CONFIG, ExpectedScheme.for_scheme("W8A8")) == []


def test_missing_quantization_config_is_reported():
    assert check_quantization_config({}, ExpectedScheme()) == ["config.json has no quantization_config"]


def test_static_or_4bit_schemes_are_not_taken_for_w8a8():
    cfg = copy.deepcopy(W8A8_CONFIG)
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"]["dynamic"] = False
    group["weights"]["num_bits"] = 4
    problems = check_quantization_config(cfg, ExpectedScheme.for_scheme("W8A8"))
    assert any("weights.num_bits is 4" in p for p in problems)
    assert any("input_activations.dynamic is False" in p for p in problems)


def test_fp8_expectation_rejects_an_int8_checkpoint():
    problems = check_quantization_config(W8A8_CONFIG, ExpectedScheme.for_scheme("FP8_DYNAMIC"))
    assert any("weights.type is 'int'" in p for p in problems)


def test_every_linear_must_carry_a_scale_unless_ignored():
    linears = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "lm_head"]
    tensors = {"model.layers.0.self_attn.q_proj.weight_scale": "F32",
               "model.layers.0.mlp.gate_proj.weight": "BF16"}
    problems, quantized, ignored = check_coverage(linears, tensors, ["lm_head"])
    assert quantized == 1 and ignored == ["lm_head"]
    assert problems == ["Linear model.layers.0.mlp.gate_proj was not quantized "
                        "(no model.layers.0.mlp.gate_proj.weight_scale)"]
    problems, quantized, _ = check_coverage(linears, tensors, ["lm_head", "re:.*mlp.gate_proj$"])
    assert problems == [] and quantized == 1


def test_ignore_patterns_follow_compressed_tensors_convention():
    assert is_ignored("lm_head", ["lm_head"])
    assert is_ignored("model.layers.3.mlp.gate", ["gate"])
    assert not is_ignored("model.layers.3.mlp.gate_proj", ["gate"])
    assert is_ignored("model.layers.3.mlp.gate_proj", ["re:.*gate_proj"])


def _manifest(**changes):
    base = dict(
        source={"model": "org/m", "revision": "abc", "files": {"model.safetensors": "11"}},
        recipe={"sha256": "r1", "origin": "preset:w8a8-int8"},
        calibration={"fingerprint": "c1"},
        settings={}, hardware={"kind": "cpu"}, timings={"total": 1.0},
        memory={"host_rss": 1.0}, versions={"llmcompressor": "0.14.0.1", "requant": "0.1.0"},
        run={"flow_run_id": "x"}, created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    base.update(changes)
    return render_manifest(**base)


def test_inputs_fingerprint_changes_with_inputs_only():
    first = _manifest()
    assert _manifest(run={"flow_run_id": "y"}, timings={"total": 9.0},
                     created_at=datetime(2027, 1, 1, tzinfo=UTC))["inputs_fingerprint"] == \
        first["inputs_fingerprint"]
    for change in (
        {"recipe": {"sha256": "r2"}},
        {"calibration": {"fingerprint": "c2"}},
        {"source": {"model": "org/m", "revision": "def", "files": {"model.safetensors": "11"}}},
        {"source": {"model": "org/m", "revision": "abc", "files": {"model.safetensors": "22"}}},
        {"versions": {"llmcompressor": "0.15.0", "requant": "0.1.0"}},
    ):
        assert _manifest(**change)["inputs_fingerprint"] != first["inputs_fingerprint"], change
    assert first["created_at"] == "2026-01-01T00:00:00+00:00"
