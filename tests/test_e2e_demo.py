"""Slow: the real bundled SmolLM2-135M-Instruct through the whole flow, as `make demo` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from requant.quantization.verification import saved_tensors
from requant.rollout.local import shutdown_local
from requant.serving.server import free_port
from requant.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
    pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                       reason="demo model not built: run `make demo-model`"),
]


def test_demo_config_quantizes_smollm2_to_verified_w8a8_through_the_flow(tmp_path, monkeypatch):
    from requant.flows.requantize import requantize

    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the project root
    port = free_port()
    settings = load_settings(ROOT / "deployments" / "configs" / "demo.yaml",
                             [f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                              "evaluation.limit=20", f"rollout.state_dir={tmp_path / 'state'}",
                              f"rollout.local.port={port}"])
    try:
        summary = requantize(settings)
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "requant-w8a8", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 2 + 2?"}]}).json()
    finally:
        shutdown_local(settings)

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

    # quantize -> evaluate (both served by real vLLM) -> gate. SmolLM2-135M scores ~0 on gsm8k,
    # so the gate is inconclusive, which the demo config lets through, saying so.
    run_dir = Path(summary["run_dir"])
    gate = json.loads((run_dir / "gate" / "decision.json").read_text())
    assert gate["status"] == "inconclusive" and gate["promote"] is True
    assert any("below gate.min_baseline" in r for r in gate["reasons"])
    assert any("allow_inconclusive=true" in r for r in gate["reasons"])
    assert gate["paired"]["n"] == 20
    for label in ("baseline", "candidate"):
        result = gate[label]
        assert result["documents"] == 20 and result["task"] == "gsm8k_local"
        assert (run_dir / "eval" / label / "results.json").is_file()
        assert "Int8" in (run_dir / "eval" / label / "server.log").read_text() or label == "baseline"
    assert summary["gate"]["status"] == "inconclusive"

    # The demo has no hub.repo_id: a loud dry run that writes what would have been committed.
    publish_dir = run_dir / "publish"
    assert summary["publish"]["dry_run"] is True and summary["publish"]["commit_sha"] is None
    assert "nothing was published" in (publish_dir / "DRY_RUN.md").read_text()
    assert "base_model_relation: quantized" in (publish_dir / "README.md").read_text()

    # ...and the embedded default rolls the verified W8A8 checkpoint out locally: the stable
    # endpoint serves it under the demo's model name, after the 64 x 64 load test passed.
    rollout = summary["rollout"]
    assert rollout["deployed"]["release"]["checkpoint"] == str(ckpt.resolve())
    assert served["id"] == "requant-w8a8" and served["root"] == str(ckpt.resolve())
    assert answer["choices"][0]["message"]["content"]
    assert rollout["deployed"]["verification"]["load"]["errors"] == 0
    assert rollout["production_marker_moved"] is False  # a dry run has no Hub marker
