"""The candidate's answers kept by the bytes a server reads (requant.evaluation.candidate_cache):
what the key follows, and that a kept record is read back look by look, cut to each look's
questions, with no server started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from requant.evaluation.candidate_cache import CandidateCache, candidate_cache_key
from requant.evaluation.lmeval import ModelEvaluation, save_record
from requant.evaluation.staged import EvalJob, evaluate_candidate_gated
from requant.evaluation.task_files import stage_plan
from requant.settings import EvaluationSettings, GateRule, GateSettings

KEY = "t|acc,none"
TOTAL = 400
WITH = {"x": 1}


@pytest.fixture(autouse=True)
def no_server(monkeypatch, tmp_path):
    """Any model server start fails (no serving Python): what passes here started none."""
    monkeypatch.setenv("REQUANT_SERVING_PYTHON", str(tmp_path / "no-python"))
    monkeypatch.setattr("requant.evaluation.candidate_cache.evaluated_with",
                        lambda cfg, gate, on_gpu: WITH)
    monkeypatch.setattr("requant.evaluation.staged.tokenizer_fingerprint", lambda _: "tok")


def checkpoint(folder: Path, weights: bytes = b"w" * 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"quantization_config": {"format": "int"}}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "manifest.json").write_text('{"run": {"flow_run_id": "one"}}')
    return folder


def settings() -> tuple[EvaluationSettings, GateSettings]:
    return (EvaluationSettings(tasks=["t"], limit=TOTAL),
            GateSettings(rules=[GateRule(task="t", metric="acc,none", min_baseline=0.1)],
                         looks=[0.5, 1.0]))


def record(folder: Path, label: str, scores: dict[int, float], stages: int) -> ModelEvaluation:
    """A record as evaluate_staged leaves it: scores, lm-eval's per-stage files, samples."""
    plan = stage_plan({"t": TOTAL}, [0.5, 1.0], settings()[1].order_seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(stages):
        (folder / f"results_t_stage{k + 1}.json").write_text("{}")
        rows += [json.dumps({"doc_id": d, "requant_stage": k + 1}) for d in plan[k]["t"]]
    (folder / "samples_t.jsonl").write_text("".join(f"{r}\n" for r in rows))
    asked = {d for k in range(stages) for d in plan[k]["t"]}
    evaluation = ModelEvaluation(label, "m", {KEY: {d: s for d, s in scores.items() if d in asked}},
                                 {"t": TOTAL}, WITH | {"tokenizer": "tok"}, folder, stages=stages)
    save_record(folder, evaluation)
    return evaluation


def test_the_key_follows_the_served_bytes_not_the_manifest_that_names_the_run(tmp_path):
    cfg, gate = settings()
    one = candidate_cache_key(checkpoint(tmp_path / "a"), cfg, gate, False)
    other_run = checkpoint(tmp_path / "b")
    (other_run / "manifest.json").write_text('{"run": {"flow_run_id": "two"}}')
    (other_run / "recipe.yaml").write_text("# the recipe as it ran")
    assert candidate_cache_key(other_run, cfg, gate, False) == one
    assert candidate_cache_key(checkpoint(tmp_path / "c", b"w" * 63 + b"x"), cfg, gate, False) != one
    config_changed = checkpoint(tmp_path / "d")
    (config_changed / "config.json").write_text('{"quantization_config": {"format": "float"}}')
    assert candidate_cache_key(config_changed, cfg, gate, False) != one


def test_a_kept_two_stage_record_decides_look_1_on_look_1s_questions_only(tmp_path):
    """The boundary: the kept record answered both stages, wrong on every stage-1 question and
    right on every stage-2 one. Cut to look 1 the candidate scores 0 against a baseline of 1
    (the hard limit fails it there, on look 1's questions); read whole it would not."""
    cfg, gate = settings()
    ckpt = checkpoint(tmp_path / "ckpt")
    plan = stage_plan({"t": TOTAL}, [0.5, 1.0], gate.order_seed)
    live = record(tmp_path / "live", "candidate",
                  {d: 0.0 for d in plan[0]["t"]} | {d: 1.0 for d in plan[1]["t"]}, stages=2)
    cache = CandidateCache(tmp_path / "cache", ckpt, cfg, gate, False)
    cache.keep(live)
    baseline = record(tmp_path / "baseline", "baseline", dict.fromkeys(range(TOTAL), 1.0), 2)

    out = tmp_path / "run2" / "candidate"
    candidate, decision, _ = evaluate_candidate_gated(EvalJob(cfg, gate, False), baseline, ckpt,
                                                      out, cache_dir=tmp_path / "cache")
    assert (decision.look, decision.status) == (1, "fail")
    assert decision.questions == len(plan[0]["t"]) == TOTAL // 2
    assert candidate.cached and candidate.stages == 1
    assert set(candidate.per_doc[KEY]) == set(plan[0]["t"])
    # the folder holds what look 1 used, and says where it came from
    assert {p.name for p in out.iterdir()} >= {"results_t_stage1.json", "summary.json",
                                                 "per_doc.json", "cache.json"}
    assert not (out / "results_t_stage2.json").exists()
    stages = {json.loads(line)["requant_stage"]
              for line in (out / "samples_t.jsonl").read_text().splitlines()}
    assert stages == {1}
    mark = json.loads((out / "cache.json").read_text())
    assert (mark["key"], mark["stages"], mark["kept_stages"]) == (cache.key, 1, 2)


def test_other_served_bytes_are_evaluated_live_not_read_from_anothers_answers(tmp_path):
    cfg, gate = settings()
    plan = stage_plan({"t": TOTAL}, [0.5, 1.0], gate.order_seed)
    cache = CandidateCache(tmp_path / "cache", checkpoint(tmp_path / "kept"), cfg, gate, False)
    cache.keep(record(tmp_path / "live", "candidate", dict.fromkeys(range(TOTAL), 1.0), 2))
    baseline = record(tmp_path / "baseline", "baseline", dict.fromkeys(range(TOTAL), 1.0), 2)
    other = checkpoint(tmp_path / "other", b"v" * 64)
    with pytest.raises(Exception, match="no-python"):  # a live evaluation tried a server
        evaluate_candidate_gated(EvalJob(cfg, gate, False), baseline, other, tmp_path / "out",
                                 cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists() and len(plan) == 2


def test_a_longer_record_replaces_a_shorter_one_and_a_shorter_never_replaces_a_longer(tmp_path):
    cfg, gate = settings()
    cache = CandidateCache(tmp_path / "cache", checkpoint(tmp_path / "ckpt"), cfg, gate, False)
    scores = dict.fromkeys(range(TOTAL), 1.0)
    cache.keep(record(tmp_path / "one", "candidate", scores, 1))
    assert cache.kept().stages == 1
    cache.keep(record(tmp_path / "two", "candidate", scores, 2))
    assert cache.kept().stages == 2 and len(cache.kept().per_doc[KEY]) == TOTAL
    cache.keep(record(tmp_path / "again", "candidate", scores, 1))
    assert cache.kept().stages == 2
    assert not (cache.folder / "cache.json").exists()
