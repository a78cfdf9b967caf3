"""Paired-seed statistics of the method comparisons (``spark-ext demo | study | classify | diffkd | daqakd``).

Every comparison trains each method with the same seeds, so a method is judged by its per-seed
difference to a reference: the mean difference with its Student-t interval and how many seeds it won.
Needs scipy for the t quantile (installed with scikit-image / scikit-learn, the ``demo`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 denominator; 0.0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std: expected at least one value, got none")
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of ``values`` (:func:`mean_std`)."""
    m, s = mean_std(values)
    return {"mean": m, "std": s, "n": len(values)}


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile: the ``0.5 + level / 2`` quantile with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of ``a[i] - b[i]`` (paired by seed) with its t-interval ``[lo, hi]`` at ``level``.

    ``wins`` counts the pairs with ``a[i] > b[i]``; ``n`` is the number of pairs. With one pair the
    interval is undefined: ``lo`` and ``hi`` are NaN.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: a and b must pair up, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    m, s = mean_std(diffs)
    n = len(diffs)
    half = t_quantile(n - 1, level) * s / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "lo": m - half, "hi": m + half, "wins": sum(d > 0 for d in diffs), "n": n}


def summary_line(
    name: str, summary: dict[str, float], paired: Optional[dict[str, Any]], reference: str, digits: int, unit: str = ""
) -> str:
    """``name: mean ± std unit`` (:func:`summarize`) and, given ``paired`` (:func:`paired_difference` to
    ``reference``), ``   vs reference +mean [lo, hi]``; numbers with ``digits`` decimals."""
    line = f"{name}: {summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}{unit}"
    if paired is not None:
        line += (
            f"   vs {reference} {paired['mean']:+.{digits}f} [{paired['lo']:+.{digits}f}, {paired['hi']:+.{digits}f}]"
        )
    return line
