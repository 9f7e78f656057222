"""The few statistics ``moa eval`` needs, in pure Python (the core must not need numpy).

Sizes are small (hundreds of items), so a percentile bootstrap over items and a two-parameter
logistic regression fitted by Newton's method are fast enough and easy to check.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with its 95% interval (``None`` bounds when there is too little data)."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap(
    items: Sequence[object],
    stat: Callable[[Sequence[object]], float | None],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> Estimate:
    """Percentile bootstrap of ``stat`` over ``items`` (resampled with replacement).

    Items are the unit of resampling: for a win rate, one item is one prompt with every judgment
    about it, so the two orders of a pair (which are not independent) stay together.
    """
    n = len(items)
    value = stat(items) if n else None
    if n < 2 or value is None:
        return Estimate(value, None, None, n)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        got = stat([items[rng.randrange(n)] for _ in range(n)])
        if got is not None:
            draws.append(got)
    if not draws:
        return Estimate(value, None, None, n)
    draws.sort()
    return Estimate(value, _percentile(draws, alpha / 2), _percentile(draws, 1 - alpha / 2), n)


def mean_ci(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of ``values`` with its bootstrap interval."""

    def mean(xs: Sequence[object]) -> float:
        return statistics.fmean(xs)  # type: ignore[arg-type]

    return bootstrap(list(values), mean, resamples=resamples, seed=seed)


Z_95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996..., as R's qnorm(0.975)


def wilson_interval(successes: float, n: int, *, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (95% by default); ``(0, 1)`` when ``n`` is 0.

    Unlike the normal approximation (p +- z * sqrt(p(1-p)/n)), it never collapses to a point when
    every trial went one way, and it stays inside [0, 1]: fit for a running rate over few samples.
    ``successes`` may be fractional (a tie counted a half).
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, successes / n))
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def logistic_fit(
    x: Sequence[float], y: Sequence[float], *, ridge: float = 1e-3, iterations: int = 50
) -> tuple[float, float]:
    """Fit ``P(y=1) = sigmoid(a + b*x)`` by Newton's method; returns ``(a, b)``.

    ``y`` may be fractional (a tie is 0.5): the fit then maximises the binomial quasi-likelihood,
    as AlpacaEval's length-controlled GLM does. A small ridge keeps the fit finite when the data
    separate perfectly (every longer answer won, say).
    """
    a = b = 0.0
    for _ in range(iterations):
        ga, gb = -ridge * a, -ridge * b
        haa, hab, hbb = ridge, 0.0, ridge
        for xi, yi in zip(x, y, strict=True):
            p = sigmoid(a + b * xi)
            w = p * (1 - p)
            ga += yi - p
            gb += (yi - p) * xi
            haa += w
            hab += w * xi
            hbb += w * xi * xi
        det = haa * hbb - hab * hab
        if det <= 1e-12:
            break
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) < 1e-9 and abs(db) < 1e-9:
            break
    return a, b


def length_feature(diffs: Sequence[float], scale: float | None = None) -> list[float]:
    """AlpacaEval 2.0's length term: ``tanh(diff / std(diff))``, bounded so long outliers cannot
    dominate the fit."""
    if scale is None:
        scale = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
    if scale <= 0:
        return [0.0 for _ in diffs]
    return [math.tanh(d / scale) for d in diffs]


def length_controlled_rate(
    prefs: Sequence[float], diffs: Sequence[float], scale: float | None = None
) -> float | None:
    """The win rate the judge would give at equal length.

    Regress the preference for the target on the length term and read the fitted rate where the
    length difference is zero: ``sigmoid(intercept)``. A judge that merely prefers longer answers
    then stops rewarding a target for being long. ``scale`` fixes the length unit (a bootstrap
    keeps the full sample's), by default the standard deviation of ``diffs``.
    """
    if len(prefs) < 2:
        return None
    a, _ = logistic_fit(length_feature(diffs, scale), prefs)
    return sigmoid(a)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Agreement of two raters beyond chance (1 = always agree, 0 = chance level)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    labels = set(a) | set(b)
    expected = sum((a.count(label) / n) * (b.count(label) / n) for label in labels)
    if expected >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - expected) / (1 - expected)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 2 or len(x) != len(y):
        return None
    sx, sy = statistics.pstdev(x), statistics.pstdev(y)
    if sx == 0 or sy == 0:
        return None
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / (len(x) * sx * sy)
