"""The statistics behind the gate: a paired non-inferiority test, looked at in stages.

Both models answer the same questions; the hypothesis tested is "the candidate recovers less
than ``min_recovery`` of the baseline's score", in ratio form: H0: p_c <= r x p_b with
r = ``min_recovery``, both rates on the same questions. No whole-set baseline score enters, so
the baseline needs answering only the questions the candidate answered (requant.evaluation
.staged evaluates both in the same stages).

The statistic is the score statistic for the ratio of paired proportions (Tang, Tang & Chan
2003; Nam & Blackwelder 2002): its variance is taken at the maximum-likelihood cell
probabilities under H0, so it holds its level at the margin whatever the share of flipped
answers (measured 1 % to 40 %: docs/evaluation.md), where a Wald-type interval, whose variance
shrinks when few answers flip, let early looks pass a candidate exactly at the margin up to 8 %
of the time. At each look the gate decides:

- PASS when T(r) > z_k (non-inferior at the stated level);
- FAIL when T(r) < -z_k (inferior, at the same level);
- otherwise evaluate more questions; at the last look this is INCONCLUSIVE (fail closed).

Inverting the test gives the interval reported beside the decision: the recoveries θ with
-z_k <= T(θ) <= z_k, repeated-interval valid (it uses the look's own critical value).

Stages: the candidate is evaluated over a fixed, seeded question order, and the gate looks after
fractions t_1 < ... < t_K = 1 of it. Looking K times at a fixed critical value would let a
candidate pass by luck more often than the level says, so the critical value is spent across the
looks with O'Brien-Fleming-shaped boundaries z_k = c / sqrt(t_k): strict early (stop only when
the answer is clear), close to the fixed-sample value at the end. ``c`` is the value for which
the probability of crossing the PASS boundary at any look, for a candidate exactly δ worse, is
alpha = 1 - confidence; it is computed once per (looks, alpha) by recursive numerical
integration of the score process (Brownian motion at the information fractions), exact to
~1e-5, not by simulation (whose +-0.01 on c is a visible error in the level). The FAIL boundary
is its mirror image.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Verdict = Literal["pass", "fail", "continue"]

#: Grid points per unit standard deviation in the numerical integration of the boundary.
GRID_PER_SD = 200


@lru_cache(maxsize=64)
def boundary_constant(looks: tuple[float, ...], alpha: float) -> float:
    """c such that P(Z(t_k) > c / sqrt(t_k) for some k) = alpha under the null, computed
    exactly (Armitage-McPherson-Rowe recursive numerical integration of the score process,
    to about 1e-5), not simulated: the published O'Brien-Fleming constant, 1.7330 for four
    equal looks at one-sided 5 %."""
    if len(looks) == 1:
        return _z(1 - alpha)
    low, high = _z(1 - alpha), _z(1 - alpha / len(looks)) * math.sqrt(max(looks))
    for _ in range(40):  # bisection: the crossing probability falls as c grows
        mid = (low + high) / 2
        low, high = (mid, high) if crossing_probability(looks, mid) > alpha else (low, mid)
    return round((low + high) / 2, 6)


def crossing_probability(looks: tuple[float, ...], c: float) -> float:
    """P(the score process S(t) = sqrt(t) Z(t), a Brownian motion, reaches c at some look):
    its density below c is carried from look to look by convolution with the increment's
    normal density, on a grid fine enough that the result is exact to ~1e-6."""
    import numpy as np

    t = np.asarray(looks, dtype=float)
    h = 1.0 / GRID_PER_SD
    n = math.ceil((c + 10 * math.sqrt(float(t[-1]))) / h) + 1
    grid = c - np.arange(n)[::-1] * h  # ends exactly at c, the absorbing boundary
    weights = np.full(n, h)
    weights[[0, -1]] = h / 2  # trapezoid rule
    density = np.exp(-grid**2 / (2 * t[0])) / math.sqrt(2 * math.pi * t[0])
    for step in np.diff(t):
        offsets = np.arange(-(n - 1), n) * h
        kernel = np.exp(-offsets**2 / (2 * step)) / math.sqrt(2 * math.pi * step)
        # density_k(x_i) = sum_j density_{k-1}(x_j) w_j phi(x_i - x_j)
        density = np.convolve(density * weights, kernel)[n - 1: 2 * n - 1]
    return 1.0 - float(np.sum(density * weights))


def critical_values(looks: tuple[float, ...], alpha: float) -> list[float]:
    c = boundary_constant(looks, alpha)
    return [c / math.sqrt(t) for t in looks]


def _z(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class RecoveryTest:
    """One look's evidence on "candidate >= min_recovery x baseline", on the same questions."""

    n: int
    candidate: float  # mean score on these questions
    baseline: float  # the baseline's, on the same questions
    statistic: float  # the score statistic at recovery = min_recovery (> z: non-inferior)
    low: float  # the recovery interval at this look's z: {θ : -z <= T(θ) <= z}
    high: float | None  # None: unbounded (the baseline scores ~0 here)
    z: float
    only_baseline: int
    only_candidate: int


def score_statistic(pairs: Counter[tuple[float, float]]) -> Callable[[float], float]:
    """θ -> T(θ) for H0: mean(candidate) = θ x mean(baseline), from the count of each
    (baseline, candidate) score pair; each call O(1), so the interval's bisection and the
    simulations stay cheap.

    Binary scores: the score statistic of Tang, Tang & Chan (2003; Nam & Blackwelder 2002),
    its variance taken at the maximum-likelihood cell probabilities under H0, so it does not
    shrink when few answers flip (what made the Wald-type interval pass too often at the
    margin). Other scores: the paired mean of c_i - θ b_i over its standard error."""
    n = sum(pairs.values())
    if set(pairs) <= {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}:
        both, only_c, only_b = pairs[(1.0, 1.0)], pairs[(0.0, 1.0)], pairs[(1.0, 0.0)]
        return lambda theta: tang_score(n, both, only_c, only_b, theta)
    mb = sum(b * k for (b, _), k in pairs.items()) / n
    mc = sum(c * k for (_, c), k in pairs.items()) / n
    dof = max(n - 1, 1)
    vb = sum((b - mb) ** 2 * k for (b, _), k in pairs.items()) / dof
    vc = sum((c - mc) ** 2 * k for (_, c), k in pairs.items()) / dof
    cov = sum((b - mb) * (c - mc) * k for (b, c), k in pairs.items()) / dof

    def wald(theta: float) -> float:
        mean, var = mc - theta * mb, max(vc + theta**2 * vb - 2 * theta * cov, 0.0)
        if var <= 1e-12:
            return 0.0 if abs(mean) < 1e-12 else math.copysign(math.inf, mean)
        return mean / math.sqrt(var / n)

    return wald


def tang_score(n: int, both: int, only_c: int, only_b: int, theta: float) -> float:
    """The matched-pairs ratio score statistic from the four cells (both right, only the
    candidate, only the baseline; the rest both wrong); its restricted MLE has a closed form."""
    a = n * (1 + theta)
    b = (both + only_b) * theta**2 - (both + only_c + 2 * only_b)
    c = only_b * (1 - theta) * (both + only_c + only_b) / n
    p_only_b = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
    var = n * ((1 + theta) * p_only_b + (both + only_c + only_b) * (theta - 1) / n)
    num = both + only_c - (both + only_b) * theta
    if var <= 1e-12:  # nothing right on either side: no evidence either way
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def recovery_test(base: list[float], cand: list[float], min_recovery: float,
                  z: float) -> RecoveryTest:
    """The statistic at ``min_recovery`` and the recovery interval at ``z`` (the test
    inverted: T falls as θ grows), on paired per-question scores."""
    n = len(base)
    if n == 0 or n != len(cand):
        raise ValueError(f"paired scores need equal, non-empty lists (got {n}, {len(cand)})")
    pairs = Counter(zip(base, cand, strict=True))
    stat = score_statistic(pairs)

    def crossing(target: float, hi: float = 4.0) -> float | None:
        """θ where T(θ) = target; None when T stays above it up to ``hi``."""
        lo = 0.0
        if stat(lo) <= target:
            return 0.0
        if stat(hi) > target:
            return None
        for _ in range(32):  # to ~1e-9
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if stat(mid) > target else (lo, mid)
        return (lo + hi) / 2

    return RecoveryTest(
        n, sum(c * k for (_, c), k in pairs.items()) / n,
        sum(b * k for (b, _), k in pairs.items()) / n, stat(min_recovery),
        _or(crossing(z), 4.0), crossing(-z), z,
        sum(k for (b, c), k in pairs.items() if b > c),
        sum(k for (b, c), k in pairs.items() if c > b))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def verdict(statistic: float, z: float) -> Verdict:
    """PASS above the look's boundary (recovery > min_recovery at the level), FAIL below its
    mirror image (recovery < min_recovery), otherwise more questions."""
    if statistic > z:
        return "pass"
    if statistic < -z:
        return "fail"
    return "continue"


def look_sizes(total: int, looks: tuple[float, ...]) -> list[int]:
    """Questions evaluated by each look (cumulative), the last one the whole set."""
    sizes = sorted({max(1, min(total, math.ceil(t * total))) for t in looks})
    if sizes[-1] != total:
        sizes.append(total)
    return sizes


def question_order(doc_ids: list[int], seed: int) -> list[int]:
    """The fixed, seeded order the candidate is evaluated in: the same set, the same order, on
    every run with that seed, so stages never depend on what was evaluated before."""
    import random

    order = sorted(doc_ids)
    random.Random(seed).shuffle(order)
    return order
