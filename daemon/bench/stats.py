"""Summaries of repeated measurements: medians, percentiles, spread. Pure, no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100 (got {q})")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """What a list of samples of one figure says: the median is the figure, the rest is its noise."""

    n: int
    median: float
    p95: float
    minimum: float
    maximum: float
    mean: float
    stdev: float  # sample standard deviation; 0 for a single sample

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how far apart the repetitions were."""
        if self.median == 0:
            return 0.0
        return abs(self.maximum - self.minimum) / abs(self.median) * 100.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "median": self.median,
            "p50": self.median,
            "p95": self.p95,
            "min": self.minimum,
            "max": self.maximum,
            "mean": self.mean,
            "stdev": self.stdev,
            "spread_pct": round(self.spread_pct, 2),
        }


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summary of no values")
    return Summary(
        n=len(values),
        median=statistics.median(values),
        p95=percentile(values, 95.0),
        minimum=min(values),
        maximum=max(values),
        mean=statistics.fmean(values),
        stdev=statistics.stdev(values) if len(values) > 1 else 0.0,
    )


def ratio(value: float | None, peer: float | None) -> float | None:
    """value / peer, or None when either is missing or the peer is zero."""
    if value is None or peer is None or peer == 0:
        return None
    return value / peer


def rate(count: float, seconds: float) -> float | None:
    """count per second, or None for an empty interval."""
    if seconds <= 0:
        return None
    return count / seconds
