"""Slow: the real bundled SmolLM2-135M-Instruct through the whole flow, as `make demo` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from requant.settings import load_settings
from tasks.verification import saved_tensors

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
    pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                       reason="demo model not built: run `make demo-model`"),
]


def test_demo_config_quantizes_smollm2_to_verified_w8a8_through_the_flow(tmp_path, monkeypatch):
    from flows.requantize import requantize

    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the project root
    settings = load_settings(ROOT / "deployments" / "configs" / "demo.yaml",
                             [f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"])
    summary = requantize(settings)

    ckpt = Path(summary["checkpoint"])
    config = json.loads((ckpt / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["num_bits"]) == ("int", 8)
    act = group["input_activations"]
    assert (act["type"], act["num_bits"], act["dynamic"], act["strategy"]) == ("int", 8, True, "token")
    assert summary["verification"] == {"ok": True, "problems": [], "quantized_linear": 210,
                                       "ignored_linear": ["lm_head"], "reload_ok": True}
    tensors = saved_tensors(ckpt)
    int8 = [k for k, v in tensors.items() if v == "I8"]
    assert len(int8) == 210  # 30 layers x 7 projections
    assert summary["calibration"]["stats"]["samples"] == 64
    assert summary["calibration"]["stats"]["max_len"] <= 512
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["source"]["files"]["model.safetensors"]
    assert manifest["settings"]["quantization"]["smoothing_strength"] == 0.8
    assert (ckpt / "chat_template.jinja").is_file()  # served with the same template it was calibrated on
