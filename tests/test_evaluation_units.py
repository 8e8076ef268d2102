"""Evaluation plumbing that needs no server: task resolution, scores, cache keys, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from requant.errors import SettingsError
from requant.evaluation.lmeval import (
    ModelEvaluation,
    baseline_cache_key,
    evaluated_with,
    per_doc_scores,
)
from requant.evaluation.staged import check_baseline
from requant.evaluation.task_files import render_task_dir, stage_plan, task_sizes, validate_tasks
from requant.settings import EvaluationSettings, GateRule, GateSettings, load_settings

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


def test_bundled_tasks_index_only_their_folder_and_a_built_in_name_indexes_lm_evals_too():
    from requant.evaluation.task_files import task_manager

    bundled = ["gsm8k_local", "gsm8k_cloze_local"]
    assert sorted(task_manager(TASKS, bundled).all_tasks) == sorted(bundled)
    both = set(task_manager(TASKS, ["gsm8k_local", "gsm8k"]).all_tasks)
    assert {"gsm8k_local", "gsm8k", "mmlu"} <= both


def test_unknown_task_name_is_refused_with_suggestions(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SettingsError, match=r"evaluation\.tasks: lm-eval has no task 'gsm8kk'.*gsm8k"):
        validate_tasks(EvaluationSettings(tasks=["gsm8kk"]))


def test_a_misspelt_per_task_override_is_refused_with_suggestions(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SettingsError, match=r"task_limits / task_fewshot: .*'gsm8k_locl'.*"
                                            r"gsm8k_local"):
        validate_tasks(EvaluationSettings(tasks=["gsm8k_local"], task_limits={"gsm8k_locl": 5}))


@pytest.mark.parametrize("override", ["evaluation.limit=0", "evaluation.num_fewshot=-1",
                                      "evaluation.tasks=[]"])
def test_bad_evaluation_settings_are_refused_naming_the_field(override):
    field = override.split("=")[0]
    with pytest.raises(SettingsError, match=field.replace(".", r"\.")):
        load_settings(None, [override])


def test_per_question_scores_are_read_for_every_metric_and_filter_lm_eval_logged():
    samples = [
        {"doc_id": 0, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0},
        {"doc_id": 0, "filter": "flexible-extract", "metrics": ["exact_match"],
         "exact_match": 0.0},
        {"doc_id": 1, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 0.0},
        {"doc_id": 2, "filter": "none", "metrics": ["acc", "acc_norm"], "acc": 1, "acc_norm": 0},
    ]
    assert per_doc_scores("t", samples) == {
        "t|exact_match,strict-match": {0: 1.0, 1: 0.0},
        "t|exact_match,flexible-extract": {0: 0.0},
        "t|acc,none": {2: 1.0}, "t|acc_norm,none": {2: 0.0}}


def test_baseline_cache_key_covers_source_and_everything_the_scores_depend_on(monkeypatch):
    monkeypatch.chdir(ROOT)
    src = {"model": "m", "revision": None, "files": {"model.safetensors": "aa"}}
    gate = GateSettings()
    with_ = evaluated_with(EvaluationSettings(task_limits={}, limit=10), gate, False)
    key = baseline_cache_key(src, with_)
    assert {"task_files", "num_fewshot", "limits", "max_gen_toks", "add_bos_token", "server",
            "lm_eval", "vllm", "looks", "order_seed", "tasks", "backend",
            "cpu_native_bf16"} <= set(with_)
    assert with_["vllm"].startswith("0.32.0")  # the serving environment's vLLM, asked there
    assert baseline_cache_key(dict(src), evaluated_with(EvaluationSettings(task_limits={}, limit=10), gate, False)) == key
    assert baseline_cache_key(src | {"files": {"model.safetensors": "bb"}}, with_) != key
    for changed in (EvaluationSettings(task_limits={}, limit=11), EvaluationSettings(task_limits={}, limit=10, num_fewshot=3),
                    EvaluationSettings(task_limits={}, limit=10, add_bos_token=False),
                    EvaluationSettings.model_validate({"limit": 10, "task_limits": {},
                                                       "server": {"max_model_len": 1024}})):
        assert baseline_cache_key(src, evaluated_with(changed, gate, False)) != key, changed
    assert baseline_cache_key(src, evaluated_with(
        EvaluationSettings(task_limits={}, limit=10), GateSettings(looks=[0.25, 1.0]),
        False)) != key
    for changed_env in ({"VLLM_BATCH_INVARIANT": "1"}, {}):  # server env, not only flags
        other = EvaluationSettings.model_validate({"limit": 10, "task_limits": {},
                                                   "server": {"env": changed_env}})
        assert baseline_cache_key(src, evaluated_with(other, gate, False)) != key
    assert {"server_env", "hardware", "transformers", "datasets"} <= set(with_)


def test_stage_plan_partitions_each_task_in_its_seeded_order():
    plan = stage_plan({"a": 10, "b": 3}, [0.25, 0.5, 0.75, 1.0], seed=7)
    assert len(plan) == 4
    for task, total in (("a", 10), ("b", 3)):
        chunks = [stage[task] for stage in plan]
        assert sorted(q for c in chunks for q in c) == list(range(total))
        assert all(c == sorted(c) for c in chunks)  # lm-eval maps doc ids in ascending order
    assert [len(s["a"]) for s in plan] == [3, 2, 3, 2]
    assert plan == stage_plan({"a": 10, "b": 3}, [0.25, 0.5, 0.75, 1.0], seed=7)


def test_task_sizes_apply_the_per_task_limit(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    cfg = EvaluationSettings(tasks=["gsm8k_local", "gsm8k_cloze_local"],
                             task_limits={"gsm8k_local": 100})
    rendered = render_task_dir(TASKS, tmp_path / "tasks")
    assert task_sizes(cfg, rendered) == {"gsm8k_local": 100, "gsm8k_cloze_local": 1302}


def evaluation(per_doc: dict) -> ModelEvaluation:
    return ModelEvaluation("baseline", "m", per_doc, {"t": 10}, {}, Path("."))


def test_a_baseline_below_min_baseline_ends_the_run_naming_the_rule_and_the_fix():
    gate = GateSettings(rules=[GateRule(task="t", metric="exact_match,strict-match",
                                        min_baseline=0.1)])
    with pytest.raises(SettingsError) as err:
        check_baseline(evaluation({"t|exact_match,strict-match": {0: 0.0, 1: 0.0}}), gate)
    assert "gate.rules.0" in str(err.value) and "before quantization" in str(err.value)
    check_baseline(evaluation({"t|exact_match,strict-match": {0: 1.0, 1: 0.0}}), gate)
    zero = GateSettings(rules=[GateRule(task="t", metric="exact_match,strict-match",
                                        min_baseline=0.0)])
    check_baseline(evaluation({"t|exact_match,strict-match": {0: 0.0}}), zero)


def test_a_rule_metric_the_task_does_not_report_is_named_with_what_it_does_report():
    gate = GateSettings(rules=[GateRule(task="t", metric="exact_match,flexible-extract")])
    with pytest.raises(SettingsError, match=r"gate\.rules\.0\.metric: t reports "
                                            r"\['exact_match,strict-match'\]"):
        check_baseline(evaluation({"t|exact_match,strict-match": {0: 1.0}}), gate)


def test_a_record_keeps_its_prompt_hashes_through_save_and_load(tmp_path):
    """The pairing proof survives the cache: a baseline read back still has its hashes."""
    from requant.evaluation.lmeval import ModelEvaluation, load_record, save_record

    record = ModelEvaluation("baseline", "m", {"t|acc,none": {3: 1.0}}, {"t": 10}, {"x": 1},
                             tmp_path, stages=1, prompts={"t": {3: "d3/p3"}})
    save_record(tmp_path, record)
    again = load_record("baseline", tmp_path, cached=True)
    assert again.prompts == {"t": {3: "d3/p3"}} and again.evidence().prompts == again.prompts


def test_a_runs_gate_record_gets_the_noise_measured_for_exactly_its_evaluation(tmp_path):
    from requant.evaluation.noise import noise_for, noise_line, noise_path, save_noise

    measured = {"measured": True, "measured_at": "2026-11-30T12:00:00+00:00", "hardware": "cpu",
                "rules": [{"task": "gsm8k_cloze_local", "metric": "acc,none", "questions": 163,
                           "flips": 0}], "evaluated_with": {"hardware": "cpu"}}
    save_noise(tmp_path, "k1", measured)
    found = noise_for(tmp_path, "k1")
    assert found["measured"] and found["rules"][0]["flips"] == 0 and "evaluated_with" not in found
    assert "gsm8k_cloze_local acc,none: 0 of 163 flipped" in noise_line(found)
    # another evaluation (other key), or a record that names another key, never applies
    assert noise_for(tmp_path, "k2")["measured"] is False
    noise_path(tmp_path, "k2").write_text(noise_path(tmp_path, "k1").read_text())
    missing = noise_for(tmp_path, "k2")
    assert missing["measured"] is False and "requant noise" in missing["measure_with"]
    assert "not measured" in noise_line(missing)


def test_a_model_whose_stages_are_all_answered_starts_no_server(tmp_path, monkeypatch):
    from requant.evaluation.staged import EvalJob, evaluate_staged
    from requant.settings import GateSettings

    monkeypatch.chdir(ROOT)
    # a server start would fail here: no serving Python
    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(tmp_path / "no-python"))
    monkeypatch.setattr("requant.evaluation.staged.tokenizer_fingerprint", lambda _: "tok")
    (tmp_path / "prior").mkdir()
    cfg = EvaluationSettings(tasks=["gsm8k_local"], limit=4)
    gate = GateSettings(rules=[GateRule(task="gsm8k_local")], looks=[0.5, 1.0])
    prior = ModelEvaluation("candidate", "m", {"gsm8k_local|exact_match,strict-match": {0: 1.0}},
                            {"gsm8k_local": 4}, {"x": 1}, tmp_path / "prior", stages=1)
    monkeypatch.setattr("requant.evaluation.staged.evaluated_with",
                        lambda cfg, gate, on_gpu: {"x": 1})
    again = evaluate_staged(EvalJob(cfg, gate, on_gpu=False), "candidate", tmp_path,
                            tmp_path / "out", upto=1, prior=prior)
    assert again.stages == 1 and again.per_doc == prior.per_doc
    assert (tmp_path / "out" / "summary.json").is_file()


def test_the_tokenizer_fingerprint_is_read_once_per_folder_state_and_follows_a_new_tokenizer(
        tiny_model, tmp_path):
    import shutil

    from requant.evaluation.lmeval import _tokenizer_fingerprint, tokenizer_fingerprint

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    first = tokenizer_fingerprint(folder)
    hits = _tokenizer_fingerprint.cache_info().hits
    assert tokenizer_fingerprint(folder) == first
    assert _tokenizer_fingerprint.cache_info().hits == hits + 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        if name == "tokenizer.json":
            data["model"]["vocab"]["zzzz-new-token"] = len(data["model"]["vocab"])
        (folder / name).write_text(json.dumps(data))
    assert tokenizer_fingerprint(folder) != first
