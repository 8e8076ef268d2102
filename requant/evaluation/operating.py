"""Operating characteristics of the gate, by simulation: how often it promotes a candidate of a
given true quality, and how many candidate questions it needs to decide.

It runs the gate's own decision functions (``sequential.binary_interval``, ``verdict``,
``look_sizes``, ``critical_values``) on simulated paired outcomes, so the table in
docs/evaluation.md and the test that holds it describe the code that decides, not a formula.
Model: a baseline that answers each question right with probability ``baseline``; the candidate
flips a fraction ``discordance`` of the answers, net ``(recovery - 1) x baseline``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from requant.evaluation.sequential import binary_interval, critical_values, look_sizes, verdict


@dataclass(frozen=True)
class Characteristics:
    recovery: float
    discordance: float
    runs: int
    promoted: float
    failed: float
    inconclusive: float
    median_questions: float
    mean_questions: float

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def simulate(*, recovery: float, discordance: float, min_recovery: float, questions: int = 1319,
             baseline: float = 0.75, looks: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
             confidence: float = 0.95, runs: int = 4000, seed: int = 0) -> Characteristics:
    import numpy as np

    gap = (1.0 - recovery) * baseline  # true baseline - candidate
    a, e = (discordance + gap) / 2, (discordance - gap) / 2  # P(only baseline), P(only cand)
    e = 0.0 if -1e-12 < e < 0 else e
    if e < 0 or a > baseline or e > 1 - baseline:
        raise ValueError(f"discordance {discordance} cannot produce recovery {recovery}")
    rng = np.random.default_rng(seed)
    b = rng.random((runs, questions)) < baseline
    u = rng.random((runs, questions))
    only_b = b & (u < a / baseline)
    only_c = ~b & (u < e / (1 - baseline))
    sizes = look_sizes(questions, looks)
    zs = critical_values(tuple(s / questions for s in sizes), 1 - confidence)
    cum_b, cum_c = np.cumsum(only_b, axis=1), np.cumsum(only_c, axis=1)
    deltas = (1.0 - min_recovery) * b.mean(axis=1)  # δ from the full baseline, as the gate
    outcome, used = [], []
    for r in range(runs):
        result = "inconclusive"
        for n, z in zip(sizes, zs, strict=True):
            low, high = binary_interval(n, int(cum_b[r, n - 1]), int(cum_c[r, n - 1]), z)
            v = verdict(low, high, float(deltas[r]))
            if v != "continue":
                result = v
                break
        outcome.append(result)
        used.append(n)
    return Characteristics(recovery, discordance, runs, outcome.count("pass") / runs,
                           outcome.count("fail") / runs, outcome.count("inconclusive") / runs,
                           float(np.median(used)), float(np.mean(used)))
