"""Bad user input ends in an error that names the field and the fix, before any expensive work,
and a failed preflight leaves no run folder behind."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from requant.calibration import load_rows
from requant.errors import SettingsError
from requant.model_files import check_model_folder
from requant.settings import CalibrationSettings


def test_folder_with_only_config_json_names_tokenizer_and_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SettingsError) as err:
        check_model_folder(tmp_path)
    msg = str(err.value)
    assert msg.startswith("source.model:") and "no tokenizer" in msg and "no weights" in msg
    assert "save_pretrained" in msg  # the fix


def test_truncated_safetensors_shard_is_named_before_loading(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (shard,) = model.glob("*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SettingsError, match=rf"{shard.name} is truncated"):
        check_model_folder(model)


def test_shard_listed_in_the_index_but_missing_is_named(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(SettingsError, match=r"model-00002-of-00002\.safetensors is listed"):
        check_model_folder(model)


def test_complete_model_folder_passes(tiny_model):
    check_model_folder(tiny_model)


def test_header_shorter_than_declared_is_truncation(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SettingsError, match=r"model\.safetensors is truncated"):
        check_model_folder(tmp_path)


def test_empty_calibration_file_names_the_field_and_the_expected_columns(tmp_path):
    empty = tmp_path / "calib.jsonl"
    empty.write_text("")
    with pytest.raises(SettingsError) as err:
        load_rows(CalibrationSettings(dataset=str(empty)))
    assert "calibration.dataset" in str(err.value) and "is empty" in str(err.value)
    assert "'messages'" in str(err.value)


def test_unreadable_calibration_file_gives_a_reason_not_an_empty_one(tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text("this is not json\n")
    with pytest.raises(SettingsError) as err:
        load_rows(CalibrationSettings(dataset=str(bad)))
    assert "calibration.dataset" in str(err.value) and "()" not in str(err.value)
    assert "one JSON object per line" in str(err.value)


def test_failed_preflight_leaves_no_run_folder(tmp_path, prefect_server):
    from requant.settings import PipelineSettings
    from tests.conftest import requantize

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    settings = PipelineSettings(output_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    settings.source.model = str(tmp_path / "broken")
    settings.evaluation.enabled = False
    with pytest.raises(SettingsError, match="not a complete Hugging Face model folder"):
        requantize(settings)
    assert not (tmp_path / "runs").exists()
