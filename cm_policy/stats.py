"""95% confidence intervals for evaluation results: success rates and mean scores.

Pure functions of counts and samples, importing nothing of the package: tasks (their outcome
metrics), evaluation (episode summaries) and experiment reports all quote intervals, so they
live here, below every one of those layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(rate: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a success rate over ``n`` episodes (sound at 0 and 1)."""
    if n < 1:
        raise ValueError(f"a Wilson interval needs n >= 1 episodes, got n={n}")
    denom = 1 + Z95**2 / n
    centre = (rate + Z95**2 / (2 * n)) / denom
    spread = Z95 * math.sqrt(rate * (1 - rate) / n + Z95**2 / (4 * n**2)) / denom
    return centre - spread, centre + spread


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95% normal interval of the mean of ``values``; (nan, nan) for fewer than two values,
    whose spread cannot be estimated."""
    samples = np.asarray(values, dtype=np.float64)
    if len(samples) < 2:
        return math.nan, math.nan
    mean = float(samples.mean())
    half = Z95 * float(samples.std(ddof=1)) / math.sqrt(len(samples))
    return mean - half, mean + half
