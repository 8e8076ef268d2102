from __future__ import annotations

import pytest

from requant.evaluation.gate import (
    Scores,
    decide,
    mcnemar_exact_p,
    paired_comparison,
    render_decision,
)
from requant.settings import GateSettings


def scores(correct: list[int]) -> Scores:
    return Scores(sum(correct) / len(correct), dict(enumerate(map(float, correct))))


def run(base, cand, **gate):
    return decide(scores(base), scores(cand), GateSettings(**gate), task="gsm8k",
                  metric="exact_match,strict-match")


def test_recovery_at_threshold_passes_and_promotes():
    base = [1] * 50 + [0] * 50  # 0.50
    cand = [1] * 49 + [0] * 51  # 0.49 -> recovery 0.98
    d = run(base, cand, min_recovery=0.98)
    assert (d.status, d.promote) == ("pass", True)
    assert d.recovery == pytest.approx(0.98)
    assert any("recovery 0.9800 >= gate.min_recovery 0.98" in r for r in d.reasons)


def test_recovery_below_threshold_fails_with_the_numbers():
    d = run([1] * 50 + [0] * 50, [1] * 48 + [0] * 52, min_recovery=0.98)
    assert (d.status, d.promote) == ("fail", False)
    assert any("recovery 0.9600 < gate.min_recovery 0.98" in r for r in d.reasons)


def test_absolute_floor_fails_a_candidate_that_recovers_but_scores_low():
    d = run([1] * 20 + [0] * 80, [1] * 20 + [0] * 80, min_candidate_score=0.3)
    assert d.status == "fail"
    assert any("candidate 0.2000 < gate.min_candidate_score 0.3" in r for r in d.reasons)


def test_near_zero_baseline_is_inconclusive_and_fails_closed():
    d = run([1] * 2 + [0] * 98, [0] * 100, min_baseline=0.1)
    assert (d.status, d.promote) == ("inconclusive", False)
    assert any("below gate.min_baseline" in r for r in d.reasons)
    assert any("fails closed" in r for r in d.reasons)


def test_zero_baseline_does_not_divide_by_zero():
    d = run([0] * 10, [1] + [0] * 9, min_baseline=0.1)
    assert d.recovery is None and d.status == "inconclusive"
    assert "n/a" in render_decision(d)


def test_inconclusive_promotes_only_when_settings_allow_it():
    d = run([0] * 10, [0] * 10, allow_inconclusive=True)
    assert (d.status, d.promote) == ("inconclusive", True)
    assert any("allow_inconclusive=true" in r for r in d.reasons)


def test_different_document_sets_are_inconclusive():
    base = Scores(0.5, {0: 1.0, 1: 0.0})
    cand = Scores(0.5, {0: 1.0, 2: 0.0})
    d = decide(base, cand, GateSettings(min_baseline=0.0), task="t", metric="m,f")
    assert d.status == "inconclusive" and not d.promote
    assert d.paired["n"] == 1


def test_paired_interval_brackets_the_mean_difference_and_is_seeded():
    base = [1, 0] * 100
    cand = [1, 1] * 50 + [0, 0] * 50  # same mean, different documents right
    p = paired_comparison(dict(enumerate(map(float, base))), dict(enumerate(map(float, cand))),
                          0.95, 2000)
    assert p["mean_diff"] == pytest.approx(0.0)
    assert p["ci_low"] < 0 < p["ci_high"]
    again = paired_comparison(dict(enumerate(map(float, base))),
                              dict(enumerate(map(float, cand))), 0.95, 2000)
    assert (again["ci_low"], again["ci_high"]) == (p["ci_low"], p["ci_high"])
    assert p["only_baseline"] == 50 and p["only_candidate"] == 50
    assert p["both_right"] + p["only_baseline"] + p["only_candidate"] + p["neither"] == 200


def test_identical_answers_give_a_zero_width_interval_and_p_1():
    same = [1, 0, 1, 1] * 25
    d = run(same, same)
    assert (d.paired["ci_low"], d.paired["ci_high"]) == (0.0, 0.0)
    assert d.paired["mcnemar_p"] == 1.0
    assert d.status == "pass"


def test_mcnemar_exact_matches_the_binomial_test():
    # 10 discordant pairs split 1:9 -> two-sided binomial p = 2 * (1 + 10) / 1024
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 30) < 1e-8


def test_large_significant_drop_fails_and_the_interval_excludes_zero():
    base = [1] * 60 + [0] * 40
    cand = [1] * 30 + [0] * 70
    d = run(base, cand)
    assert d.status == "fail"
    assert d.paired["ci_high"] < 0
    assert d.paired["mcnemar_p"] < 0.001


def test_decision_record_holds_every_number_and_threshold():
    d = run([1] * 50 + [0] * 50, [1] * 50 + [0] * 50)
    rec = d.as_record()
    assert {"status", "promote", "reasons", "baseline_score", "candidate_score", "recovery",
            "paired", "thresholds"} <= set(rec)
    assert rec["thresholds"]["min_recovery"] == 0.98
