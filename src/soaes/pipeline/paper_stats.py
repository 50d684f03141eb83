"""The report's intervals and verdicts: percentile-bootstrap intervals over items (paired where two rows score the
same items), ranges over benchmark repeats, and the reading of an interval as a paper direction.

A direction reproduces only when the whole 95 % interval lies on the paper's side; an interval across zero is "not
resolved", never counted as reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOT_ITERS = 2000
LEVEL = 0.95

REPRODUCES, OPPOSITE, UNRESOLVED = "reproduces", "does not reproduce", "not resolved"


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], iters: int = BOOT_ITERS, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `values` and its 95 % percentile-bootstrap interval over items (resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_mean: no values")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(iters, x.size))
    return float(x.mean()), *_percentiles(x[idx].mean(axis=1))


def bootstrap_diff(a: Sequence[float], b: Sequence[float], iters: int = BOOT_ITERS,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the same items (paired) and its 95 % percentile-bootstrap interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"bootstrap_diff: need equal, non-empty item lists, got {x.size} and {y.size}")
    return bootstrap_mean(x - y, iters=iters, seed=seed)


def binomial_interval(successes: float, trials: float) -> tuple[float, float, float]:
    """A proportion and its 95 % Wilson interval (for acceptance counted over proposed tokens)."""
    if trials <= 0:
        raise ValueError("binomial_interval: no trials")
    z, p = 1.959963984540054, successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def ratio_range(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """median(num) / median(den) and the range a ratio of one repeat of each can take (timings: few repeats, so a
    range, not a bootstrap)."""
    if not num or not den or min(den) <= 0:
        raise ValueError("ratio_range: need repeats and positive denominators")
    return float(np.median(num) / np.median(den)), min(num) / max(den), max(num) / min(den)


def verdict(lo: float, hi: float, sign: int = 1, threshold: float = 0.0) -> str:
    """The paper's direction (`sign` +1: above `threshold`; -1: below) read off a 95 % interval [lo, hi]."""
    if sign > 0:
        return REPRODUCES if lo > threshold else OPPOSITE if hi < threshold else UNRESOLVED
    return REPRODUCES if hi < threshold else OPPOSITE if lo > threshold else UNRESOLVED


def overall(verdicts: Sequence[str]) -> str:
    """One verdict for several directions: reproduces only if every one does; any opposite is reported as such."""
    if not verdicts:
        return UNRESOLVED
    if all(v == REPRODUCES for v in verdicts):
        return REPRODUCES
    return OPPOSITE if OPPOSITE in verdicts else UNRESOLVED


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
