from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from requant.errors import SettingsError
from requant.quantization.hardware import Accelerator, check_scheme_supported
from requant.quantization.recipes import preset_recipe, resolve_recipe
from requant.settings import QuantizationSettings

ROOT = Path(__file__).resolve().parents[1]
CPU = Accelerator("cpu", "x86")
H100 = Accelerator("cuda", "NVIDIA H100", (9, 0))
A100 = Accelerator("cuda", "NVIDIA A100", (8, 0))
B200 = Accelerator("cuda", "NVIDIA B200", (10, 0))


def test_default_preset_is_smoothquant_08_then_gptq_w8a8_ignoring_lm_head():
    mods = preset_recipe(QuantizationSettings())["quant_stage"]["quant_modifiers"]
    assert list(mods) == ["SmoothQuantModifier", "GPTQModifier"]
    assert mods["SmoothQuantModifier"]["smoothing_strength"] == 0.8
    assert mods["GPTQModifier"] == {"targets": ["Linear"], "scheme": "W8A8",
                                    "ignore": ["lm_head"], "dampening_frac": 0.01}
    resolved = resolve_recipe(QuantizationSettings())
    assert resolved.scheme == "W8A8" and resolved.needs_calibration_data
    assert resolved.origin == "preset:w8a8-int8"
    assert resolved.ignore == ("lm_head",)


def test_fp8_preset_is_data_free():
    resolved = resolve_recipe(QuantizationSettings(preset="fp8-dynamic"))
    assert resolved.scheme == "FP8_DYNAMIC"
    assert not resolved.needs_calibration_data


def test_shipped_recipe_file_equals_the_default_preset():
    from_file = resolve_recipe(QuantizationSettings(
        recipe=ROOT / "deployments" / "recipes" / "w8a8-smoothquant-gptq.yaml"))
    assert from_file.sha256 == resolve_recipe(QuantizationSettings()).sha256
    assert from_file.origin.endswith("w8a8-smoothquant-gptq.yaml")


def test_recipe_hash_follows_content_not_formatting(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    data = preset_recipe(QuantizationSettings())
    a.write_text(yaml.safe_dump(data))
    b.write_text("# comment\n" + yaml.safe_dump(data, default_flow_style=True, indent=4))
    ha = resolve_recipe(QuantizationSettings(recipe=a)).sha256
    assert ha == resolve_recipe(QuantizationSettings(recipe=b)).sha256
    data["quant_stage"]["quant_modifiers"]["SmoothQuantModifier"]["smoothing_strength"] = 0.5
    a.write_text(yaml.safe_dump(data))
    assert resolve_recipe(QuantizationSettings(recipe=a)).sha256 != ha


def test_missing_recipe_file_names_field_and_fix(tmp_path):
    with pytest.raises(SettingsError, match=r"quantization\.recipe: .* not found.*preset"):
        resolve_recipe(QuantizationSettings(recipe=tmp_path / "missing.yaml"))


@pytest.mark.parametrize("text", ["a: [unclosed", "- just\n- a list\n"])
def test_unreadable_recipe_is_rejected(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=r"quantization\.recipe"):
        resolve_recipe(QuantizationSettings(recipe=path))


@pytest.mark.parametrize("text", [
    "HF_TOKEN: hf_SECRETvalue123: oops\n",  # not YAML: PyYAML's message quotes this line
    "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: hf_SECRETvalue123\n",
])
def test_a_recipe_error_never_quotes_the_files_contents(tmp_path, text):
    """The recipe path is a run parameter: pointed at a secrets file, the error (which reaches
    the run's logs and its traceback) says what is wrong and where, not what the file holds."""
    path = tmp_path / "secrets.env"
    path.write_text(text)
    with pytest.raises(SettingsError) as err:
        resolve_recipe(QuantizationSettings(recipe=path))
    assert "hf_SECRETvalue123" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert str(err.value).startswith("quantization.recipe: ")


def test_unknown_modifier_is_rejected_by_llmcompressor_before_any_work(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifer:\n      scheme: W8A8\n")
    with pytest.raises(SettingsError, match="llm-compressor cannot read"):
        resolve_recipe(QuantizationSettings(recipe=path))


def test_recipe_whose_stages_llmcompressor_would_skip_is_rejected(tmp_path):
    # llm-compressor silently ignores stage keys without the _stage suffix: nothing would run.
    path = tmp_path / "skipped.yaml"
    path.write_text("stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W8A8\n")
    with pytest.raises(SettingsError, match="must end in '_stage'"):
        resolve_recipe(QuantizationSettings(recipe=path))


@pytest.mark.parametrize("acc", [CPU, H100, A100], ids=lambda a: a.name)
def test_int8_w8a8_is_servable_on_cpu_ampere_and_hopper(acc):
    check_scheme_supported("W8A8", acc)


def test_int8_on_blackwell_is_refused_and_suggests_fp8():
    with pytest.raises(SettingsError, match="preset=fp8-dynamic"):
        check_scheme_supported("W8A8", B200)


@pytest.mark.parametrize("acc", [CPU, A100], ids=lambda a: a.name)
def test_fp8_is_refused_without_capability_89(acc):
    with pytest.raises(SettingsError, match=r"compute capability >= 8\.9"):
        check_scheme_supported("FP8_DYNAMIC", acc)


def test_fp8_is_servable_on_hopper_and_blackwell():
    check_scheme_supported("FP8_DYNAMIC", H100)
    check_scheme_supported("FP8_DYNAMIC", B200)


def test_a_preset_is_a_row_of_the_table_rendered_with_the_runs_settings_never_the_table_itself():
    from requant.schemes import PRESETS, SCHEMES, render_preset

    q = QuantizationSettings(ignore=["lm_head", "re:.*gate"], smoothing_strength=0.5)
    rendered = render_preset("w8a8-int8", q)["quant_stage"]["quant_modifiers"]
    assert rendered["SmoothQuantModifier"] == {"smoothing_strength": 0.5}
    assert rendered["GPTQModifier"]["ignore"] == ["lm_head", "re:.*gate"]
    rendered["GPTQModifier"]["targets"].append("Embedding")  # a caller's change stays its own
    assert PRESETS["w8a8-int8"].modifiers["GPTQModifier"]["targets"] == ["Linear"]
    # every preset names a scheme the verification knows, and the settings offer every preset
    assert {p.scheme for p in PRESETS.values()} <= set(SCHEMES)
    assert set(QuantizationSettings.model_json_schema()["properties"]["preset"]["enum"]) == \
        set(PRESETS)
