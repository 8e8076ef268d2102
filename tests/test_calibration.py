from __future__ import annotations

import json

import pytest

from requant.calibration import build_calibration_set, load_prepared
from requant.errors import SettingsError
from requant.settings import CalibrationSettings, SourceSettings
from requant.source import resolve_source_files
from tests.conftest import write_jsonl


def source(model_dir):
    return resolve_source_files(SourceSettings(model=str(model_dir)), with_weights=False)


def build(cfg, model_dir, cache):
    return build_calibration_set(cfg, source(model_dir), cache)


def test_chat_rows_use_the_models_chat_template_without_a_second_bos(tiny_model, chat_file, tmp_path):
    from transformers import AutoTokenizer

    cfg = CalibrationSettings(dataset=str(chat_file), num_samples=5, max_seq_len=512)
    calib = build(cfg, tiny_model, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    first = load_prepared(calib)[0]["input_ids"]
    text = tok.decode(first)
    assert calib.row_format == "chat"
    assert text.startswith("<|im_start|>user\n")
    assert "<|im_end|>" in text
    assert first[0] != tok.bos_token_id  # template text is not prefixed with another BOS


def test_text_rows_use_the_named_column_and_get_a_bos(tiny_model, text_file, tmp_path):
    from transformers import AutoTokenizer

    cfg = CalibrationSettings(dataset=str(text_file), text_column="body", num_samples=5)
    calib = build(cfg, tiny_model, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert calib.row_format == "text"
    assert load_prepared(calib)[0]["input_ids"][0] == tok.bos_token_id


def test_samples_are_truncated_not_padded_and_stats_add_up(tiny_model, chat_file, tmp_path):
    cfg = CalibrationSettings(dataset=str(chat_file), num_samples=20, max_seq_len=64)
    calib = build(cfg, tiny_model, tmp_path)
    rows = load_prepared(calib)
    lengths = [len(r["input_ids"]) for r in rows]
    assert max(lengths) == 64
    assert all(sum(r["attention_mask"]) == len(r["input_ids"]) for r in rows)
    s = calib.stats
    assert (s.samples, s.total_tokens, s.max_len, s.padding_tokens) == (20, sum(lengths), 64, 0)
    assert s.truncated == sum(1 for n in lengths if n == 64)
    assert s.min_len <= s.p50_len <= s.p90_len <= s.p99_len <= s.max_len


def test_pad_to_max_length_pads_every_sample_and_counts_the_padding(tiny_model, text_file, tmp_path):
    cfg = CalibrationSettings(dataset=str(text_file), text_column="body", num_samples=10,
                              max_seq_len=256, pad_to_max_length=True)
    calib = build(cfg, tiny_model, tmp_path)
    rows = load_prepared(calib)
    assert {len(r["input_ids"]) for r in rows} == {256}
    real = sum(sum(r["attention_mask"]) for r in rows)
    assert calib.stats.padding_tokens == 10 * 256 - real > 0


def test_seeded_shuffle_draws_the_same_samples_and_another_seed_others(tiny_model, chat_file, tmp_path):
    def first_ids(seed, cache):
        cfg = CalibrationSettings(dataset=str(chat_file), num_samples=8, seed=seed)
        return [r["input_ids"] for r in load_prepared(build(cfg, tiny_model, tmp_path / cache))]

    assert first_ids(1, "a") == first_ids(1, "b")
    assert first_ids(1, "a") != first_ids(2, "c")


def test_same_inputs_reuse_the_cache_and_changed_inputs_do_not(tiny_model, chat_file, tmp_path):
    cfg = CalibrationSettings(dataset=str(chat_file), num_samples=8)
    first = build(cfg, tiny_model, tmp_path)
    again = build(cfg, tiny_model, tmp_path)
    assert (first.reused, again.reused) == (False, True)
    assert first.fingerprint == again.fingerprint
    other_params = build(cfg.model_copy(update={"max_seq_len": 100}), tiny_model, tmp_path)
    assert other_params.fingerprint != first.fingerprint and not other_params.reused
    with chat_file.open("a") as fh:  # same file name, different bytes
        fh.write(json.dumps({"messages": [{"role": "user", "content": "new row"}]}) + "\n")
    assert build(cfg, tiny_model, tmp_path).fingerprint != first.fingerprint


def test_parquet_files_are_read(tiny_model, tmp_path):
    import pandas as pd

    path = tmp_path / "rows.parquet"
    pd.DataFrame({"text": [f"row number {i} has some words" for i in range(12)]}).to_parquet(path)
    calib = build(CalibrationSettings(dataset=str(path), num_samples=12), tiny_model, tmp_path)
    assert calib.stats.samples == 12


# ---- bad input: a clear error naming the field, before any model weights are read ----------


def test_more_samples_than_rows_says_how_many_there_are(tiny_model, chat_file, tmp_path):
    cfg = CalibrationSettings(dataset=str(chat_file), num_samples=41)
    with pytest.raises(SettingsError, match=r"calibration\.num_samples: 41 .* only 40 rows.*at most 40"):
        build(cfg, tiny_model, tmp_path)


def test_missing_file_names_the_field(tiny_model, tmp_path):
    cfg = CalibrationSettings(dataset=str(tmp_path / "nope.jsonl"))
    with pytest.raises(SettingsError, match=r"calibration\.dataset: file .* not found"):
        build(cfg, tiny_model, tmp_path)


def test_unsupported_extension_is_rejected(tiny_model, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(SettingsError, match="unsupported extension"):
        build(CalibrationSettings(dataset=str(path)), tiny_model, tmp_path)


def test_missing_column_lists_the_columns_there_are(tiny_model, text_file, tmp_path):
    cfg = CalibrationSettings(dataset=str(text_file), num_samples=4)  # text_column "text" absent
    with pytest.raises(SettingsError, match=r"calibration\.text_column: .*\['body', 'id'\]"):
        build(cfg, tiny_model, tmp_path)


def test_base_model_refuses_chat_rows_naming_the_text_column_and_calibrates_on_text(
        tiny_model_without_chat_template, chat_file, text_file, tmp_path):
    cfg = CalibrationSettings(dataset=str(chat_file), num_samples=4)
    with pytest.raises(SettingsError, match=r"no chat template\. Use a text column "
                       r"\(calibration\.text_column\)"):
        build(cfg, tiny_model_without_chat_template, tmp_path)
    text = CalibrationSettings(dataset=str(text_file), text_column="body", num_samples=4)
    assert build(text, tiny_model_without_chat_template, tmp_path / "text").stats.samples == 4


def test_unknown_hub_dataset_is_a_settings_error(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = CalibrationSettings(dataset="no-such-org/no-such-dataset", num_samples=4)
    with pytest.raises(SettingsError, match=r"calibration\.dataset: cannot load Hub dataset"):
        build(cfg, tiny_model, tmp_path)


def test_empty_rows_are_skipped_and_counted(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "some.jsonl", [{"text": ""}, {"text": "  "}, {"text": "a b c"}])
    calib = build(CalibrationSettings(dataset=str(path), num_samples=3), tiny_model, tmp_path)
    assert (calib.stats.samples, calib.stats.skipped_empty) == (1, 2)


def test_all_empty_rows_are_an_error_naming_the_columns(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(SettingsError, match=r"every drawn sample is empty.*text_column"):
        build(CalibrationSettings(dataset=str(path), num_samples=2), tiny_model, tmp_path)


def test_the_calibration_task_in_a_flow_that_logs_prints_logs_no_bytecode(
        prefect_server, tiny_model, chat_file, tmp_path):
    """The flows log prints; datasets' fingerprinting (dill) disassembles functions into a
    captured stdout, which Prefect's print patch would send to the run log instead. The task,
    as the flow runs it on a real Prefect server, logs its own summary and no bytecode."""
    import asyncio
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.runtime import flow_run

    from requant.tasks.calibration import prepare_calibration

    @flow(log_prints=True)  # as flows/requantize.py
    def calibrate_as_the_flow_does() -> str:
        cfg = CalibrationSettings(dataset=str(chat_file), num_samples=5, max_seq_len=512)
        prepare_calibration(cfg, source(tiny_model), tmp_path / "cache", tmp_path / "out")
        return flow_run.id

    run_id = calibrate_as_the_flow_does()

    async def run_log() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return [entry.message for entry in logs]

    # logs reach the server in batches, in the background: wait for ours, with a deadline
    deadline = time.monotonic() + 60
    messages = asyncio.run(run_log())
    while not any(m.startswith("calibration set ") for m in messages):
        assert time.monotonic() < deadline, f"the task's summary never reached the server: {messages}"
        time.sleep(0.5)
        messages = asyncio.run(run_log())
    assert not [m for m in messages if "LOAD_GLOBAL" in m or " RESUME " in m], messages
