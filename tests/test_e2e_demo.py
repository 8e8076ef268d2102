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


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    """Shared by this module's runs: the baseline is evaluated once, then comes from the cache
    (as on a nightly run), since both runs evaluate the same source the same way."""
    return tmp_path_factory.mktemp("demo-cache")


def demo_settings(tmp_path: Path, cache: Path, *overrides: str):
    return load_settings(ROOT / "deployments" / "configs" / "demo.yaml", [
        f"output_dir={tmp_path / 'runs'}", f"cache_dir={cache}",
        # CI's share of the demo: gsm8k (evaluated, not gated) on 20 questions, the cloze rule on
        # half its questions (the demo asks all 1302: docs/evaluation.md has that real run)
        "evaluation.task_limits={gsm8k_local: 20, gsm8k_cloze_local: 652}",
        f"rollout.state_dir={tmp_path / 'state'}", *overrides])


def test_demo_config_quantizes_smollm2_passes_the_gate_for_real_and_serves_it(
        tmp_path, monkeypatch, demo_cache):
    from requant.flows.requantize import requantize

    monkeypatch.chdir(ROOT)  # the demo config's paths are relative to the project root
    port = free_port()
    settings = demo_settings(tmp_path, demo_cache, f"rollout.local.port={port}")
    assert settings.gate.allow_inconclusive is False
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

    # baseline (first, before quantization) -> quantize -> candidate, staged -> gate: a real
    # PASS on the cloze rule, without allow_inconclusive; gsm8k (0 for this model) still runs.
    run_dir = Path(summary["run_dir"])
    gate = json.loads((run_dir / "gate" / "decision.json").read_text())
    assert (gate["status"], gate["promote"]) == ("pass", True), gate["reasons"]
    (rule,) = gate["rules"]
    assert (rule["task"], rule["metric"], rule["status"]) == ("gsm8k_cloze_local", "acc,none",
                                                              "pass")
    assert rule["baseline_score"] > 0.4 and rule["interval"]["low"] > -rule["delta"]
    assert rule["total"] == 652 and gate["questions"] <= 652
    assert gate["baseline"]["questions"]["gsm8k_cloze_local|acc,none"] == 652
    assert "gsm8k_local|exact_match,strict-match" in gate["candidate"]["questions"]
    for label in ("baseline", "candidate"):
        assert (run_dir / "eval" / label / "samples_gsm8k_cloze_local.jsonl").is_file()
        assert "Int8" in (run_dir / "eval" / label / "server.log").read_text() or label == "baseline"
    assert summary["gate"]["status"] == "pass"
    assert summary["timings_s"]["evaluate_baseline"] > 0  # evaluated before quantization

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


def test_a_planted_broken_candidate_fails_the_gate_and_nothing_is_published_or_served(
        tmp_path, monkeypatch, demo_cache):
    """SmoothQuant with crossed (norm -> Linears) mappings: a well-formed W8A8 checkpoint that
    vLLM serves, whose model computes a different function. The exactness check stops it
    first; let through on purpose (a tolerance of 10), only the gate can tell."""
    from requant.errors import GateFailed, SmoothingNotExact
    from requant.flows.requantize import requantize

    monkeypatch.chdir(ROOT)
    args = ["quantization.recipe=tests/data/broken-smoothing-recipe.yaml",
            "calibration.num_samples=16", "calibration.max_seq_len=256",
            "rollout.local.port=1"]  # nothing may ever listen there
    with pytest.raises(SmoothingNotExact, match=r"Mapping at fault: \.\*input_layernorm"):
        requantize(demo_settings(tmp_path / "checked", demo_cache, *args))
    assert not list((tmp_path / "checked" / "runs").glob("*/checkpoint"))
    settings = demo_settings(tmp_path, demo_cache, *args, "quantization.smoothing_tolerance=10")
    with pytest.raises(GateFailed) as err:
        requantize(settings)
    decision = err.value.decision
    assert (decision.status, decision.promote) == ("fail", False)
    (rule,) = decision.rules
    assert rule.status == "fail" and rule.interval["high"] < -rule.delta
    assert decision.questions < decision.total  # so clear that the candidate stopped early
    (run_dir,) = (tmp_path / "runs").iterdir()
    recorded = json.loads((run_dir / "gate" / "decision.json").read_text())
    assert recorded["status"] == "fail" and recorded["stopped_early"] is True
    assert recorded["baseline"]["cached"] is True  # the first test's baseline, reused
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["verification"]["ok"] is True  # the format checks cannot see it
    assert summary["publish"] is None and summary["rollout"] is None
    assert not (run_dir / "publish").exists() and not (tmp_path / "state").exists()
