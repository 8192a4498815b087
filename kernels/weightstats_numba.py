"""Numba CPU kernels of ``weightstats``: the statistics of many weight rows, one thread per row, no temporaries.

Each row of ``x`` (G, n) is one layer's finite fp64 weights. ``central_moments`` makes two passes per row (extremes,
then compensated sums of the centred powers); ``histograms`` reproduces ``np.histogram(row, bins)`` bin for bin (its
edges, its index arithmetic and its corrections at the edges); ``order_statistics`` takes the values of given ranks
(for the quantiles) without sorting whole rows. Definitions are in ``weightstats.py``.
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


#: Most bins ``order_statistics`` spreads a row over (a row of n values gets ``n // 2`` bins, at least 1).
SELECT_MAX_BINS = 1 << 16


@njit(inline="always")
def _bin(value: float, low: float, scale: float, last: int) -> int:
    """The bin of ``value``: ``floor((value - low) * scale)``, at most ``last`` (also for an overflow's NaN)."""
    position = (np.float64(value) - low) * scale
    return int(position) if position < last else last


@njit(parallel=True, **_JIT)
def order_statistics(x: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``np.sort(x, axis=1)[:, ranks]`` of finite rows ``x`` (G, n), float32 or float64, for ascending distinct
    ``ranks`` (K,) in [0, n): (G, K) in ``x``'s dtype.

    Per row: a count of its values in equal-width bins of the row's (min, max) (the bin index is computed by one
    monotone formula, so every value of a bin is at most every value of the next), then a sort of only the values
    of the bins that hold a wanted rank. A row whose range is too small for its reciprocal is one bin (sorted
    whole); one whose range overflows puts the values too far above its minimum to subtract in the last bin.
    """
    g_rows, n = x.shape
    k_count = ranks.shape[0]
    out = np.empty((g_rows, k_count), dtype=x.dtype)
    n_bins = min(SELECT_MAX_BINS, max(1, n // 2))
    for g in prange(g_rows):
        row = x[g]
        lo = row[0]
        hi = row[0]
        for j in range(1, n):
            lo = min(lo, row[j])
            hi = max(hi, row[j])
        if lo == hi:
            out[g, :] = lo
            continue
        low = np.float64(lo)
        scale = n_bins / (np.float64(hi) - low)
        if not scale < np.inf:
            scale = 0.0
        starts = np.zeros(n_bins + 1, np.int64)  # after the prefix sum: the rank of each bin's first value
        for j in range(n):
            starts[_bin(row[j], low, scale, n_bins - 1) + 1] += 1
        for b in range(n_bins):
            starts[b + 1] += starts[b]
        slot = np.full(n_bins, -1, np.int64)  # where a wanted bin's values go in ``picked``; -1: not wanted
        bin_of = np.empty(k_count, np.int64)
        size = 0
        for k in range(k_count):
            b = np.searchsorted(starts, ranks[k], side="right") - 1
            bin_of[k] = b
            if slot[b] < 0:
                slot[b] = size
                size += starts[b + 1] - starts[b]
        picked = np.empty(size, x.dtype)
        fill = slot.copy()
        for j in range(n):
            b = _bin(row[j], low, scale, n_bins - 1)
            if fill[b] >= 0:
                picked[fill[b]] = row[j]
                fill[b] += 1
        for k in range(k_count):
            b = bin_of[k]
            if k == 0 or b != bin_of[k - 1]:
                picked[slot[b]: slot[b] + starts[b + 1] - starts[b]].sort()
            out[g, k] = picked[slot[b] + ranks[k] - starts[b]]
    return out
