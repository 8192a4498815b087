"""Numba CPU kernels for the Clauset xmin scan of a continuous power law (definitions in ``powerlaw.py``).

Every candidate ``i`` of an ascending sample ``x`` (length N) has tail size ``n = N - i``, exponent
``alpha_i = 1 + (n - bias) / S_i`` with ``S_i = sum_{j>=i} ln(x_j / x_i)`` and KS distance
``D_i = max_{j in pts, j>=i} |F_i(x_j) - (j-i)/n|`` (the lower empirical CDF step) with the model CDF
``F_i(x) = (1 - (x/x_i)^(1-alpha_i)) / (1 - (xmax/x_i)^(1-alpha_i))``; ``xmax = inf`` (default) makes the
denominator exactly 1, a finite ``xmax`` is powerlaw 1.5's KS normalization of a fit with an upper bound.

The scan is exact but pruned: a candidate is abandoned as soon as one deviation exceeds the best D known
to the thread (it then cannot be the argmin), likely winners are visited first (a coarse pass, then the
neighbourhood of its best), and each candidate is first probed where its neighbour deviated most.
Abandoned candidates get ``D = inf``; all others get their exact D, so ``np.argmin`` over the result is
the first argmin of the unpruned scan. One scan is serial (after pruning it costs about as much as its
first candidates, so threads do not pay); ``best_of_ragged`` spreads many samples (``fit_many``, bootstrap
replicates) over the threads.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, error_model="numpy", nogil=True)


@njit(**_JIT)
def tail_log_sums(x: np.ndarray) -> np.ndarray:
    """``S_i = sum_{j>=i} ln(x_j/x_i)`` for ascending positive ``x`` (N,), by a recursion of non-negative terms."""
    N = x.size
    S = np.zeros(N)
    for i in range(N - 2, -1, -1):
        S[i] = S[i + 1] + (N - 1 - i) * math.log(x[i + 1] / x[i])
    return S


@njit(**_JIT)
def layout(x: np.ndarray, unique: bool, fixed: bool, lo_val: float, hi_val: float, min_tail: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate indices, ECDF point indices and each index's position among the points.

    ``unique=False`` (WeightWatcher): every index but the last is a candidate and a point.
    ``unique=True`` (powerlaw 1.5): first occurrences of distinct values are candidates and points,
    and the largest distinct value inside ``[lo_val, hi_val]`` is dropped.
    ``fixed=True``: the single candidate is the first index with ``x >= lo_val``.
    Candidates lie in ``[lo_val, hi_val]`` and have a tail of at least ``min_tail`` values.
    """
    N = x.size
    first = np.ones(N, dtype=np.bool_)
    if unique:
        for j in range(1, N):
            first[j] = x[j] != x[j - 1]
    npts = 0
    for j in range(N):
        if first[j]:
            npts += 1
    pts = np.empty(npts, dtype=np.int64)
    pos = np.full(N, -1, dtype=np.int64)
    p = 0
    for j in range(N):
        if first[j]:
            pts[p] = j
            pos[j] = p
            p += 1
    keep = np.zeros(N, dtype=np.bool_)
    if fixed:
        for j in range(N - 1):
            if x[j] >= lo_val:
                if first[j]:
                    keep[j] = True
                break
    else:
        last = -1
        for j in range(N):
            if first[j] and x[j] >= lo_val and x[j] <= hi_val:
                keep[j] = True
                last = j
        if unique:
            if last >= 0:
                keep[last] = False
        else:
            keep[N - 1] = False
    ncand = 0
    for j in range(N):
        if keep[j] and N - j >= min_tail and N - j >= 2:
            ncand += 1
    cand = np.empty(ncand, dtype=np.int64)
    c = 0
    for j in range(N):
        if keep[j] and N - j >= min_tail and N - j >= 2:
            cand[c] = j
            c += 1
    return cand, pts, pos


_MARGIN = 1e-14
"""Slack for rounding when bounding a deviation between two evaluated points (deviations are at most 1)."""
_STACK = 64


@njit(**_JIT)
def _visit(x, pts, p, i, xi, e, norm, n, F, m, at):
    """The running maximum deviation ``m`` and its position ``at``, updated with ``|F_i(x_j) - (j-i)/n|`` at
    ECDF point ``p`` (``j = pts[p]``); stores ``F_i(x_j)`` in ``F[p]``."""
    j = pts[p]
    F[p] = (1.0 - (x[j] / xi) ** e) / norm
    d = abs(F[p] - (j - i) / n)
    return (d, p) if d > m else (m, at)


@njit(**_JIT)
def _ks(x, pts, p0, i, alpha, limit, probe, F, stack_a, stack_b, xmax_val):
    """(D, position of its max) for candidate ``i``, or (inf, position) once a deviation exceeds ``limit``.

    The signed deviation ``F(x) - k/n`` is evaluated on a coarse grid of points; between two evaluated
    points ``a < b`` monotonicity bounds it by ``max(F_b - k_a/n, k_b/n - F_a)``, so an interval whose bound
    cannot raise the running maximum is skipped and the others are bisected down to single points. The
    result is the exact maximum. ``F`` is scratch of length ``pts.size``; ``stack_a``/``stack_b`` of ``_STACK``.
    """
    if not alpha > 1.0:
        return 1.0, p0
    n = float(x.size - i)
    e = 1.0 - alpha
    xi = x[i]
    norm = 1.0 - (xmax_val / xi) ** e  # exactly 1.0 for xmax_val = inf
    last = pts.size - 1
    m = 0.0
    at = p0
    if probe > p0 and probe <= last:
        m, at = _visit(x, pts, probe, i, xi, e, norm, n, F, 0.0, probe)
        if m > limit:
            return np.inf, probe
    span = last - p0
    step = int(0.5 * limit * n) if limit < 1.0 else int(math.sqrt(span))
    step = max(1, min(step, span))
    p = p0
    while True:  # coarse grid p0, p0+step, ..., last
        m, at = _visit(x, pts, p, i, xi, e, norm, n, F, m, at)
        if m > limit:
            return np.inf, p
        if p == last:
            break
        p = min(p + step, last)
    if step == 1:
        return m, at
    a = p0
    while a < last:
        b = min(a + step, last)
        top = 1
        stack_a[0] = a
        stack_b[0] = b
        while top > 0:
            top -= 1
            lo = stack_a[top]
            hi = stack_b[top]
            if hi - lo < 2:
                continue
            bound = max(F[hi] - (pts[lo] - i) / n, (pts[hi] - i) / n - F[lo])
            if bound + _MARGIN <= m:
                continue
            mid = (lo + hi) // 2
            m, at = _visit(x, pts, mid, i, xi, e, norm, n, F, m, at)
            if m > limit:
                return np.inf, mid
            stack_a[top] = lo
            stack_b[top] = mid
            stack_a[top + 1] = mid
            stack_b[top + 1] = hi
            top += 2
        a = b
    return m, at


@njit(**_JIT)
def _sweep(x, cand, pts, pos, alphas, Ds, done, c0, c1, stride, limit, probe, xmax_val):
    """Evaluate candidates ``c0, c0+stride, ... < c1`` not yet done, pruned against a running best."""
    F = np.empty(pts.size)
    stack_a = np.empty(_STACK, dtype=np.int64)
    stack_b = np.empty(_STACK, dtype=np.int64)
    for c in range(c0, c1, stride):
        if done[c]:
            continue
        i = cand[c]
        D, at = _ks(x, pts, pos[i], i, alphas[c], limit, probe, F, stack_a, stack_b, xmax_val)
        Ds[c] = D
        done[c] = True
        probe = at
        if D < limit:
            limit = D
    return limit, probe


@njit(**_JIT)
def _prime(x, cand, pts, pos, S, bias, alphas, Ds, done, xmax_val):
    """Alphas of all candidates, then a coarse pass and its best's neighbourhood; returns (best D, probe)."""
    N = x.size
    nc = cand.size
    for c in range(nc):
        i = cand[c]
        alphas[c] = 1.0 + (N - i - bias) / S[i]
    step = max(1, int(math.sqrt(nc)))
    limit, probe = _sweep(x, cand, pts, pos, alphas, Ds, done, 0, nc, step, np.inf, -1, xmax_val)
    cb = 0
    for c in range(0, nc, step):
        if Ds[c] < Ds[cb]:
            cb = c
    limit, probe = _sweep(x, cand, pts, pos, alphas, Ds, done, max(0, cb - step), min(nc, cb + step + 1), 1,
                          limit, probe, xmax_val)
    return limit, probe


@njit(**_JIT)
def scan_serial(x: np.ndarray, cand: np.ndarray, pts: np.ndarray, pos: np.ndarray, S: np.ndarray, bias: float,
                xmax_val: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, Ds) over the candidates ``cand``; pruned candidates have ``D = inf``. One thread.

    ``xmax_val``: the upper bound of powerlaw 1.5's KS normalization (``inf``: none)."""
    nc = cand.size
    alphas = np.empty(nc)
    Ds = np.full(nc, np.inf)
    done = np.zeros(nc, dtype=np.bool_)
    limit, probe = _prime(x, cand, pts, pos, S, bias, alphas, Ds, done, xmax_val)
    _sweep(x, cand, pts, pos, alphas, Ds, done, 0, nc, 1, limit, probe, xmax_val)
    return alphas, Ds


@njit(**_JIT)
def best_of(x: np.ndarray, unique: bool, fixed: bool, lo_val: float, hi_val: float, min_tail: int, bias: float,
            xmax_val: float = np.inf) -> tuple[int, float, float]:
    """(index of xmin, alpha, D) of the scan of ascending ``x`` (options as in ``layout``); index -1 if none.

    ``xmax_val``: as in ``scan_serial``, or NaN for the largest value of ``x``."""
    cand, pts, pos = layout(x, unique, fixed, lo_val, hi_val, min_tail)
    if cand.size == 0:
        return -1, np.nan, np.nan
    if math.isnan(xmax_val):  # WeightWatcher's xmax='force': the sample's largest value
        xmax_val = x[x.size - 1]
    alphas, Ds = scan_serial(x, cand, pts, pos, tail_log_sums(x), bias, xmax_val)
    c = np.argmin(Ds)
    return cand[c], alphas[c], Ds[c]


@njit(parallel=True, **_JIT)
def best_of_ragged(values: np.ndarray, offsets: np.ndarray, unique: bool, fixed: bool, lo_val: float, hi_val: float,
                   min_tail: int, bias: float, xmax_val: float = np.inf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``best_of`` for every sample ``values[offsets[b]:offsets[b+1]]`` (each ascending), samples over threads.

    Returns (index of xmin within its sample or -1, alpha, D), arrays of length ``offsets.size - 1``.
    """
    B = offsets.size - 1
    idx = np.full(B, -1, dtype=np.int64)
    alpha = np.full(B, np.nan)
    D = np.full(B, np.nan)
    for b in prange(B):
        idx[b], alpha[b], D[b] = best_of(values[offsets[b]:offsets[b + 1]], unique, fixed, lo_val, hi_val,
                                         min_tail, bias, xmax_val)
    return idx, alpha, D
