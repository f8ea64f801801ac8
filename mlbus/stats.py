"""The statistics alert rules and rollbacks decide with, shared by the stream processors
(streams/alerts.py, streams/feedback.py) and the workflow's rollback: a Wilson interval for a
proportion, a one-sided two-proportion test, and the PSI that sampling noise alone gives at
a sample size (a seeded Monte Carlo of the baseline, so a replay decides the same). Pure.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

#: Probability given to an empty bin on either side, so that PSI stays finite (the usual
#: choice; it caps one empty bin's contribution at a few units).
EPSILON = 1e-4
#: Monte Carlo draws behind one noise floor: its quantile at 0.99 is the 5th largest of 500.
DRAWS = 500


def z_of(confidence: float) -> float:
    """The one-sided standard-normal quantile of `confidence` (0.95 → 1.645)."""
    return NormalDist().inv_cdf(confidence)


def wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n, each bound one-sided at `confidence`
    ((0, 1) for n = 0: nothing is known). Unlike k/n ± z·se it stays inside [0, 1] and is
    right for small k, which is what error ratios near 0 are."""
    if n <= 0:
        return 0.0, 1.0
    z = z_of(confidence)
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def worse_proportion(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """One-sided two-proportion z-test that rate 1 (k1/n1) is higher than rate 2 (k2/n2):
    (z, p-value). p = 1 when either side has no sample or both rates are 0 or 1."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, 1.0
    pooled = (k1 + k2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / math.sqrt(variance)
    return z, 1 - NormalDist().cdf(z)


def fisher_worse(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact test that rate 1 (k1/n1) is higher than rate 2 (k2/n2): the
    p-value, P(X >= k1) for X hypergeometric (n1 draws from n1 + n2 with k1 + k2 marked).
    Exact where the z-test's normal approximation is not: a single error among a hundred
    requests against none among a thousand is not evidence. 1 when either side is empty."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    total, marked = n1 + n2, k1 + k2

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    denominator = log_comb(total, n1)
    p = 0.0
    for x in range(k1, min(marked, n1) + 1):
        if marked - x > n2:
            continue
        p += math.exp(log_comb(marked, x) + log_comb(total - marked, n1 - x) - denominator)
    return min(1.0, p)


def psi(expected: Sequence[float], actual_counts: Sequence[int]) -> float | None:
    """Population Stability Index of served counts against expected probabilities."""
    total = sum(actual_counts)
    if total == 0:
        return None
    out = 0.0
    for e, count in zip(expected, actual_counts, strict=True):
        a = max(count / total, EPSILON)
        e = max(e, EPSILON)
        out += (a - e) * math.log(a / e)
    return out


def psi_noise(features: Sequence[Sequence[float]], n: int, quantile: float, seed: str) -> float:
    """The `quantile` of the largest PSI over `features` (each a baseline's expected bin
    probabilities) when `n` samples are drawn from the baseline itself: what a window of
    traffic that has not drifted at all reads, worst feature first. Features drawn
    independently, which makes the largest a little larger than for correlated features: the
    floor errs high, i.e. towards not alerting. Seeded by `seed` (the baseline and n)."""
    if n <= 0 or not features:
        return math.inf
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    worst = np.zeros(DRAWS)
    for expected in features:
        e = np.maximum(np.asarray(expected, dtype=np.float64), 0.0)
        if e.sum() <= 0:
            continue
        e = e / e.sum()
        counts = rng.multinomial(n, e, size=DRAWS)
        a = np.maximum(counts / n, EPSILON)
        ee = np.maximum(e, EPSILON)
        values = ((a - ee) * np.log(a / ee)).sum(axis=1)
        np.maximum(worst, values, out=worst)
    return float(np.quantile(worst, quantile))
