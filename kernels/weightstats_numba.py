"""Numba CPU kernels of ``weightstats``: the statistics of many weight rows, one thread per row, no temporaries.

Each row of ``x`` (G, n) is one layer's finite fp64 weights. ``central_moments`` makes two passes per row (extremes,
then compensated sums of the centred powers); ``histograms`` reproduces ``np.histogram(row, bins)`` bin for bin (its
edges, its index arithmetic and its corrections at the edges). Definitions are in ``weightstats.py``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, error_model="numpy", nogil=True)


@njit(inline="always")
def _add(total: float, carry: float, value: float) -> tuple[float, float]:
    """Neumaier's compensated addition: ``(total, carry)`` + ``value``."""
    t = total + value
    if abs(total) >= abs(value):
        carry += (total - t) + value
    else:
        carry += (value - t) + total
    return t, carry


@njit(parallel=True, **_JIT)
def central_moments(x: np.ndarray, mean: np.ndarray, zero_tol: float) -> np.ndarray:
    """Per row of ``x`` (G, n) with its ``mean`` (G,): ``(m2, m3, m4, min, max, frac_zero)`` as (G, 6).

    ``m_k = sum((x - mean)^k) / n`` (compensated sums); ``frac_zero``: the fraction of ``|x| < zero_tol * max|x|``,
    1 for an all-zero row.
    """
    g_rows, n = x.shape
    out = np.empty((g_rows, 6))
    for g in prange(g_rows):
        lo = x[g, 0]
        hi = x[g, 0]
        for j in range(1, n):
            v = x[g, j]
            lo = min(lo, v)
            hi = max(hi, v)
        s2 = c2 = s3 = c3 = s4 = c4 = 0.0
        amax = max(abs(lo), abs(hi))
        limit = zero_tol * amax
        near = 0
        for j in range(n):
            d = x[g, j] - mean[g]
            d2 = d * d
            s2, c2 = _add(s2, c2, d2)
            s3, c3 = _add(s3, c3, d2 * d)
            s4, c4 = _add(s4, c4, d2 * d2)
            if abs(x[g, j]) < limit:
                near += 1
        out[g, 0] = (s2 + c2) / n
        out[g, 1] = (s3 + c3) / n
        out[g, 2] = (s4 + c4) / n
        out[g, 3] = lo
        out[g, 4] = hi
        out[g, 5] = near / n if amax > 0 else 1.0
    return out


@njit(parallel=True, **_JIT)
def histograms(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(x[g], bins)`` of every row (over the row's own (min, max), widened by 0.5 on each side when
    the row is constant): ``(counts (G, bins) float64, edges (G, bins + 1) float64)``."""
    g_rows, n = x.shape
    counts = np.zeros((g_rows, bins))
    edges = np.empty((g_rows, bins + 1))
    for g in prange(g_rows):
        first = x[g, 0]
        last = x[g, 0]
        for j in range(1, n):
            first = min(first, x[g, j])
            last = max(last, x[g, j])
        if first == last:
            first -= 0.5
            last += 0.5
        delta = last - first
        step = delta / bins
        for k in range(bins):  # np.linspace(first, last, bins + 1)
            edges[g, k] = k * step + first
        edges[g, bins] = last
        for j in range(n):
            v = x[g, j]
            i = int(((v - first) / delta) * bins)
            if i == bins:
                i -= 1
            if v < edges[g, i]:
                i -= 1
            elif v >= edges[g, i + 1] and i != bins - 1:
                i += 1
            counts[g, i] += 1.0
    return counts, edges
