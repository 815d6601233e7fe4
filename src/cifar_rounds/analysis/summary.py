"""A round's measurements summarised over its seeds: mean and sample std of the finite values."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np


class MeanStd(NamedTuple):
    mean: float
    std: float  # sample std (n - 1); NaN below two values
    n: int  # finite values used


def mean_std(values: Iterable[float]) -> MeanStd:
    """Mean and sample std over the finite values (a seed's missing metric does not poison the others)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    return MeanStd(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


def format_mean_std(values: Iterable[float], fmt: str = "{:.2%}") -> str:
    """'93.12% ± 0.21% (n = 5)'; one value: '93.12% (n = 1)'; none: 'not measured'."""
    m = mean_std(values)
    if m.n == 0:
        return "not measured"
    if m.n == 1:
        return f"{fmt.format(m.mean)} (n = 1)"
    return f"{fmt.format(m.mean)} ± {fmt.format(m.std)} (n = {m.n})"
