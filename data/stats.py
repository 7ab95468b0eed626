"""The statistics every reported figure carries: a mean over prompts and its standard error."""

from __future__ import annotations

import numpy as np


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean): sample standard deviation (ddof 1) / sqrt(n); NaN when n < 2."""
    values = np.asarray(values, dtype=float)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se
