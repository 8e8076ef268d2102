"""The accuracy gate: may this candidate leave the machine?

A pure function of two evaluation records and the gate settings, asked once per look while the
candidate is evaluated in stages (``requant.evaluation.sequential`` has the statistics and why).
Every rule (task, metric with filter, min_recovery, optional min score) must pass:

- a rule PASSES when the candidate's recovery (its score over the baseline's, on the same
  questions) is above ``min_recovery`` at the look's level: the score statistic T(min_recovery)
  above the look's critical value;
- it FAILS when the recovery is below ``min_recovery`` at the same level, or on a hard limit at
  any look: the candidate scores 0 where the baseline does not, or misses
  ``min_candidate_score``;
- otherwise it needs more questions; at the last look it is INCONCLUSIVE.

The gate refuses to compare records that were not evaluated alike (task files, few-shot,
generation budget, BOS, server options, lm-eval and vLLM versions: their ``evaluated_with``)
or whose documents do not match; that is a hard FAIL, never "inconclusive". ``allow_inconclusive``
lets only an inconclusive result promote, never a failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from requant.evaluation.sequential import recovery_test, verdict
from requant.settings import GateRule, GateSettings

Status = Literal["pass", "fail", "inconclusive", "continue"]


def rule_key(task: str, metric: str) -> str:
    return f"{task}|{metric}"


@dataclass(frozen=True)
class EvidenceRecord:
    """What the gate reads of one model's evaluation: per rule, per document, and how."""

    per_doc: dict[str, dict[int, float]]  # rule_key -> doc id -> score
    evaluated_with: dict[str, Any]
    totals: dict[str, int] = field(default_factory=dict)  # task -> its questions, all stages
    prompts: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> doc -> hash


@dataclass
class RuleResult:
    task: str
    metric: str
    status: Status
    reasons: list[str]
    questions: int  # answered by both models so far
    total: int  # the task's questions
    baseline_score: float | None  # on the same questions as the candidate
    candidate_score: float | None
    recovery: float | None  # candidate / baseline on those questions
    min_recovery: float
    interval: dict[str, Any] = field(default_factory=dict)  # recovery low/high at this look


@dataclass
class GateDecision:
    status: Status
    promote: bool
    reasons: list[str]
    rules: list[RuleResult]
    look: int  # 1-based
    looks: int
    questions: int  # candidate questions evaluated (largest over rules)
    total: int
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.status != "continue"

    def as_record(self) -> dict[str, Any]:
        return asdict(self) | {"stopped_early": self.final and self.questions < self.total}


def comparability_problems(baseline: EvidenceRecord, candidate: EvidenceRecord,
                           rules: list[GateRule]) -> list[str]:
    problems = []
    b_with, c_with = baseline.evaluated_with, candidate.evaluated_with
    for key in sorted(set(b_with) | set(c_with)):
        if b_with.get(key) != c_with.get(key):
            problems.append(f"baseline and candidate were evaluated with different {key} "
                            f"({b_with.get(key)!r} vs {c_with.get(key)!r}): not comparable. "
                            "Re-evaluate the baseline (delete its cache entry) with the same "
                            "settings.")
    for rule in rules:
        key = rule_key(rule.task, rule.metric)
        if key not in baseline.per_doc or key not in candidate.per_doc:
            problems.append(f"{rule.task} {rule.metric}: missing from the "
                            f"{'baseline' if key not in baseline.per_doc else 'candidate'} "
                            "record. Check the rule's task and metric,filter names.")
        elif not set(candidate.per_doc[key]) <= set(baseline.per_doc[key]):
            extra = len(set(candidate.per_doc[key]) - set(baseline.per_doc[key]))
            problems.append(f"{rule.task} {rule.metric}: the candidate answered {extra} "
                            "documents the baseline did not: not comparable.")
    return problems + unpaired_prompts(baseline, candidate, {r.task for r in rules})


def unpaired_prompts(baseline: EvidenceRecord, candidate: EvidenceRecord,
                     tasks: set[str]) -> list[str]:
    """Each question must have been asked with the same prompt on both sides (lm-eval's doc and
    prompt hashes): the pairing is checked, not assumed. A record with no hashes at all is a
    synthetic one (simulations); one side without them is a problem."""
    problems = []
    for task in sorted(tasks):
        b, c = baseline.prompts.get(task), candidate.prompts.get(task)
        if b is None and c is None:
            continue
        if b is None or c is None:
            problems.append(f"{task}: only the {'candidate' if b is None else 'baseline'} "
                            "record has prompt hashes, so the pairing cannot be checked. "
                            "Re-evaluate the baseline (delete its cache entry).")
            continue
        differing = [d for d in sorted(c) if b.get(d) != c[d]]
        if differing:
            d = differing[0]
            problems.append(f"{task}: question {d} was asked with a different prompt or "
                            f"document ({b.get(d)} vs {c[d]}; {len(differing)} question(s) "
                            "differ): the records are not paired. Check the task files and "
                            "few-shot settings, and re-evaluate the baseline.")
    return problems


def decide(baseline: EvidenceRecord, candidate: EvidenceRecord, gate: GateSettings, *,
           look: int, looks: int, z: float) -> GateDecision:
    """The decision after look ``look`` of ``looks`` (critical value ``z`` at this look)."""
    problems = comparability_problems(baseline, candidate, gate.rules)
    if problems:
        return _decision("fail", problems, [], gate, look, looks, 0, 0)
    results = [decide_rule(rule, baseline.per_doc[rule_key(rule.task, rule.metric)],
                           candidate.per_doc[rule_key(rule.task, rule.metric)], z,
                           last=look == looks, total=candidate.totals.get(rule.task))
               for rule in gate.rules]
    statuses = {r.status for r in results}
    status: Status = ("fail" if "fail" in statuses else "pass" if statuses == {"pass"}
                      else "continue" if look < looks else "inconclusive")
    reasons = [f"{r.task} {r.metric}: {r.status}: {'; '.join(r.reasons)}" for r in results]
    return _decision(status, reasons, results, gate, look, looks,
                     max(r.questions for r in results), max(r.total for r in results))


def _decision(status: Status, reasons: list[str], results: list[RuleResult],
              gate: GateSettings, look: int, looks: int, questions: int,
              total: int) -> GateDecision:
    promote = status == "pass" or (status == "inconclusive" and gate.allow_inconclusive)
    if status == "inconclusive":
        reasons = [*reasons, "inconclusive is allowed to promote (gate.allow_inconclusive=true)"
                   if gate.allow_inconclusive else
                   "inconclusive fails closed (gate.allow_inconclusive=false)"]
    return GateDecision(status, promote, reasons, results, look, looks, questions, total,
                        gate.model_dump(mode="json"))


def decide_rule(rule: GateRule, base: dict[int, float], cand: dict[int, float], z: float,
                last: bool, total: int | None = None) -> RuleResult:
    """One rule at one look, on the questions both models answered; ``total``: the task's
    size (the baseline's record when not given)."""
    docs = sorted(cand)
    total = len(base) if total is None else total
    if not docs:
        return RuleResult(rule.task, rule.metric, "continue" if not last else "inconclusive",
                          ["no candidate answers yet"], 0, total, None, None, None,
                          rule.min_recovery)
    b_vals, c_vals = [base[d] for d in docs], [cand[d] for d in docs]
    t = recovery_test(b_vals, c_vals, rule.min_recovery, z)
    recovery = t.candidate / t.baseline if t.baseline > 0 else None
    high = f"{t.high:.4f}" if t.high is not None else "unbounded"
    reasons = [f"candidate {t.candidate:.4f} vs baseline {t.baseline:.4f} on the same "
               f"{len(docs)} of {total} questions: recovery "
               f"{'n/a' if recovery is None else f'{recovery:.4f}'}, interval "
               f"[{t.low:.4f}, {high}] at z={z:.3f}; must exceed min_recovery "
               f"{rule.min_recovery} (score statistic {t.statistic:+.3f} against ±{z:.3f})"]
    status: Status = verdict(t.statistic, z)
    if t.candidate == 0.0 and t.baseline > 0.0:
        status = "fail"
        reasons.append("hard limit: the candidate scores 0 where the baseline does not")
    if status == "continue" and last:
        status = "inconclusive"
        reasons.append("the recovery interval still contains min_recovery on the whole set: "
                       "more questions or a lower min_recovery would decide it "
                       "(docs/evaluation.md)")
    if rule.min_candidate_score is not None and status in ("pass", "inconclusive") \
            and t.candidate < rule.min_candidate_score:  # checked whenever the rule would stop
        status = "fail"
        reasons.append(f"hard limit: candidate {t.candidate:.4f} < min_candidate_score "
                       f"{rule.min_candidate_score}")
    return RuleResult(rule.task, rule.metric, status, reasons, len(docs), total, t.baseline,
                      t.candidate, recovery, rule.min_recovery,
                      {"low": t.low, "high": t.high, "z": z, "statistic": t.statistic,
                       "only_baseline": t.only_baseline, "only_candidate": t.only_candidate})


def render_decision(d: GateDecision) -> str:
    verdict_text = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE",
                    "continue": "UNDECIDED"}[d.status]
    lines = [
        f"# Gate: {verdict_text} — {'promote' if d.promote else 'nothing leaves the machine'}",
        "",
        f"Look {d.look} of {d.looks}: {d.questions} of {d.total} candidate questions evaluated"
        + (" (stopped early: the answer was clear)" if d.final and d.questions < d.total
           else "") + ".",
        "",
        "| task | metric | questions | baseline | candidate | recovery | interval | "
        "min_recovery | rule |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d.rules:
        lines.append(f"| {r.task} | {r.metric} | {r.questions} of {r.total} | "
                     f"{_num(r.baseline_score)} | {_num(r.candidate_score)} | "
                     f"{_num(r.recovery)} | {recovery_span(r.interval)} | {r.min_recovery} | "
                     f"{r.status} |")
    return "\n".join([*lines, "", "Reasons:", *[f"- {r}" for r in d.reasons]])


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def recovery_span(interval: dict[str, Any]) -> str:
    """The repeated recovery interval, as the reports print it."""
    if not interval:
        return "n/a"
    high = "∞" if interval.get("high") is None else f"{interval['high']:.4f}"
    return f"[{interval['low']:.4f}, {high}]"
