"""What the gate does that no other test held (#37 §6): each test here fails if its behaviour is
changed, through the functions the flow calls (``decide``, ``evaluate_baseline_cached``,
``evaluate_candidate_gated``, the records' keys). The staged tests run lm-eval against the
stand-in server (tests/standin_vllm.py), whose answers are decided per question, so the
baseline's and the candidate's scores are known and the stages each one answered can be
counted from the server's own logs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from requant.errors import EvaluationStalled
from requant.evaluation.gate import EvidenceRecord, comparability_problems, decide
from requant.evaluation.lmeval import (
    ModelEvaluation,
    baseline_cache_key,
    evaluated_with,
    prompt_hashes,
    tokenizer_fingerprint,
)
from requant.evaluation.sequential import recovery_test
from requant.evaluation.staged import (
    EvalJob,
    evaluate_baseline_cached,
    evaluate_candidate_gated,
)
from requant.settings import EvaluationSettings, GateRule, GateSettings, ServerSettings
from tests.conftest import ROOT
from tests.standin_vllm import standin_python

KEY = "t|acc,none"


def evidence(pairs: list[tuple[float, float]], with_: dict | None = None,
             prompts: dict | None = None) -> tuple[EvidenceRecord, EvidenceRecord]:
    base = {i: b for i, (b, _) in enumerate(pairs)}
    cand = {i: c for i, (_, c) in enumerate(pairs)}
    return (EvidenceRecord({KEY: base}, with_ or {}, {"t": len(pairs)}, prompts or {}),
            EvidenceRecord({KEY: cand}, with_ or {}, {"t": len(pairs)}, prompts or {}))


GATE = GateSettings(rules=[GateRule(task="t", metric="acc,none", min_recovery=0.95,
                                    min_baseline=0.0)], looks=[0.5, 1.0])


def test_a_rule_fails_only_beyond_the_mirror_image_of_the_pass_boundary():
    """FAIL below -z and nowhere above it: a statistic at -0.75 z asks for more questions, one
    at -1.25 z fails (halving the FAIL boundary would fail the first)."""
    pairs = [(1.0, 1.0)] * 60 + [(1.0, 0.0)] * 12 + [(0.0, 1.0)] * 4 + [(0.0, 0.0)] * 24
    base, cand = evidence(pairs)
    stat = recovery_test([b for b, _ in pairs], [c for _, c in pairs], 0.95, 1.0).statistic
    assert stat < 0
    undecided = decide(base, cand, GATE, look=1, looks=2, z=-stat / 0.75)
    failed = decide(base, cand, GATE, look=1, looks=2, z=-stat / 1.25)
    assert undecided.status == "continue", undecided.reasons
    assert failed.status == "fail" and not failed.promote, failed.reasons


def test_evaluated_with_is_compared_on_the_keys_of_both_sides():
    """A setting only the candidate's record names makes the two records not comparable."""
    pairs = [(1.0, 1.0)] * 50
    base, _ = evidence(pairs, with_={"a": 1})
    _, cand = evidence(pairs, with_={"a": 1, "server_flags": {"enforce_eager": True}})
    problems = comparability_problems(base, cand, GATE.rules)
    assert any("server_flags" in p for p in problems), problems
    assert decide(base, cand, GATE, look=2, looks=2, z=1.0).status == "fail"


def test_a_question_the_baseline_has_no_prompt_hash_for_is_refused():
    pairs = [(1.0, 1.0)] * 10
    hashes = {d: f"doc{d}/prompt{d}" for d in range(10)}
    base, cand = evidence(pairs)
    base = EvidenceRecord(base.per_doc, {}, base.totals, {"t": {d: h for d, h in hashes.items()
                                                                if d != 3}})
    cand = EvidenceRecord(cand.per_doc, {}, cand.totals, {"t": hashes})
    problems = comparability_problems(base, cand, GATE.rules)
    assert any("question 3" in p for p in problems), problems


def test_the_prompt_hash_pairs_the_whole_prompt_not_only_the_document():
    """The same document asked with other few-shot examples is another question."""
    one = prompt_hashes([{"doc_id": 7, "doc_hash": "d", "prompt_hash": "fewshot-a"}])
    other = prompt_hashes([{"doc_id": 7, "doc_hash": "d", "prompt_hash": "fewshot-b"}])
    assert one[7] != other[7]


def test_the_baseline_cache_key_follows_the_sources_identity_model_revision_and_files():
    with_ = {"x": 1}
    src = {"model": "org/m", "revision": "a" * 40, "files": None}
    key = baseline_cache_key(src, with_)
    assert baseline_cache_key(dict(src), with_) == key
    for changed in ({"model": "org/other"}, {"revision": "b" * 40},
                    {"files": {"model.safetensors": "aa"}}):
        assert baseline_cache_key(src | changed, with_) != key, changed


def test_the_servers_effective_flags_are_recorded_so_a_cpu_baseline_never_meets_a_gpu_candidate(
        monkeypatch):
    """A baseline evaluated with CPU flags (eager, float32 without native bf16) is another
    evaluation than a candidate on the GPU, even on the same host and settings."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("requant.evaluation.lmeval.hardware_name",
                        lambda on_gpu: "cuda: H100" if on_gpu else "cpu: this one")
    cfg = EvaluationSettings(task_limits={}, limit=10)
    on_cpu, on_gpu = evaluated_with(cfg, GATE, False), evaluated_with(cfg, GATE, True)
    assert on_cpu["server_flags"]["enforce_eager"] is True
    assert on_gpu["server_flags"]["enforce_eager"] is False
    assert on_cpu["hardware"] != on_gpu["hardware"]
    src = {"model": "m", "revision": None, "files": {"model.safetensors": "aa"}}
    assert baseline_cache_key(src, on_cpu) != baseline_cache_key(src, on_gpu)


# ---- staged, through lm-eval and a stand-in server -------------------------------------------


@pytest.fixture
def staged(monkeypatch, tmp_path, vllm_tiny_source):
    """The evaluation settings of a two-look gate on 8 gsm8k questions (4 per stage), served by
    stand-in servers that answer as the skill says: the source right on ~90 % of questions."""
    monkeypatch.chdir(ROOT)
    skill = {"answers": str(ROOT / "data" / "gsm8k" / "test.jsonl"),
             "share": {"candidate": 0.9, "": 0.9}}
    monkeypatch.setenv("REQUANT_SERVING_PYTHON",
                       str(standin_python(tmp_path / "serving" / "bin", skill=skill)))
    cfg = EvaluationSettings(tasks=["gsm8k_local"], task_limits={}, limit=8, num_fewshot=0,
                             max_gen_toks=16, server=ServerSettings(max_model_len=512))
    gate = GateSettings(rules=[GateRule(task="gsm8k_local", min_baseline=0.0)],
                        looks=[0.5, 1.0])
    source = {"model": str(vllm_tiny_source), "revision": None, "files": {"w": "1"}}
    return cfg, gate, source, vllm_tiny_source


def questions_asked(result_dir: Path) -> Counter:
    """stage -> questions asked in it, by the evaluation's samples file (a row per question
    and filter)."""
    rows = [json.loads(line) for line in (result_dir / "samples_gsm8k_local.jsonl")
            .read_text().splitlines()]
    return Counter(stage for stage, _ in {(r["requant_stage"], r["doc_id"]) for r in rows})


def test_a_cached_baseline_short_of_the_stages_needed_is_extended_not_reused_nor_asked_again(
        staged, tmp_path):
    cfg, gate, source, model = staged
    cache = tmp_path / "cache"
    job = EvalJob(cfg, gate, False)
    first = evaluate_baseline_cached(job, source, model, cache, tmp_path / "b1", upto=1)
    assert first.stages == 1 and not first.cached
    second = evaluate_baseline_cached(job, source, model, cache, tmp_path / "b2", upto=2)
    assert second.stages == 2  # extended: a one-stage record is not enough for look 2
    assert questions_asked(tmp_path / "b2") == Counter({1: 4, 2: 4})
    # stage 1 was not asked again: its lm-eval results are the first run's, byte for byte
    results = "results_gsm8k_local_stage1.json"
    assert (tmp_path / "b2" / results).read_bytes() == (tmp_path / "b1" / results).read_bytes()
    stage1 = {d for d in first.per_doc["gsm8k_local|exact_match,strict-match"]}
    both = second.per_doc["gsm8k_local|exact_match,strict-match"]
    assert {d: both[d] for d in stage1} == first.per_doc["gsm8k_local|exact_match,strict-match"]
    # the tokenizer's fingerprint is part of what the record says it was evaluated with
    assert second.evaluated_with["tokenizer"] == tokenizer_fingerprint(model)
    third = evaluate_baseline_cached(job, source, model, cache, tmp_path / "b3", upto=2)
    assert third.cached and third.stages == 2  # now enough: reused as it is


def test_the_candidate_answers_no_stage_the_baseline_has_not(staged, tmp_path):
    """With the baseline at one stage and no way to extend it, the candidate stops after
    stage 1 whatever its look said: the gate never pairs it with questions the baseline has
    not answered."""
    cfg, gate, source, model = staged
    baseline = evaluate_baseline_cached(EvalJob(cfg, gate, False), source, model,
                                        tmp_path / "cache", tmp_path / "base", upto=1)
    candidate, decision, base_after = evaluate_candidate_gated(
        EvalJob(cfg, gate, False), baseline, model, tmp_path / "cand")
    assert candidate.stages == 1 and base_after.stages == 1
    assert questions_asked(tmp_path / "cand") == Counter({1: 4})
    assert decision.look == 1


def test_a_baseline_that_answers_no_further_stage_ends_the_candidates_loop_with_a_clear_error(
        staged, tmp_path):
    """A progress guard: if extending the baseline adds no stage, the loop would ask for it
    forever; it stops, saying which stage was asked for and what came back."""
    cfg, gate, source, model = staged
    baseline = evaluate_baseline_cached(EvalJob(cfg, gate, False), source, model,
                                        tmp_path / "cache", tmp_path / "base", upto=1)
    undecided = ModelEvaluation(baseline.label, baseline.model, baseline.per_doc,
                                baseline.totals, baseline.evaluated_with, baseline.result_dir,
                                stages=1, prompts=baseline.prompts)
    asked = []

    def no_progress(upto: int) -> ModelEvaluation:
        asked.append(upto)
        if len(asked) > 3:
            raise AssertionError("the candidate's loop asked again and again")
        return undecided

    # a gate that cannot decide at look 1 on 4 questions: the loop asks for stage 2
    with pytest.raises(EvaluationStalled, match="stage 2"):
        evaluate_candidate_gated(EvalJob(cfg, gate, False), undecided, model,
                                 tmp_path / "cand", more_baseline=no_progress)
    assert asked == [2]


def test_a_cached_baseline_asked_with_other_prompts_is_asked_again_once_not_failed_forever(
        staged, tmp_path):
    """The task's data changed since the baseline was cached (planted: the cached record's
    prompt hashes are another dataset's): the gate does not fail on the pairing, the baseline
    answers again, its cache entry is replaced, and the next run reuses the new one."""
    cfg, gate, source, model = staged
    cache = tmp_path / "cache"

    def baseline_run(out: str, refresh: bool = False, upto: int = 1) -> ModelEvaluation:
        return evaluate_baseline_cached(EvalJob(cfg, gate, False), source, model, cache,
                                        tmp_path / out, upto=upto, refresh=refresh)

    first = baseline_run("b1")
    entry = next((cache / "baseline-eval").iterdir())
    prompts = json.loads((entry / "prompts.json").read_text())
    (entry / "prompts.json").write_text(json.dumps(
        {t: {d: f"other-dataset/{h}" for d, h in v.items()} for t, v in prompts.items()}))
    stale = baseline_run("b2")
    assert stale.cached and stale.prompts != first.prompts
    refreshed = []

    def fresh(upto: int) -> ModelEvaluation:
        refreshed.append(upto)
        return baseline_run("b2", refresh=True, upto=upto)

    candidate, decision, base = evaluate_candidate_gated(
        EvalJob(cfg, gate, False), stale, model, tmp_path / "cand", fresh_baseline=fresh)
    assert refreshed == [candidate.stages]
    assert not any("different prompt" in r for r in decision.reasons), decision.reasons
    assert base.prompts == first.prompts
    assert json.loads((entry / "prompts.json").read_text()) == prompts  # the entry replaced
    # without the refresh, the same stale record fails the gate on the pairing
    _, failed, _ = evaluate_candidate_gated(EvalJob(cfg, gate, False), stale, model,
                                            tmp_path / "cand2")
    assert failed.status == "fail" and any("different prompt" in r for r in failed.reasons)
