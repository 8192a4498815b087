"""Numba CPU kernels of ``drift.drift_stats_many``: per (pair, slope) item, one pass over the pair and no
(slopes × pairs) temporaries, the residual ranges, histograms, standard deviation and quartile neighbours (numpy's
bits); the scans of the histograms that bound where their smoothed maximum can be; the sorted pairs' stable tie
order and the sums of the cumulative-sum fits.

Serial: a scan spreads drift over Dask tasks, and one call is tens of milliseconds, where threads cost more than
they give (on a loaded 2-core machine ``residual_counts`` took 2.6x longer with 2 threads than with 1).

A pair is one row of ``x``, ``y`` (P, n) (w_i, w_f, finite fp64); an item is (row, slope c). The residual
``r = y − c·x`` is formed as numpy forms it (a product, then a difference: no fused multiply-add), so the ranges
and bin indices equal those of the numpy reference in ``drift._peak_densities`` bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from zooscope.kernels.weightstats_numba import _add  # Neumaier's compensated addition

_JIT = dict(cache=True, error_model="numpy", nogil=True)


@njit(**_JIT)
def residual_ranges(x: np.ndarray, y: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` of ``y[p] − cs[p, k]·x[p]`` for every row p and slope k: two (P, K) arrays."""
    n_rows, n = x.shape
    n_slopes = cs.shape[1]
    lo = np.empty((n_rows, n_slopes))
    hi = np.empty((n_rows, n_slopes))
    for p in range(n_rows):
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


@njit(**_JIT)
def residual_counts(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cs: np.ndarray, lo: np.ndarray,
                    width: np.ndarray, n_bins: int) -> np.ndarray:
    """Histogram counts (items, n_bins) fp64: item i counts ``int((y[rows[i]] − cs[i]·x[rows[i]] − lo[i]) / width[i])``
    (bins from ``lo[i]`` of step ``width[i]``; every index must be below ``n_bins``)."""
    counts = np.zeros((rows.size, n_bins))
    for i in range(rows.size):
        p = rows[i]
        c = cs[i]
        base = lo[i]
        w = width[i]
        for j in range(x.shape[1]):
            r = y[p, j] - c * x[p, j]
            counts[i, int((r - base) / w)] += 1.0
    return counts


@njit(**_JIT)
def window_max(counts: np.ndarray, rows: np.ndarray, n_bins: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Per item i: the largest count of ``length[i]`` consecutive bins of histogram ``counts[rows[i]]`` (its first
    ``n_bins[i]`` bins; windows clipped to them), (items,) fp64."""
    out = np.empty(rows.size)
    for i in range(rows.size):
        nb = n_bins[i]
        span = length[i]
        total = 0.0
        best = 0.0
        for b in range(nb + span - 1):  # windows ending at b
            if b < nb:
                total += counts[rows[i], b]
            if b >= span:
                total -= counts[rows[i], b - span]
            best = max(best, total)
        out[i] = best
    return out


@njit(**_JIT)
def peak_windows(counts: np.ndarray, n_bins: np.ndarray, radius: int, inner: int, factor: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The bins of each histogram (row of ``counts``, ``n_bins[i]`` bins) where its smoothed maximum can be, with
    their neighbours: ``(windows (items, L) fp64, hull (items,))``. Row i of ``windows`` holds the counts of bins
    ``first − radius … last + radius`` (zeros outside the histogram and after its end), ``hull[i] = last − first + 1``.

    A bin b is kept when the counts of the ``2·radius + 1`` bins around it reach ``factor`` times the largest count
    of any ``2·inner + 1`` consecutive bins: the smoothed value at b is at most w₀ times the former, and the
    smoothed maximum at least w₀·factor times the latter when ``factor`` ≤ w_inner / w₀ (Gaussian weights).
    """
    n_items = counts.shape[0]
    first = np.zeros(n_items, dtype=np.int64)
    last = np.zeros(n_items, dtype=np.int64)
    for i in range(n_items):
        nb = n_bins[i]
        prefix = np.zeros(nb + 1)
        for b in range(nb):
            prefix[b + 1] = prefix[b] + counts[i, b]
        best_inner = 0.0
        for b in range(nb):
            best_inner = max(best_inner, prefix[min(nb, b + inner + 1)] - prefix[max(0, b - inner)])
        need = factor * best_inner
        lo_b, hi_b = nb, -1
        for b in range(nb):
            if prefix[min(nb, b + radius + 1)] - prefix[max(0, b - radius)] >= need:
                lo_b = min(lo_b, b)
                hi_b = b
        first[i] = lo_b
        last[i] = hi_b
    hull = last - first + 1
    windows = np.zeros((n_items, int(hull.max()) + 2 * radius))
    for i in range(n_items):
        for q in range(hull[i] + 2 * radius):
            b = first[i] - radius + q
            if 0 <= b < n_bins[i]:
                windows[i, q] = counts[i, b]
    return windows, hull


@njit(**_JIT)
def cumsum_moments(x: np.ndarray, y: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums for the two cumulative-sum fits of every row of ``x``, ``y`` (P, n), ``order`` (P, n) sorting ``x``.

    With xs, ys the sorted row, F₁ = cumsum(ys)·(max − min)/n and F₂ = cumsum(ys²)·(max − min)/n (numpy's
    sequential cumsum, so F equals ``_fit_sorted``'s), and t = off + scl·xs ∈ [−1, 1] (``Polynomial.fit``'s map),
    over the last pair of each group of equal xs: ``(moments (P, 7): Σ t^k for k ≤ 6, rhs (P, 2, 4): Σ t^k F₁ and
    Σ t^k F₂ for k ≤ 3, kept (P,): how many)``. Sums are compensated.
    """
    n_rows, n = x.shape
    moments = np.zeros((n_rows, 7))
    rhs = np.zeros((n_rows, 2, 4))
    kept = np.zeros(n_rows, dtype=np.int64)
    for p in range(n_rows):
        lo = x[p, order[p, 0]]
        hi = x[p, order[p, n - 1]]
        span = hi - lo
        off = (hi * -1.0 - lo * 1.0) / span
        scl = 2.0 / span
        sm = np.zeros(7)
        cm = np.zeros(7)
        sr = np.zeros(8)
        cr = np.zeros(8)
        c1 = 0.0
        c2 = 0.0
        count = 0
        for j in range(n):
            xv = x[p, order[p, j]]
            yv = y[p, order[p, j]]
            c1 += yv
            c2 += yv * yv
            if j < n - 1 and x[p, order[p, j + 1]] == xv:
                continue
            count += 1
            f1 = c1 * span / n
            f2 = c2 * span / n
            t = off + scl * xv
            power = 1.0
            for k in range(7):
                sm[k], cm[k] = _add(sm[k], cm[k], power)
                if k < 4:
                    sr[k], cr[k] = _add(sr[k], cr[k], power * f1)
                    sr[4 + k], cr[4 + k] = _add(sr[4 + k], cr[4 + k], power * f2)
                power *= t
        for k in range(7):
            moments[p, k] = sm[k] + cm[k]
        for k in range(4):
            rhs[p, 0, k] = sr[k] + cr[k]
            rhs[p, 1, k] = sr[4 + k] + cr[4 + k]
        kept[p] = count
    return moments, rhs, kept


@njit(**_JIT)
def stable_ties(x: np.ndarray, order: np.ndarray) -> None:
    """Within each run of equal values of the rows of ``x`` (P, n) sorted by ``order`` (P, n; a sorting
    permutation, any order within runs), put ``order`` in increasing order, in place: the permutation a stable sort
    gives."""
    n_rows, n = x.shape
    for p in range(n_rows):
        j = 0
        while j < n:
            k = j
            while k + 1 < n and x[p, order[p, k + 1]] == x[p, order[p, j]]:
                k += 1
            for a in range(j + 1, k + 1):  # insertion sort of a (short) run
                v = order[p, a]
                b = a - 1
                while b >= j and order[p, b] > v:
                    order[p, b + 1] = order[p, b]
                    b -= 1
                order[p, b + 1] = v
            j = k + 1


@njit("float64(float64[::1], int64, int64)", **_JIT)  # typed: a recursive function called from others
def _pairwise_sum(a: np.ndarray, lo: int, n: int) -> float:
    """``a[lo:lo + n].sum()`` in numpy's order (pairwise, blocks of 128 over 8 accumulators): the same bits."""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        end = n - n % 8
        while i < end:
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(a, lo, half) + _pairwise_sum(a, lo + half, n - half)


@njit(**_JIT)
def _select(a: np.ndarray, lo: int, hi: int, k: int) -> None:
    """Reorder ``a[lo:hi]`` so that ``a[k]`` is its (k − lo)-th smallest, smaller values before it and larger
    after (quickselect, median-of-3 pivot, three-way partition: equal values end the search)."""
    while hi - lo > 1:
        u, v, w = a[lo], a[(lo + hi - 1) // 2], a[hi - 1]
        if u > v:
            u, v = v, u
        if v > w:
            v = w
        if u > v:
            v = u
        lt, i, gt = lo, lo, hi - 1
        while i <= gt:
            t = a[i]
            if t < v:
                a[i] = a[lt]
                a[lt] = t
                lt += 1
                i += 1
            elif t > v:
                a[i] = a[gt]
                a[gt] = t
                gt -= 1
            else:
                i += 1
        if k < lt:
            hi = lt
        elif k > gt:
            lo = gt + 1
        else:
            return


@njit(**_JIT)
def residual_spread(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cs: np.ndarray, ks: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per item i, of r = ``y[rows[i]] − cs[i]·x[rows[i]]``: ``(std (items,), order (items, len(ks)))``, the
    standard deviation as ``r.std()`` computes it (pairwise mean, pairwise sum of squared deviations: the same
    bits) and the order statistics of ranks ``ks`` (non-decreasing)."""
    n = x.shape[1]
    std = np.empty(rows.size)
    order = np.empty((rows.size, ks.size))
    r = np.empty(n)
    d = np.empty(n)
    for i in range(rows.size):
        p = rows[i]
        c = cs[i]
        for j in range(n):
            r[j] = y[p, j] - c * x[p, j]
        mean = _pairwise_sum(r, 0, n) / n
        for j in range(n):
            v = r[j] - mean
            d[j] = v * v
        std[i] = np.sqrt(_pairwise_sum(d, 0, n) / n)
        prev = -1  # r[prev + 1:] holds the values of rank > prev
        for q in range(ks.size):
            k = ks[q]
            if k == prev + 1 and prev >= 0:  # the smallest of what follows the previous rank
                m = k
                for j in range(k + 1, n):
                    if r[j] < r[m]:
                        m = j
                r[k], r[m] = r[m], r[k]
            elif k > prev:
                _select(r, prev + 1, n, k)
            order[i, q] = r[k]
            prev = k
    return std, order
