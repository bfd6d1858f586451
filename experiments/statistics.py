"""The paired bootstrap interval every results table in recrl uses (README "Results").

For two models scored on the same users (or requests), x_u and y_u, the reported difference is
d = mean_u (x_u - y_u); its interval resamples the users with replacement B times and takes the
(1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means: the percentile bootstrap
(Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13). Pairing removes the
spread between users that both models share, so the interval is that of the difference itself.
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(first, second, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(d, low, high): mean_u (first_u - second_u) over paired users and its percentile bootstrap interval
    (users resampled with replacement `resamples` times, drawn 1,000 resamples at a time from numpy's
    default_rng(seed))."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)  # [U], [U]
    if first.shape != second.shape or first.ndim != 1 or first.size == 0:
        raise ValueError(f"paired_bootstrap needs two non-empty 1-D arrays of the same users; got shapes "
                         f"{first.shape} and {second.shape}")
    if not (np.isfinite(first).all() and np.isfinite(second).all()):
        raise ValueError("paired_bootstrap got NaN or inf metrics; every user needs a finite value on both sides")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1; got {resamples} and {level}")
    differences = first - second  # [U]
    generator = np.random.default_rng(seed)
    means = np.concatenate([  # [resamples]
        differences[generator.integers(0, differences.size, size=(min(1000, resamples - start), differences.size))]
        .mean(axis=1) for start in range(0, resamples, 1000)])
    tail = (1.0 - level) / 2.0
    return float(differences.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def interval_dict(first, second, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """paired_bootstrap as {"difference", "low", "high"} (the form the RecPO and ReRec tables store)."""
    return dict(zip(("difference", "low", "high"), paired_bootstrap(first, second, resamples, seed, level)))
