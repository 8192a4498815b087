"""Numba CPU kernels of ``drift.peak_slope_many``: residual ranges and residual histograms of many (pair, slope)
items, one pass over the pair per item and no (slopes × pairs) temporaries.

A pair is one row of ``x``, ``y`` (P, n) (w_i, w_f, finite fp64); an item is (row, slope c). The residual
``r = y − c·x`` is formed as numpy forms it (a product, then a difference: no fused multiply-add), so the ranges
and bin indices equal those of the numpy reference in ``drift._peak_densities`` bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, error_model="numpy", nogil=True)


@njit(parallel=True, **_JIT)
def residual_ranges(x: np.ndarray, y: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` of ``y[p] − cs[p, k]·x[p]`` for every row p and slope k: two (P, K) arrays."""
    n_rows, n = x.shape
    n_slopes = cs.shape[1]
    lo = np.empty((n_rows, n_slopes))
    hi = np.empty((n_rows, n_slopes))
    for p in prange(n_rows):
        for k in range(n_slopes):
            c = cs[p, k]
            a = y[p, 0] - c * x[p, 0]
            b = a
            for j in range(1, n):
                r = y[p, j] - c * x[p, j]
                a = min(a, r)
                b = max(b, r)
            lo[p, k] = a
            hi[p, k] = b
    return lo, hi


@njit(parallel=True, **_JIT)
def residual_counts(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cs: np.ndarray, lo: np.ndarray,
                    width: np.ndarray, n_bins: int) -> np.ndarray:
    """Histogram counts (items, n_bins) fp64: item i counts ``int((y[rows[i]] − cs[i]·x[rows[i]] − lo[i]) / width[i])``
    (bins from ``lo[i]`` of step ``width[i]``; every index must be below ``n_bins``)."""
    counts = np.zeros((rows.size, n_bins))
    for i in prange(rows.size):
        p = rows[i]
        c = cs[i]
        base = lo[i]
        w = width[i]
        for j in range(x.shape[1]):
            r = y[p, j] - c * x[p, j]
            counts[i, int((r - base) / w)] += 1.0
    return counts
