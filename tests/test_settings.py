from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from requant.errors import SettingsError
from requant.settings import DEMO_CALIBRATION_FILE, DEMO_MODEL_DIR, PipelineSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_offline_demo():
    s = PipelineSettings()
    assert s.source.model == DEMO_MODEL_DIR
    assert s.calibration.dataset == DEMO_CALIBRATION_FILE
    assert (ROOT / DEMO_CALIBRATION_FILE).is_file()
    assert s.quantization.preset == "w8a8-int8"
    assert s.quantization.smoothing_strength == 0.8
    assert s.quantization.ignore == ["lm_head"]
    assert s.calibration.pad_to_max_length is False
    demo = load_settings(ROOT / "deployments" / "configs" / "demo.yaml")
    assert s.evaluation.tasks == demo.evaluation.tasks
    assert s.evaluation.task_limits == demo.evaluation.task_limits
    assert s.evaluation.task_fewshot == demo.evaluation.task_fewshot
    assert s.gate == demo.gate and s.gate.allow_inconclusive is False


def test_yaml_file_and_dotted_overrides_merge_with_types(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"model": "org/model", "revision": "main"},
                                   "calibration": {"num_samples": 8}}))
    s = load_settings(cfg, ["calibration.max_seq_len=128", "quantization.ignore=[lm_head, 're:.*gate']"])
    assert s.source.model == "org/model"
    assert s.calibration.num_samples == 8
    assert s.calibration.max_seq_len == 128
    assert s.quantization.ignore == ["lm_head", "re:.*gate"]


def test_unknown_field_is_rejected_naming_it():
    with pytest.raises(SettingsError) as err:
        load_settings(None, ["calibration.num_sample=3"])
    assert "calibration.num_sample" in str(err.value)
    assert "spelling" in str(err.value)


@pytest.mark.parametrize("override,field", [
    ("calibration.max_seq_len=0", "calibration.max_seq_len"),
    ("calibration.max_seq_len=-5", "calibration.max_seq_len"),
    ("calibration.num_samples=0", "calibration.num_samples"),
    ("quantization.smoothing_strength=1.5", "quantization.smoothing_strength"),
    ("quantization.preset=int4", "quantization.preset"),
])
def test_out_of_range_values_name_the_field_and_the_fix(override, field):
    with pytest.raises(SettingsError) as err:
        load_settings(None, [override])
    msg = str(err.value)
    assert field in msg
    assert any(word in msg for word in ("Set a larger value", "Set a smaller value", "one of"))


def test_missing_config_file_says_so(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_override_without_equals_is_rejected():
    with pytest.raises(SettingsError, match=r"section\.field=value"):
        load_settings(None, ["calibration.num_samples"])


@pytest.mark.parametrize("config", sorted((ROOT / "deployments" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(config):
    from requant.profile import load_file

    s = load_file(config).settings
    assert isinstance(s, PipelineSettings)


def test_production_config_is_the_seed_job():
    s = load_settings(ROOT / "deployments" / "configs" / "production-llama3-8b.yaml")
    assert s.source.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert s.calibration.dataset == "HuggingFaceH4/ultrachat_200k"
    assert (s.calibration.num_samples, s.calibration.max_seq_len) == (512, 2048)
    assert s.quantization.preset == "w8a8-int8"


@pytest.mark.parametrize(("override", "field"), [
    ("evaluation.server.env={HF_TOKEN: abc123}", "evaluation.server.env.HF_TOKEN"),
    ("evaluation.server.env={MY_API_KEY: abc123}", "evaluation.server.env.MY_API_KEY"),
    ("evaluation.server.env={AWS_SECRET_ACCESS_KEY: abc}", "evaluation.server.env."
     "AWS_SECRET_ACCESS_KEY"),
    ("evaluation.server.extra_args=[--api-key, abc123]", "evaluation.server.extra_args.1"),
    ("hub.endpoint='Bearer abcdefghijkl'", "hub.endpoint"),
    ("source.revision=hf_abcdefghijklmnopqrstuvwxyz0123", "source.revision"),
])
def test_settings_that_look_like_secrets_are_refused_naming_the_field_never_the_value(
        override, field):
    with pytest.raises(SettingsError) as err:
        load_settings(None, [override])
    message = str(err.value)
    assert f"{field}: looks like a secret" in message
    assert "$HF_TOKEN or a Prefect Secret block" in message
    assert "abc123" not in message and "abcdefghijkl" not in message


def test_secret_block_names_and_ordinary_env_are_not_secrets():
    s = load_settings(None, ["hub.token_secret=requant-hf-token",
                             "evaluation.server.env={VLLM_CPU_KVCACHE_SPACE: '4', "
                             "HF_TOKEN: ''}"])
    assert s.hub.token_secret == "requant-hf-token"


def test_every_path_setting_is_absolute_after_loading_resolved_against_the_working_directory(
        tmp_path, monkeypatch):
    from requant.settings import load_settings

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # where `make demo` runs the demo config
    s = load_settings("deployments/configs/demo.yaml", ["quantization.recipe=r.yaml"])
    assert s.rollout.state_dir == root / ".cache/requant/rollout"
    assert (s.output_dir, s.cache_dir) == (root / "runs", root / ".cache/requant")
    assert s.evaluation.task_dir == root / "deployments/lm_eval_tasks"
    assert s.quantization.recipe == root / "r.yaml"
    assert s.source.model == str(root / "models/SmolLM2-135M-Instruct") \
        or not (root / "models").exists()
    assert s.calibration.dataset == str(root / "data/calibration/gsm8k-chat-1k.jsonl")
    hub = load_settings(None, ["source.model=meta-llama/Llama-3.1-8B-Instruct",
                               "calibration.dataset=HuggingFaceH4/ultrachat_200k"])
    assert hub.source.model == "meta-llama/Llama-3.1-8B-Instruct"  # a Hub id stays one
    assert hub.calibration.dataset == "HuggingFaceH4/ultrachat_200k"
    monkeypatch.chdir(tmp_path)  # resolving twice changes nothing
    assert load_settings(None, [f"rollout.state_dir={s.rollout.state_dir}"]).rollout.state_dir \
        == s.rollout.state_dir


def test_the_candidate_key_does_not_depend_on_where_the_checkout_is(tmp_path, monkeypatch):
    import shutil

    from requant.ledger import candidate_key
    from requant.settings import load_settings

    root = Path(__file__).resolve().parents[1]
    keys = []
    for where in ("a", "b"):
        copy = tmp_path / where
        shutil.copytree(root / "deployments", copy / "deployments")
        monkeypatch.chdir(copy)
        s = load_settings("deployments/configs/demo.yaml")
        keys.append(candidate_key(s, {"model.safetensors": "0" * 64}, None, "f" * 64, "c"))
    assert keys[0] == keys[1]


def test_a_path_supervisord_cannot_hold_is_refused_naming_the_setting(tmp_path):
    from requant.errors import SettingsError
    from requant.serving.supervision import router_command, write_config

    folder = tmp_path / "line\nbreak"
    folder.mkdir()
    with pytest.raises(SettingsError, match=r"(?s)rollout\.state_dir: .* line break"):
        write_config(folder, router_command("127.0.0.1", 8000, folder))
