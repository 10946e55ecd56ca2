"""Summary statistics of benchmark samples: percentiles, medians and recall@k.

Every benchmark computes its percentiles here (``numpy.percentile``, linear
interpolation); each keeps its own rounding and units.
"""

from __future__ import annotations

import numpy as np


def percentile(values, q: float) -> float:
    """The ``q``-th percentile of ``values`` (none of them None), as a float."""
    return float(np.percentile(values, q))


def p50_p95(samples_ms: list[float]) -> tuple[float | None, float | None]:
    """(p50, p95) of the samples, unrounded; (None, None) when there are none."""
    if not samples_ms:
        return None, None
    return percentile(samples_ms, 50), percentile(samples_ms, 95)


def latency_summary(values) -> dict:
    """n, p50, p95, p99, mean, min and max of the samples that are not None, to 0.01."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(values):
        return {}
    return {
        "n": int(len(values)),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
        "mean": round(float(values.mean()), 2),
        "min": round(float(values.min()), 2),
        "max": round(float(values.max()), 2),
    }


def median(values) -> float | None:
    """The median of the values that are not None, to 0.01; None when there are none."""
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def recall_at_k(got: np.ndarray, want: np.ndarray) -> float:
    """The mean share of each row of ``want`` (the true top-k) found in the first k of ``got``."""
    k = want.shape[1]
    hits = [len(set(g[:k].tolist()) & set(w.tolist())) for g, w in zip(got, want)]
    return float(np.mean(hits) / k)
