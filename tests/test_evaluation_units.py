"""Evaluation plumbing that needs no server: task resolution, scores, cache keys, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from requant.errors import SettingsError
from requant.evaluation.lmeval import (
    baseline_cache_key,
    extract_scores,
    per_doc_scores,
    render_task_dir,
    validate_tasks,
)
from requant.settings import EvaluationSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "deployments" / "lm_eval_tasks"


def test_bundled_task_dir_resolves_data_files_to_the_shipped_gsm8k(tmp_path):
    out = render_task_dir(TASKS, tmp_path / "tasks")
    doc = yaml.safe_load((out / "gsm8k_local.yaml").read_text())
    files = doc["dataset_kwargs"]["data_files"]
    assert Path(files["test"]) == (ROOT / "data" / "gsm8k" / "test.jsonl").resolve()
    assert Path(files["train"]).is_file()
    assert doc["dataset_path"] == "json"


def test_bundled_task_mirrors_lm_evals_gsm8k_prompt_metric_and_filters():
    import lm_eval

    ours = yaml.safe_load((TASKS / "gsm8k_local.yaml").read_text())
    theirs = yaml.safe_load(
        (Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    for key in ("doc_to_text", "doc_to_target", "metric_list", "filter_list",
                "generation_kwargs", "num_fewshot", "output_type"):
        assert ours[key] == theirs[key], key


def test_known_tasks_pass_validation(monkeypatch):
    monkeypatch.chdir(ROOT)
    validate_tasks(EvaluationSettings(tasks=["gsm8k_local", "gsm8k"]))


def test_unknown_task_name_is_refused_with_suggestions(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SettingsError, match=r"evaluation\.tasks: lm-eval has no task 'gsm8kk'.*gsm8k"):
        validate_tasks(EvaluationSettings(tasks=["gsm8kk"]))


def test_gate_task_must_be_one_of_the_tasks(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SettingsError, match=r"evaluation\.gate_task"):
        validate_tasks(EvaluationSettings(tasks=["gsm8k_local"], gate_task="gsm8k"))


@pytest.mark.parametrize("override", ["evaluation.limit=0", "evaluation.num_fewshot=-1",
                                      "evaluation.tasks=[]", "evaluation.gate_metric=exact_match"])
def test_bad_evaluation_settings_are_refused_naming_the_field(override):
    field = override.split("=")[0]
    with pytest.raises(SettingsError, match=field.replace(".", r"\.")):
        load_settings(None, [override])


def test_scores_and_per_document_results_are_read_from_lm_eval_output():
    results = {"results": {"gsm8k_local": {
        "alias": "gsm8k_local", "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": 0.5}}}
    assert extract_scores(results) == {"gsm8k_local": {"exact_match,strict-match": 0.25,
                                                       "exact_match,flexible-extract": 0.5}}
    samples = [
        {"doc_id": 0, "filter": "strict-match", "exact_match": 1.0},
        {"doc_id": 0, "filter": "flexible-extract", "exact_match": 0.0},
        {"doc_id": 1, "filter": "strict-match", "exact_match": 0.0},
    ]
    assert per_doc_scores(samples, "exact_match,strict-match") == {0: 1.0, 1: 0.0}
    assert per_doc_scores(samples, "exact_match,flexible-extract") == {0: 0.0}


def test_baseline_cache_key_follows_source_and_task_config(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    src = {"model": "m", "revision": None, "files": {"model.safetensors": "aa"}}
    cfg = EvaluationSettings(limit=10)
    key = baseline_cache_key(src, cfg)
    assert baseline_cache_key(dict(src), EvaluationSettings(limit=10)) == key
    assert baseline_cache_key(src | {"files": {"model.safetensors": "bb"}}, cfg) != key
    assert baseline_cache_key(src, EvaluationSettings(limit=11)) != key
    assert baseline_cache_key(src, EvaluationSettings(limit=10, num_fewshot=3)) != key
    assert baseline_cache_key(src, EvaluationSettings(limit=10, add_bos_token=False)) != key
    # Editing the task's data changes the key too.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    (tasks / "t.yaml").write_text(yaml.safe_dump(
        {"task": "t", "dataset_kwargs": {"data_files": {"test": "../test.jsonl"}}}))
    k1 = baseline_cache_key(src, EvaluationSettings(task_dir=tasks))
    data.write_text(json.dumps({"question": "q2", "answer": "#### 2"}) + "\n")
    assert baseline_cache_key(src, EvaluationSettings(task_dir=tasks)) != k1
