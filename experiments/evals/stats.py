"""95% intervals for evaluation results: bootstrap over evaluation units, t-intervals over seeds.

A result from one run is a mean over evaluation units (held-out sequences for NLL, keys or
sequences of queries for retrieval). Its interval is a percentile bootstrap over those units
(Efron & Tibshirani 1993): resample the units with replacement, recompute the statistic, take the
2.5% and 97.5% quantiles. Paired differences (the same sequences at two lengths) are bootstrapped
as per-unit differences, which removes the between-sequence variance they share. Ratios of sums
(queries right / queries asked, with several queries per sequence) resample whole sequences, so
queries of one sequence are not treated as independent.

Across several seeds the report uses a Student-t interval of the per-seed values, which carries
both the training noise and the evaluation noise.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

Interval = tuple[float, float]


def _resampled_rows(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] indices of bootstrap resamples; fixed by `seed` so a result file is reproducible."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(stats: np.ndarray) -> Interval:
    lo, hi = np.quantile(stats, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """95% percentile-bootstrap interval of the mean of `values` (one value per evaluation unit)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    if x.size == 1:
        return float(x[0]), float(x[0])
    return _percentiles(x[_resampled_rows(x.size, n_boot, seed)].mean(axis=1))


def bootstrap_ratio(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Interval:
    """95% bootstrap interval of sum(num) / sum(den), resampling units (e.g. sequences) whole."""
    num = np.asarray(numerators, dtype=np.float64).ravel()
    den = np.asarray(denominators, dtype=np.float64).ravel()
    if num.shape != den.shape or num.size == 0:
        raise ValueError(f"need equal, non-empty numerators and denominators, got {num.shape} and {den.shape}")
    if num.size == 1:
        return float(num[0] / den[0]), float(num[0] / den[0])
    rows = _resampled_rows(num.size, n_boot, seed)
    return _percentiles(num[rows].sum(axis=1) / np.maximum(den[rows].sum(axis=1), 1e-12))


def t_interval(values: Sequence[float]) -> Optional[Interval]:
    """95% Student-t interval of the mean of per-seed values; None with fewer than two."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    df = x.size - 1
    t = _T975.get(df, 1.96 + 2.4 / df)  # the table to 10 degrees of freedom, then within 0.01 of the exact quantile
    half = t * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)
