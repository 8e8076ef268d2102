"""The accuracy gate: may this candidate leave the machine?

A pure function of two evaluations and the gate settings. The headline rule is the seed's
(candidate / baseline >= min_recovery), but both models answered the same questions, so the
decision also carries the paired view: per-question differences, a bootstrap confidence interval
of the mean difference, and McNemar's exact test on the questions where they disagree. A ratio of
two scores near zero is noise, so a baseline below ``min_baseline`` makes the gate inconclusive,
and inconclusive fails closed unless the settings say otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from requant.settings import GateSettings

Status = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class Scores:
    """One model's result on the gating task: the aggregate and the per-document scores."""

    score: float
    per_doc: dict[int, float]


@dataclass
class GateDecision:
    status: Status
    promote: bool
    reasons: list[str]
    task: str
    metric: str
    baseline_score: float
    candidate_score: float
    recovery: float | None
    paired: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    baseline: Scores, candidate: Scores, gate: GateSettings, *, task: str, metric: str
) -> GateDecision:
    reasons: list[str] = []
    status: Status = "pass"
    b, c = baseline.score, candidate.score
    recovery = c / b if b > 0 else None
    paired = paired_comparison(baseline.per_doc, candidate.per_doc, gate.confidence,
                               gate.bootstrap_resamples)

    if set(baseline.per_doc) != set(candidate.per_doc):
        status = "inconclusive"
        reasons.append(
            f"the evaluations scored different documents (baseline {len(baseline.per_doc)}, "
            f"candidate {len(candidate.per_doc)}, common {paired['n']}): they are not "
            "comparable. Rerun both with the same evaluation settings."
        )
    if b < gate.min_baseline:
        status = "inconclusive"
        reasons.append(
            f"baseline {metric} {b:.4f} is below gate.min_baseline {gate.min_baseline:.4f}: a "
            "recovery ratio on a near-zero score is noise. Gate a model that can do the task, "
            "or lower gate.min_baseline deliberately."
        )
    if status != "inconclusive":
        assert recovery is not None
        if recovery >= gate.min_recovery:
            reasons.append(f"recovery {recovery:.4f} >= gate.min_recovery {gate.min_recovery}")
        else:
            status = "fail"
            reasons.append(f"recovery {recovery:.4f} < gate.min_recovery {gate.min_recovery} "
                           f"(candidate {c:.4f} vs baseline {b:.4f})")
        if gate.min_candidate_score is not None:
            if c >= gate.min_candidate_score:
                reasons.append(f"candidate {c:.4f} >= gate.min_candidate_score "
                               f"{gate.min_candidate_score}")
            else:
                status = "fail"
                reasons.append(f"candidate {c:.4f} < gate.min_candidate_score "
                               f"{gate.min_candidate_score}")
    if paired["n"]:
        lo, hi = paired["ci_low"], paired["ci_high"]
        reasons.append(
            f"paired difference (candidate - baseline) {paired['mean_diff']:+.4f}, "
            f"{gate.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}] over {paired['n']} documents; "
            f"McNemar p = {paired['mcnemar_p']:.3g} ({paired['only_baseline']} only baseline "
            f"right, {paired['only_candidate']} only candidate right)"
        )
    promote = status == "pass" or (status == "inconclusive" and gate.allow_inconclusive)
    if status == "inconclusive":
        reasons.append("inconclusive is allowed to promote (gate.allow_inconclusive=true)"
                       if gate.allow_inconclusive else
                       "inconclusive fails closed (gate.allow_inconclusive=false)")
    return GateDecision(
        status=status, promote=promote, reasons=reasons, task=task, metric=metric,
        baseline_score=b, candidate_score=c, recovery=recovery, paired=paired,
        thresholds=gate.model_dump(),
    )


def paired_comparison(
    base: dict[int, float], cand: dict[int, float], confidence: float, resamples: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean per-document difference with a seeded bootstrap CI, and McNemar's exact test."""
    import numpy as np

    docs = sorted(set(base) & set(cand))
    n = len(docs)
    if n == 0:
        return {"n": 0, "mean_diff": None, "ci_low": None, "ci_high": None, "mcnemar_p": None,
                "both_right": 0, "only_baseline": 0, "only_candidate": 0, "neither": 0,
                "method": "paired bootstrap + McNemar exact"}
    b = np.array([base[d] for d in docs], dtype=float)
    c = np.array([cand[d] for d in docs], dtype=float)
    diff = c - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    means = diff[idx].mean(axis=1)
    alpha = 1 - confidence
    b_right, c_right = b >= 0.5, c >= 0.5
    only_b = int((b_right & ~c_right).sum())
    only_c = int((c_right & ~b_right).sum())
    return {
        "n": n,
        "mean_diff": float(diff.mean()),
        "ci_low": float(np.quantile(means, alpha / 2)),
        "ci_high": float(np.quantile(means, 1 - alpha / 2)),
        "confidence": confidence,
        "mcnemar_p": mcnemar_exact_p(only_b, only_c),
        "both_right": int((b_right & c_right).sum()),
        "only_baseline": only_b,
        "only_candidate": only_c,
        "neither": int((~b_right & ~c_right).sum()),
        "method": "paired bootstrap + McNemar exact",
    }


def mcnemar_exact_p(only_baseline: int, only_candidate: int) -> float:
    """Two-sided exact McNemar test: a binomial test of the discordant pairs against 1/2."""
    n = only_baseline + only_candidate
    if n == 0:
        return 1.0
    k = min(only_baseline, only_candidate)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def render_decision(d: GateDecision) -> str:
    verdict = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}[d.status]
    rec = f"{d.recovery:.4f}" if d.recovery is not None else "n/a (baseline 0)"
    lines = [
        f"# Gate: {verdict} — {'promote' if d.promote else 'nothing leaves the machine'}",
        "",
        f"Task `{d.task}`, metric `{d.metric}`.",
        "",
        "| | score |",
        "| --- | --- |",
        f"| baseline | {d.baseline_score:.4f} |",
        f"| candidate | {d.candidate_score:.4f} |",
        f"| recovery | {rec} |",
        "",
        "Reasons:",
        *[f"- {r}" for r in d.reasons],
    ]
    return "\n".join(lines)
