"""The statistics behind the gate: a paired non-inferiority test, looked at in stages.

Both models answer the same questions, so the evidence is the paired difference d_i =
candidate_i - baseline_i (each 0 or 1 for exact-match metrics). With the tolerance
δ = (1 - min_recovery) x baseline score, the hypothesis tested is "the candidate is worse than
the baseline by δ or more". At each look the gate computes a one-sided interval for the mean
difference and decides:

- PASS when its lower bound is above -δ (non-inferior: at most a δ loss, at the stated level);
- FAIL when its upper bound is below -δ (inferior, at the same level);
- otherwise evaluate more questions; at the last look this is INCONCLUSIVE (fail closed).

Interval: Agresti-Min's adjusted Wald interval for matched proportions (half a pseudo-count in
each of the four cells): one line of arithmetic, and, unlike the plain Wald interval, it keeps its
coverage when few answers flip (the common case for a good quantization). For non-binary scores
the same formula runs on the observed mean and variance of d_i.

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
class PairedInterval:
    n: int
    mean_diff: float
    low: float
    high: float
    z: float
    only_baseline: int
    only_candidate: int


def binary_interval(n: int, only_b: int, only_c: int, z: float) -> tuple[float, float]:
    """Agresti-Min: the Wald interval after half a pseudo-count in each of the four cells."""
    n_adj = n + 2.0
    p12, p21 = (only_b + 0.5) / n_adj, (only_c + 0.5) / n_adj
    centre = p21 - p12
    se = math.sqrt(max(p12 + p21 - centre**2, 0.0) / n_adj)
    return centre - z * se, centre + z * se


def paired_interval(base: list[float], cand: list[float], z: float) -> PairedInterval:
    """One-sided-use interval (lower, upper at level z) for mean(candidate - baseline)."""
    n = len(base)
    if n == 0 or n != len(cand):
        raise ValueError(f"paired scores need equal, non-empty lists (got {n}, {len(cand)})")
    only_b = sum(1 for b, c in zip(base, cand, strict=True) if b > c)
    only_c = sum(1 for b, c in zip(base, cand, strict=True) if c > b)
    mean = (sum(cand) - sum(base)) / n
    if all(v in (0.0, 1.0) for v in (*base, *cand)):
        low, high = binary_interval(n, only_b, only_c, z)
    else:
        var = sum((c - b - mean) ** 2 for b, c in zip(base, cand, strict=True)) / max(n - 1, 1)
        se = math.sqrt(var / n)
        low, high = mean - z * se, mean + z * se
    return PairedInterval(n, mean, low, high, z, only_b, only_c)


def verdict(low: float, high: float, delta: float) -> Verdict:
    """Where an interval (low, high) for candidate - baseline lies against -δ."""
    if low > -delta:
        return "pass"
    if high < -delta:
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
