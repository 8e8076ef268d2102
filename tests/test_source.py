from __future__ import annotations

import pytest

from requant.errors import SettingsError
from requant.settings import SourceSettings
from requant.source import resolve_source_files


def test_local_model_is_hashed_and_has_no_revision(tiny_model):
    src = resolve_source_files(SourceSettings(model=str(tiny_model)), with_weights=True)
    assert src.revision is None and src.is_local
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(src.files)
    assert all(len(h) == 64 for h in src.files.values())
    meta = resolve_source_files(SourceSettings(model=str(tiny_model)), with_weights=False)
    assert "model.safetensors" not in meta.files  # weights are fetched only when quantizing


def test_path_that_is_neither_a_directory_nor_a_hub_id_names_the_field(tmp_path):
    with pytest.raises(SettingsError, match=r"source\.model: .* neither an existing local directory"):
        resolve_source_files(SourceSettings(model=str(tmp_path / "no" / "such" / "dir")),
                             with_weights=False)


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(SettingsError, match=r"source\.model: .* has no config\.json"):
        resolve_source_files(SourceSettings(model=str(tmp_path)), with_weights=False)


def test_revision_for_a_local_directory_is_refused(tiny_model):
    with pytest.raises(SettingsError, match=r"source\.revision: .* Hub ids only"):
        resolve_source_files(SourceSettings(model=str(tiny_model), revision="main"),
                             with_weights=False)


def test_unreachable_hub_is_a_settings_error_not_a_traceback(monkeypatch):
    # Nothing listens on this port: the client cannot reach "the Hub".
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SettingsError, match=r"source\.model: .*(cannot reach the Hub|not in the local Hub cache)"):
        resolve_source_files(SourceSettings(model="meta-llama/Meta-Llama-3-8B-Instruct"),
                             with_weights=False)
