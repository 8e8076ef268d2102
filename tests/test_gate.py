"""The gate's decision: a paired non-inferiority test of the recovery on every rule, looked at
in stages, with known error rates (held here by the same simulation as docs/evaluation.md's
tables, which drives ``decide()`` with the configured rules)."""

from __future__ import annotations

import pytest

from requant.errors import SettingsError
from requant.evaluation.gate import EvidenceRecord, decide, render_decision, rule_key
from requant.evaluation.operating import simulate
from requant.evaluation.sequential import (
    boundary_constant,
    critical_values,
    crossing_probability,
    look_sizes,
    question_order,
    recovery_test,
    tang_score,
)
from requant.settings import GateRule, GateSettings, load_settings

T, M = "gsm8k_local", "exact_match,strict-match"
WITH = {"tasks": [T], "lm_eval": "0.4.13", "vllm": "0.32.0"}


def record(per_doc: list[int], metric: str = M, with_: dict | None = None) -> EvidenceRecord:
    return EvidenceRecord({rule_key(T, metric): dict(enumerate(map(float, per_doc)))},
                          with_ or WITH)


def gate(**kw) -> GateSettings:
    rule = {k: kw.pop(k) for k in ("min_recovery", "min_candidate_score", "min_baseline")
            if k in kw}
    return GateSettings(rules=[GateRule(task=T, metric=M, **rule)], **kw)


def decide_final(base, cand, **kw):
    g = gate(**kw)
    return decide(record(base), record(cand), g, look=1, looks=1,
                  z=critical_values((1.0,), 1 - g.confidence)[0])


def test_identical_answers_on_many_questions_pass_and_promote():
    base = [1] * 750 + [0] * 250
    d = decide_final(base, list(base))
    assert (d.status, d.promote) == ("pass", True)
    (rule,) = d.rules
    assert rule.interval["low"] > rule.min_recovery and rule.recovery == 1.0


def test_a_clear_loss_fails_even_when_inconclusive_would_be_allowed():
    base = [1] * 750 + [0] * 250
    cand = [0] * 100 + [1] * 650 + [0] * 250  # 100 right answers lost: recovery 0.867
    d = decide_final(base, cand, allow_inconclusive=True)
    assert (d.status, d.promote) == ("fail", False)
    assert d.rules[0].interval["high"] < d.rules[0].min_recovery


def test_too_few_questions_to_tell_is_inconclusive_and_fails_closed():
    base = [1] * 15 + [0] * 5
    cand = [0] + [1] * 14 + [0] * 5  # one answer lost out of 20: noise decides nothing
    d = decide_final(base, cand)
    assert (d.status, d.promote) == ("inconclusive", False)
    assert "fails closed" in d.reasons[-1]
    assert decide_final(base, cand, allow_inconclusive=True).promote is True


def test_a_candidate_at_zero_where_the_baseline_is_not_is_a_hard_failure():
    d = decide_final([1] * 3 + [0] * 97, [0] * 100, allow_inconclusive=True)
    assert (d.status, d.promote) == ("fail", False)
    assert any("scores 0 where the baseline does not" in r for r in d.rules[0].reasons)


def test_min_candidate_score_is_a_hard_limit_that_allow_inconclusive_cannot_override():
    base = [1] * 20 + [0] * 80
    d = decide_final(base, list(base), min_candidate_score=0.3, allow_inconclusive=True)
    assert (d.status, d.promote) == ("fail", False)
    assert any("min_candidate_score" in r for r in d.rules[0].reasons)


def test_min_baseline_zero_with_a_zero_baseline_decides_without_crashing():
    d = decide_final([0] * 10, [0] * 10, min_baseline=0.0)
    assert d.status == "inconclusive" and d.rules[0].recovery is None


def test_records_evaluated_differently_are_refused_not_compared():
    g = gate(allow_inconclusive=True)
    base = record([1] * 100)
    other = record([1] * 100, with_=WITH | {"vllm": "0.31.0"})
    d = decide(base, other, g, look=1, looks=1, z=1.645)
    assert (d.status, d.promote) == ("fail", False)
    assert "different vllm" in d.reasons[0]


def test_a_candidate_document_the_baseline_never_answered_is_refused():
    base = EvidenceRecord({rule_key(T, M): {0: 1.0, 1: 1.0}}, WITH)
    cand = EvidenceRecord({rule_key(T, M): {0: 1.0, 7: 1.0}}, WITH)
    d = decide(base, cand, gate(allow_inconclusive=True), look=1, looks=1, z=1.645)
    assert (d.status, d.promote) == ("fail", False) and "not comparable" in d.reasons[0]


def test_a_question_asked_with_another_prompt_is_a_hard_fail_naming_the_first_one():
    base = EvidenceRecord({rule_key(T, M): {i: 1.0 for i in range(10)}}, WITH, {T: 10},
                          {T: {i: f"d{i}/p{i}" for i in range(10)}})
    cand_prompts = {i: f"d{i}/p{i}" for i in range(10)} | {3: "d3/OTHER", 7: "d7/OTHER"}
    cand = EvidenceRecord({rule_key(T, M): {i: 1.0 for i in range(10)}}, WITH, {T: 10},
                          {T: cand_prompts})
    d = decide(base, cand, gate(allow_inconclusive=True), look=1, looks=1, z=1.645)
    assert (d.status, d.promote) == ("fail", False)
    assert "question 3 was asked with a different prompt" in d.reasons[0]
    assert "2 question(s) differ" in d.reasons[0]
    paired = EvidenceRecord(cand.per_doc, WITH, {T: 10}, {T: dict(base.prompts[T])})
    assert decide(base, paired, gate(allow_inconclusive=True), look=1, looks=1,
                  z=1.645).status != "fail"
    unhashed = EvidenceRecord(cand.per_doc, WITH)
    assert "only the baseline record has prompt hashes" in decide(
        base, unhashed, gate(), look=1, looks=1, z=1.645).reasons[0]


def test_a_metric_the_records_lack_is_refused_with_the_name_to_fix():
    g = GateSettings(rules=[GateRule(task=T, metric="exact_match,flexible-extract")])
    d = decide(record([1] * 10), record([1] * 10), g, look=1, looks=1, z=1.645)
    assert d.status == "fail" and "flexible-extract: missing" in d.reasons[0]


def test_every_rule_must_pass():
    flex = "exact_match,flexible-extract"
    good = {rule_key(T, M): {i: 1.0 for i in range(1000)}}
    base = EvidenceRecord(good | {rule_key(T, flex): {i: 1.0 for i in range(1000)}}, WITH)
    cand = EvidenceRecord(good | {rule_key(T, flex): {i: float(i >= 300) for i in range(1000)}},
                          WITH)
    g = GateSettings(rules=[GateRule(task=T, metric=M), GateRule(task=T, metric=flex)])
    d = decide(base, cand, g, look=1, looks=1, z=1.645)
    assert [r.status for r in d.rules] == ["pass", "fail"] and d.status == "fail"
    text = render_decision(d)
    assert "| gsm8k_local | exact_match,strict-match |" in text and flex in text


def test_an_undecided_look_continues_and_only_the_last_is_inconclusive():
    base, cand = [1] * 15 + [0] * 5, [0] + [1] * 14 + [0] * 5
    g = gate()
    d = decide(record(base), record(cand), g, look=1, looks=4, z=3.45)
    assert (d.status, d.promote, d.final) == ("continue", False, False)


def test_boundaries_are_the_exact_obrien_fleming_constants_and_one_look_is_the_fixed_test():
    """Jennison & Turnbull's one-sided O'Brien-Fleming constants at 5 %: 1.678 for two equal
    looks, 1.733 for four; the crossing probability at c is the level to 1e-5, and a seeded
    simulation of the score process agrees within its Monte Carlo error."""
    import numpy as np

    looks = (0.25, 0.5, 0.75, 1.0)
    c = boundary_constant(looks, 0.05)
    assert c == pytest.approx(1.7330, abs=2e-4)
    assert boundary_constant((0.5, 1.0), 0.05) == pytest.approx(1.6780, abs=2e-4)
    assert crossing_probability(looks, c) == pytest.approx(0.05, abs=1e-5)
    steps = np.diff(np.concatenate([[0.0], looks]))
    paths = np.cumsum(np.random.default_rng(7).standard_normal((400_000, 4)) * np.sqrt(steps),
                      axis=1)
    assert (paths.max(axis=1) > c).mean() == pytest.approx(0.05, abs=0.0015)
    assert critical_values((1.0,), 0.05)[0] == pytest.approx(1.6449, abs=1e-4)
    # the integration itself, at one look, is the normal tail (not only the shortcut above)
    assert crossing_probability((1.0,), 1.6449) == pytest.approx(0.05, abs=1e-4)
    assert critical_values(looks, 0.05) == pytest.approx([c / 0.5, c / 0.5**0.5,
                                                          c / 0.75**0.5, c])


def test_the_score_statistic_is_the_constrained_maximum_likelihood_score_test():
    """Tang's closed form equals the score statistic with the variance at the numerically
    maximised likelihood under H0 (p_c = θ p_b), on random tables."""
    import math

    import numpy as np
    from scipy.optimize import minimize

    def brute(both, only_c, only_b, neither, theta):
        counts = np.array([both, only_c, only_b, neither], float)

        def nll(v):
            p11, p21 = v
            p12 = theta * (p11 + p21) - p11
            p = np.array([p11, p12, p21, 1 - p11 - p21 - p12])
            return 1e9 if (p < 0).any() else -float(np.sum(counts * np.log(np.maximum(p, 1e-300))))

        best = min((minimize(nll, s, method="Nelder-Mead",
                             options={"xatol": 1e-12, "fatol": 1e-12, "maxiter": 20000})
                    for s in ((0.5, 0.05), (0.7, 0.2), (0.3, 0.1))), key=lambda r: r.fun)
        p11, p21 = best.x
        var = p11 * (1 - theta) ** 2 + (theta * (p11 + p21) - p11) + p21 * theta**2
        return (both + only_c - (both + only_b) * theta) / math.sqrt(counts.sum() * var)

    rng = np.random.default_rng(3)
    for _ in range(5):
        cells = [int(x) for x in rng.multinomial(300, [0.6, 0.04, 0.08, 0.28])]
        theta = float(rng.uniform(0.85, 1.0))
        assert tang_score(300, *cells[:3], theta) == pytest.approx(brute(*cells, theta),
                                                                   abs=1e-4)


def test_the_recovery_interval_keeps_width_when_nothing_flips_and_inverts_the_test():
    same = [1.0] * 50 + [0.0] * 50
    t = recovery_test(same, list(same), 0.957, 1.645)
    assert t.low < 1.0 < t.high and t.statistic < 1.645  # 100 agreeing answers prove little
    assert recovery_test(same, list(same), t.low, 1.645).statistic == pytest.approx(1.645,
                                                                                   abs=1e-6)


def test_one_rule_passing_while_another_is_undecided_continues_and_never_promotes():
    flex = "exact_match,flexible-extract"
    base = EvidenceRecord({rule_key(T, M): {i: 1.0 for i in range(400)},
                           rule_key(T, flex): {i: float(i % 2) for i in range(400)}}, WITH)
    cand = EvidenceRecord({rule_key(T, M): {i: 1.0 for i in range(400)},
                           rule_key(T, flex): {i: float(i % 2 and i > 20) for i in range(400)}},
                          WITH)
    g = GateSettings(rules=[GateRule(task=T, metric=M), GateRule(task=T, metric=flex)])
    d = decide(base, cand, g, look=1, looks=4, z=3.466)
    assert [r.status for r in d.rules] == ["pass", "continue"]
    assert (d.status, d.promote) == ("continue", False)
    last = decide(base, cand, g, look=4, looks=4, z=1.733)
    assert last.rules[1].status == "inconclusive" and (last.status, last.promote) == (
        "inconclusive", False)


def test_each_look_uses_its_own_critical_value_at_the_configured_level():
    """The stop rule of a staged evaluation: evidence between the first look's boundary and
    the last's continues at look 1 and passes at look 4; evidence that would pass at twice the
    level does not pass at the configured one."""
    from requant.evaluation.staged import gate_stop_rule

    g = gate(looks=[0.25, 0.5, 0.75, 1.0])
    zs = critical_values((0.25, 0.5, 0.75, 1.0), 1 - g.confidence)
    base = [1] * 150 + [0] * 50
    t = recovery_test(base, list(base), g.rules[0].min_recovery, 1.0).statistic
    assert zs[-1] < t < zs[0]  # between the first and the last boundary
    decisions = []
    stop = gate_stop_rule(record(base), g, g.looks, decisions.append)
    assert stop(record(base), 0) is False and decisions[-1].status == "continue"
    assert stop(record(base), 3) is True and decisions[-1].status == "pass"
    doubled = critical_values((0.25, 0.5, 0.75, 1.0), 2 * (1 - g.confidence))
    base = [1] * 600 + [0] * 200
    worse = [0] * 18 + [1] * 582 + [0] * 200
    t2 = recovery_test(base, worse, g.rules[0].min_recovery, 1.0).statistic
    assert doubled[-1] < t2 < zs[-1]  # would pass at twice the level
    stop = gate_stop_rule(record(base), g, g.looks, decisions.append)
    assert stop(record(worse), 3) is True and decisions[-1].status == "inconclusive"


def test_question_order_and_look_sizes_are_fixed_and_cover_the_set():
    order = question_order(list(range(1319)), 1234)
    assert order == question_order(list(range(1319)), 1234) and sorted(order) == list(range(1319))
    # shuffled (the early looks are a random sample, not the file's first questions), by seed
    assert order != sorted(order) and order != question_order(list(range(1319)), 1235)
    assert question_order(list(reversed(range(1319))), 1234) == order  # input order is moot
    assert look_sizes(1319, (0.25, 0.5, 0.75, 1.0)) == [330, 660, 990, 1319]


PRODUCTION = load_settings("deployments/configs/production-llama3-8b.yaml").gate


ONE_RULE = PRODUCTION.model_copy(update={"rules": PRODUCTION.rules[:1]})
RUNS = 2000


@pytest.mark.parametrize("gate_", [ONE_RULE, PRODUCTION], ids=["one-rule", "two-rules"])
@pytest.mark.parametrize("discordance", [0.033, 0.40])
def test_a_candidate_exactly_at_min_recovery_passes_at_most_1_minus_confidence(
        gate_, discordance):
    """The stated level, at the margin itself, at the lowest discordance that recovery allows
    and at 40 %: within two Monte Carlo errors of 5 % (the Wald-type interval this replaced
    passed 7-8 % of such runs at 3.2 %, which fails here)."""
    oc = simulate(gate_, recovery=gate_.rules[0].min_recovery, discordance=discordance,
                  runs=RUNS, seed=11)
    level = 1 - gate_.confidence
    assert oc.promoted <= level + 2 * (level * (1 - level) / RUNS) ** 0.5, oc


@pytest.mark.parametrize("discordance", [0.02, 0.05, 0.08])
def test_the_production_gate_promotes_a_good_candidate_in_at_least_95_percent_of_runs(
        discordance):
    oc = simulate(PRODUCTION, recovery=0.995, discordance=discordance, runs=RUNS, seed=12)
    assert oc.promoted >= 0.95, oc


@pytest.mark.parametrize("discordance", [0.0375, 0.08, 0.12])
def test_the_production_gate_promotes_a_bad_candidate_in_at_most_2_percent_of_runs(discordance):
    oc = simulate(PRODUCTION, recovery=0.95, discordance=discordance, runs=RUNS, seed=13)
    assert oc.promoted <= 0.02, oc


def test_a_clearly_good_candidate_needs_at_most_55_percent_of_the_questions_in_median():
    oc = simulate(PRODUCTION, recovery=1.0, discordance=0.05, runs=RUNS, seed=14)
    assert oc.median_questions <= 0.55 * 1319 and oc.promoted >= 0.99, oc


def test_the_production_gate_is_gsm8k_strict_and_flexible_with_bos():
    prod = load_settings("deployments/configs/production-llama3-8b.yaml")
    assert {(r.task, r.metric) for r in prod.gate.rules} == {
        ("gsm8k", "exact_match,strict-match"), ("gsm8k", "exact_match,flexible-extract")}
    assert prod.evaluation.add_bos_token is True and prod.evaluation.num_fewshot == 5
    assert prod.gate.allow_inconclusive is False


@pytest.mark.parametrize("override", [
    "gate.rules=[{task: gsm8k_local, min_recovery: 1.5}]",
    "gate.rules=[{task: gsm8k_local, metric: exact_match}]",
    "gate.rules=[{task: not_evaluated}]",
    "gate.rules=[]",
    "gate.looks=[0.5, 0.25, 1.0]",
    "gate.looks=[0.5]",
])
def test_bad_gate_settings_are_refused_naming_the_field(override):
    with pytest.raises(SettingsError, match=r"gate\.(rules|looks)"):
        load_settings(None, [override])
