"""Operating characteristics of the gate as configured, by simulation: how often it promotes a
candidate of a given true quality, and how many candidate questions it needs to decide.

Every simulated look goes through ``gate.decide()`` with the settings' own rules, critical
values and look sizes, so the tables in docs/evaluation.md and the tests that hold them describe
the code that decides, two rules included, not a formula for one.

Model: the baseline answers each question right with probability ``baseline``; the candidate
flips a fraction ``discordance`` of the answers, net ``(recovery - 1) x baseline``. With several
rules (production gates on strict-match and flexible-extract), each further rule's per-question
outcomes equal the first rule's with probability ``agreement`` and are drawn afresh from the
same model otherwise: the metrics agree on most flips, as the two gsm8k filters do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from requant.evaluation.gate import EvidenceRecord, decide, rule_key
from requant.evaluation.sequential import critical_values, look_sizes
from requant.settings import GateSettings


@dataclass(frozen=True)
class Characteristics:
    recovery: float
    discordance: float
    rules: int
    runs: int
    promoted: float
    failed: float
    inconclusive: float
    median_questions: float
    mean_questions: float

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mc_error(self) -> float:
        """One standard error of ``promoted`` from the finite number of runs."""
        p = min(max(self.promoted, 1 / self.runs), 1 - 1 / self.runs)
        return (p * (1 - p) / self.runs) ** 0.5


def cell_probabilities(recovery: float, discordance: float, baseline: float
                       ) -> tuple[float, float]:
    """(P(only the baseline right), P(only the candidate right)) for a true recovery."""
    gap = (1.0 - recovery) * baseline  # true baseline - candidate
    only_b, only_c = (discordance + gap) / 2, (discordance - gap) / 2
    only_c = 0.0 if -1e-12 < only_c < 0 else only_c
    if only_c < 0 or only_b > baseline or only_c > 1 - baseline:
        raise ValueError(f"discordance {discordance} cannot produce recovery {recovery} at "
                         f"baseline {baseline}: it needs at least {gap:.4f}")
    return only_b, only_c


def simulate(gate: GateSettings, *, recovery: float, discordance: float,
             baseline: float = 0.75, questions: int = 1319, runs: int = 4000,
             agreement: float = 0.9, seed: int = 0) -> Characteristics:
    import numpy as np

    only_b, only_c = cell_probabilities(recovery, discordance, baseline)
    rng = np.random.default_rng(seed)
    sizes = look_sizes(questions, tuple(gate.looks))
    zs = critical_values(tuple(s / questions for s in sizes), 1 - gate.confidence)
    keys = [rule_key(r.task, r.metric) for r in gate.rules]

    def draw() -> tuple[Any, Any]:
        b = rng.random((runs, questions)) < baseline
        u = rng.random((runs, questions))
        c = np.where(b, u >= only_b / baseline, u < only_c / (1 - baseline))
        return b.astype(float), c.astype(float)

    first = draw()
    outcomes = [first]
    for _ in keys[1:]:
        other, same = draw(), rng.random((runs, questions)) < agreement
        outcomes.append((np.where(same, first[0], other[0]), np.where(same, first[1], other[1])))
    with_ = {"simulated": True}
    status, used = [], []
    for r in range(runs):
        base = EvidenceRecord({k: dict(enumerate(o[0][r].tolist()))
                               for k, o in zip(keys, outcomes, strict=True)}, with_)
        for look, (n, z) in enumerate(zip(sizes, zs, strict=True), start=1):
            cand = EvidenceRecord({k: dict(enumerate(o[1][r, :n].tolist()))
                                   for k, o in zip(keys, outcomes, strict=True)}, with_)
            decision = decide(base, cand, gate, look=look, looks=len(sizes), z=z)
            if decision.final:
                break
        status.append(decision.status)
        used.append(n)
    return Characteristics(recovery, discordance, len(keys), runs,
                           status.count("pass") / runs, status.count("fail") / runs,
                           status.count("inconclusive") / runs, float(np.median(used)),
                           float(np.mean(used)))
