"""Distance of weights from their initial values (paper 001, Eq. 3 and Appendix B). Arrays in, numbers out."""
from __future__ import annotations

import numpy as np


def rmsd(w0: np.ndarray, wt: np.ndarray) -> float:
    """Root-mean-square distance sqrt(mean_j (wt_j - w0_j)^2) over all weights (paper 001 Eq. 3), in weight units.

    ``w0`` and ``wt`` are any arrays of the same shape (flattened); computed in fp64.
    """
    a = np.asarray(w0, dtype=np.float64).ravel()
    b = np.asarray(wt, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"rmsd: shapes differ ({np.shape(w0)} vs {np.shape(wt)})")
    if a.size == 0:
        return float("nan")
    d = b - a
    return float(np.sqrt(np.dot(d, d) / d.size))


def _pairs(wi: np.ndarray, wf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(wi, dtype=np.float64).ravel()
    y = np.asarray(wf, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"w_i and w_f differ in size ({x.size} vs {y.size})")
    ok = np.isfinite(x) & np.isfinite(y)
    return (x, y) if ok.all() else (x[ok], y[ok])


def cumsum_fit(wi: np.ndarray, values: np.ndarray, degree: int) -> np.ndarray:
    """Coefficients ``(c_0 .. c_{degree-1})`` of ⟨values⟩(w_i) = Σ_k c_k w_i^k by the cumulative-sum method.

    Paper 001 Appendix B: order the pairs by w_i, form F(w) = (max w_i − min w_i)/N · Σ_{j: w_i,j ≤ w} values_j
    (Eq. B.2/B.3; ties in w_i take the sum over the whole tie group), fit a polynomial of ``degree`` to F at the
    distinct w_i (least squares, ``numpy.polynomial.Polynomial.fit``) and differentiate it. The scale factor
    turns the sum into ∫⟨values⟩ dw when w_i is uniform on [min, max] (Glorot-uniform init, Eq. 1); for other
    initial distributions the coefficients estimate ⟨values⟩·p(w_i)·(max − min) instead. NaN with fewer than
    ``degree + 1`` distinct w_i.
    """
    x, v = _pairs(wi, values)
    order = np.argsort(x, kind="stable")
    return _fit_sorted(x[order], v[order], degree)


def _fit_sorted(xs: np.ndarray, vs: np.ndarray, degree: int) -> np.ndarray:
    """``cumsum_fit`` on pairs already sorted by w_i."""
    n = xs.size
    cs = np.cumsum(vs)
    last = np.r_[xs[1:] != xs[:-1], True] if n else np.zeros(0, dtype=bool)
    xs, cs = xs[last], cs[last]
    if xs.size < degree + 1:
        return np.full(degree, np.nan)
    F = cs * (xs[-1] - xs[0]) / n
    poly = np.polynomial.Polynomial.fit(xs, F, degree).convert().deriv()
    coef = np.zeros(degree)
    coef[: poly.coef.size] = poly.coef
    return coef


def cumsum_linear_fit(wi: np.ndarray, wf: np.ndarray) -> tuple[float, float]:
    """``(a0, a1)`` of the mean ⟨w_f⟩(w_i) = a0 + a1·w_i (paper 001 Eqs. B.1–B.2: 2nd-degree fit of the cumsum)."""
    a0, a1 = cumsum_fit(wi, wf, 2)
    return float(a0), float(a1)


def cumsum_second_moment_fit(wi: np.ndarray, wf: np.ndarray) -> tuple[float, float, float]:
    """``(b0, b1, b2)`` of ⟨w_f²⟩(w_i) = b0 + b1·w_i + b2·w_i² (paper 001 Eq. B.3: 3rd-degree fit of the cumsum)."""
    b0, b1, b2 = cumsum_fit(wi, np.square(np.asarray(wf, dtype=np.float64)), 3)
    return float(b0), float(b1), float(b2)


def _sigma(a: tuple[float, float], b: tuple[float, float, float], x: float) -> float:
    var = b[0] + b[1] * x + b[2] * x * x - (a[0] + a[1] * x) ** 2
    return float(np.sqrt(var)) if var >= 0 else float("nan")


def sigma_at(wi: np.ndarray, wf: np.ndarray, x: float = 0.0) -> float:
    """σ_wf(x) = sqrt(⟨w_f²⟩(x) − ⟨w_f⟩(x)²) from the two cumulative-sum fits (paper 001 Eq. B.4), weight units.

    NaN when the fitted variance at ``x`` is negative (fit noise when the spread is far below the fit's error).
    """
    return _sigma(cumsum_linear_fit(wi, wf), cumsum_second_moment_fit(wi, wf), x)


#: Default coarse grid of slopes searched by ``peak_slope``.
C_GRID = np.linspace(-1.0, 3.0, 81)
#: ``peak_slope`` runs its coarse grid on a seeded subsample of this many pairs; refinements use every pair.
COARSE_MAX_PAIRS = 200_000
#: Largest (slopes × pairs) block of residuals w_f − c·w_i, and (slopes × bins) block of counts, made at once.
BLOCK_ELEMENTS = 1 << 22
#: Most bins of one slope's residual histogram in ``peak_slope`` (the bin step grows beyond that).
MAX_BINS = 1 << 16
#: ``peak_slope``'s bandwidth rule picks its most concentrated slope on a seeded subsample of this many pairs.
SCALE_PAIRS = 2_000


def _residual_blocks(x: np.ndarray, y: np.ndarray, cs: np.ndarray):
    """``(slice of cs, residuals y − c·x for those c, shape (k, n))`` in blocks of at most ``BLOCK_ELEMENTS``."""
    step = max(1, BLOCK_ELEMENTS // max(x.size, MAX_BINS))
    for start in range(0, cs.size, step):
        yield slice(start, start + step), y - cs[start:start + step, None] * x


def _scales(x: np.ndarray, y: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Silverman's robust scale min(std, IQR/1.349) of w_f − c·w_i for each c of ``cs`` (std where IQR is 0)."""
    scales = np.empty(cs.size)
    for rows, rc in _residual_blocks(x, y, cs):
        q25, q75 = np.quantile(rc, (0.25, 0.75), axis=1)
        std = rc.std(axis=1)
        robust = np.minimum(std, (q75 - q25) / 1.349)
        scales[rows] = np.where(robust > 0, robust, std)
    return scales


def _bandwidth(x: np.ndarray, y: np.ndarray, c_grid: np.ndarray, rng: np.random.Generator) -> float:
    """Common smoothing width for all c: Silverman's robust rule (for all x.size pairs) at the c where w_f − c·w_i is
    most concentrated. That c is found on a seeded subsample of ``SCALE_PAIRS`` pairs (quartiles of every slope
    are the costly part); its scale is then measured on at most 100k pairs."""
    n = x.size
    if n > 100_000:
        idx = rng.choice(x.size, 100_000, replace=False)
        x, y = x[idx], y[idx]
    if x.size > SCALE_PAIRS:
        sub = rng.choice(x.size, SCALE_PAIRS, replace=False)
        c_grid = c_grid[[int(np.argmin(_scales(x[sub], y[sub], c_grid)))]]
    s = _scales(x, y, c_grid).min()
    return 0.9 * s * n ** -0.2 if s > 0 else 0.0


def _peak_densities(x: np.ndarray, y: np.ndarray, cs: np.ndarray, h: float, upsample: int = 4) -> np.ndarray:
    """For each c of ``cs``: the maximum of the Gaussian KDE (bandwidth h) of r = y − c·x (1/weight units).

    The KDE is binned: counts on bins of step h/upsample from min(r) (coarser where a slope's residuals would
    need more than ``MAX_BINS`` bins; one step for all c of a block), smoothed by a Gaussian of width h. A slope
    whose residuals are all equal gets ``inf``.
    """
    from scipy.ndimage import gaussian_filter1d

    peaks = np.empty(cs.size)
    for rows, r in _residual_blocks(x, y, cs):
        lo = r.min(axis=1, keepdims=True)
        span = r.max(axis=1) - lo[:, 0]
        width = max(h / upsample, float(span.max()) / MAX_BINS)
        nbins = int(np.ceil(span.max() / width)) + 1
        index = ((r - lo) / width).astype(np.intp)
        index += np.arange(r.shape[0])[:, None] * nbins
        counts = np.bincount(index.ravel(), minlength=r.shape[0] * nbins).reshape(r.shape[0], nbins)
        smooth = gaussian_filter1d(counts.astype(np.float64), sigma=h / width, axis=1, mode="constant",
                                   truncate=4.0)
        peaks[rows] = np.where(span > 0, smooth.max(axis=1) / (x.size * width), np.inf)
    return peaks


def peak_slope(wi: np.ndarray, wf: np.ndarray, *, c_grid: np.ndarray | None = None, refine: bool = True,
               bandwidth: float | None = None, levels: int = 2, seed: int = 0) -> tuple[float, float]:
    """Slope ``c_opt`` of the line through the peaks of P(w_f | w_i) (paper 001 Eqs. B.5–B.6), with its resolution.

    dN_c(b)/db is N times the density of r = w_f − c·w_i at b, so B.6 maximises over c the peak height of that
    density. The density is a Gaussian KDE binned on a grid of step h/4 (``bandwidth`` h, the same for every c;
    default: Silverman's robust rule at the most concentrated c of the coarse grid). c is searched on ``c_grid``
    (default ``C_GRID``: −1 … 3 step 0.05; on a seeded subsample of ``COARSE_MAX_PAIRS`` pairs for larger inputs)
    and, with ``refine``, ``levels`` times on 21 points spanning ±1 step around the best c using every pair, each
    dividing the step by 10. Returns ``(c_opt, resolution)``: the resolution is the larger
    of the last grid step (0.0005 by default) and h / (max w_i − min w_i), the slope change that moves the line by
    one bandwidth across the whole w_i range (slopes closer than that are not told apart by the smoothed peak).
    NaN when fewer than 3 finite pairs.
    """
    x, y = _pairs(wi, wf)
    grid = np.asarray(C_GRID if c_grid is None else c_grid, dtype=np.float64)
    if x.size < 3 or grid.size == 0:
        return float("nan"), float("nan")
    step = float(np.min(np.diff(np.sort(grid)))) if grid.size > 1 else 0.0
    h = _bandwidth(x, y, grid, np.random.default_rng(seed)) if bandwidth is None else float(bandwidth)
    if h <= 0:
        h = max(np.ptp(y), np.ptp(x), 1e-12) * 1e-3

    def best(cs: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
        return float(cs[int(np.argmax(_peak_densities(u, v, cs, h)))])

    sub = (np.random.default_rng(seed).choice(x.size, COARSE_MAX_PAIRS, replace=False)
           if x.size > COARSE_MAX_PAIRS else slice(None))
    c = best(grid, x[sub], y[sub])
    for _ in range(levels if refine and step > 0 else 0):
        c = best(np.linspace(c - step, c + step, 21), x, y)
        step /= 10
    return c, max(step, h / float(np.ptp(x))) if np.ptp(x) > 0 else float("nan")


def joint_histogram(wi: np.ndarray, wf: np.ndarray, bins: int | tuple[int, int] = 100
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D histogram of the pairs (paper 001 Fig. 3): ``(H (bx, by) float64, xedges (w_i), yedges (w_f))``."""
    x, y = _pairs(wi, wf)
    H, xe, ye = np.histogram2d(x, y, bins=bins)
    return H, xe, ye


def conditional_quantiles(wi: np.ndarray, wf: np.ndarray, bins: int = 50,
                          q: tuple[float, ...] = (0.25, 0.5, 0.75)) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles of w_f within equal-width bins of w_i (median and interquartile band of paper 001 Fig. 3).

    Returns ``(centers (bins,), Q (bins, len(q)))``; rows of empty bins are NaN.
    """
    x, y = _pairs(wi, wf)
    edges = np.histogram_bin_edges(x, bins=bins)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    order = np.argsort(which, kind="stable")
    starts = np.searchsorted(which[order], np.arange(bins + 1))
    ys = y[order]
    Q = np.full((bins, len(q)), np.nan)
    for k in range(bins):
        seg = ys[starts[k]:starts[k + 1]]
        if seg.size:
            Q[k] = np.quantile(seg, q)
    return 0.5 * (edges[:-1] + edges[1:]), Q


def drift_stats(wi: np.ndarray, wf: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """All distance-from-init statistics of one set of pairs: ``rmsd, a0, a1, b0, b1, b2, sigma_at_0, c_opt,
    c_opt_resolution`` (weight units; slopes dimensionless). Non-finite pairs are dropped.

    The one-pair reference of ``drift_stats_many`` (which gives the same numbers for stacks of pairs)."""
    x, y = _pairs(wi, wf)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    a = tuple(float(v) for v in _fit_sorted(xs, ys, 2))
    b = tuple(float(v) for v in _fit_sorted(xs, ys * ys, 3))
    c_opt, res = peak_slope(x, y, seed=seed)
    return {"rmsd": rmsd(x, y), "a0": a[0], "a1": a[1], "b0": b[0], "b1": b[1], "b2": b[2],
            "sigma_at_0": _sigma(a, b, 0.0), "c_opt": c_opt, "c_opt_resolution": res}


# ---- many pairs of one size at once ------------------------------------------------------------------------------

#: Keys of ``drift_stats`` and ``drift_stats_many``, in order.
STATS = ("rmsd", "a0", "a1", "b0", "b1", "b2", "sigma_at_0", "c_opt", "c_opt_resolution")
#: ``drift_stats_many`` solves a fit by its normal equations when their column-scaled matrix has at most this
#: condition number (errors ≲ 1e-13 of the coefficients' scale), else it falls back to ``Polynomial.fit``.
FIT_MAX_COND = 1e6


def drift_stats_many(wi: np.ndarray, wf: np.ndarray, *, seed: int = 0, with_rmsd: bool = True
                     ) -> dict[str, np.ndarray]:
    """``drift_stats`` of every row of ``wi``, ``wf`` (P, n): the same keys, each an array (P,) (``rmsd`` NaN
    without ``with_rmsd``, for callers that measure it over more weights than they fit).

    Rows are independent and get ``drift_stats``'s numbers: c_opt and its resolution bit for bit (the same
    residuals, bins, smoothing and argmax, many rows and slopes per call), rmsd bit for bit; the cumulative-sum
    fits solve their normal equations in ``Polynomial.fit``'s scaled variable instead of an SVD least squares
    (≲ 1e-12 of each fit's size on the data apart). Rows with non-finite values, or fewer than 3 pairs, go
    through ``drift_stats`` itself.
    """
    x = np.asarray(wi, dtype=np.float64)
    y = np.asarray(wf, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"drift_stats_many: w_i and w_f must be (P, n) arrays of one shape, got "
                         f"{np.shape(wi)} and {np.shape(wf)}")
    out = {key: np.full(x.shape[0], np.nan) for key in STATS}
    fast = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1) & (x.shape[1] >= 3)
    for p in np.flatnonzero(~fast):
        for key, value in drift_stats(x[p], y[p], seed=seed).items():
            out[key][p] = value
    if not fast.any():
        return out
    x, y = np.ascontiguousarray(x[fast]), np.ascontiguousarray(y[fast])
    rms = np.array([rmsd(a, b) for a, b in zip(x, y)]) if with_rmsd else np.full(x.shape[0], np.nan)
    a, b = _fits_many(x, y)
    c_opt, res = peak_slope_many(x, y, seed=seed)
    var = b[:, 0] + b[:, 1] * 0.0 + b[:, 2] * 0.0 * 0.0 - (a[:, 0] + a[:, 1] * 0.0) ** 2  # _sigma(a, b, 0.0)
    with np.errstate(invalid="ignore"):
        sigma = np.where(var >= 0, np.sqrt(np.where(var >= 0, var, 0.0)), np.nan)
    for key, value in zip(STATS, (rms, a[:, 0], a[:, 1], b[:, 0], b[:, 1], b[:, 2], sigma, c_opt, res)):
        out[key][fast] = value
    return out


def _fits_many(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two cumulative-sum fits of ``drift_stats`` for every row of ``x``, ``y`` (P, n), finite:
    ``(a (P, 2), b (P, 3))``, as ``_fit_sorted(xs, ys, 2)`` and ``_fit_sorted(xs, ys², 3)``.

    The cumulative sums at the distinct w_i are the reference's; they are fitted in ``Polynomial.fit``'s variable
    t = off + scl·w_i ∈ [−1, 1] by the normal equations of the column-scaled Vandermonde matrix (compensated
    moments, ``drift_numba.cumsum_moments``; condition number ≲ 30 for spread-out w_i), then differentiated and
    expanded in w_i. Rows whose scaled normal matrix is worse conditioned than ``FIT_MAX_COND`` are fitted by
    ``_fit_sorted``. NaN rows: fewer than degree + 1 distinct w_i.
    """
    from zooscope.kernels import drift_numba

    order = np.argsort(x, axis=1)
    drift_numba.stable_ties(x, order)  # ties in their original order, as the reference's stable sort
    moments, rhs, kept = drift_numba.cumsum_moments(x, y, order)
    lo, hi = np.take_along_axis(x, order[:, [0, -1]], axis=1).T
    with np.errstate(divide="ignore", invalid="ignore"):  # constant rows are not fitted
        off, scl = (hi * -1.0 - lo * 1.0) / (hi - lo), 2.0 / (hi - lo)  # polyutils.mapparms(domain, [-1, 1])
    out = []
    for which, degree in ((0, 2), (1, 3)):
        coef = np.full((x.shape[0], degree), np.nan)
        idx = np.arange(degree + 1)
        ok = np.flatnonzero(kept >= degree + 1)
        norm = np.sqrt(moments[ok][:, 2 * idx])
        Gs = moments[ok][:, idx[:, None] + idx[None, :]] / (norm[:, :, None] * norm[:, None, :])
        good = np.linalg.cond(Gs) <= FIT_MAX_COND if ok.size else np.zeros(0, dtype=bool)
        c = np.linalg.solve(Gs[good], (rhs[ok[good], which, : degree + 1] / norm[good])[..., None])[..., 0]
        c /= norm[good]
        o, s = off[ok[good]], scl[ok[good]]
        if degree == 2:  # d/dw of c0 + c1 t + c2 t², t = o + s·w
            coef[ok[good]] = np.stack([s * (c[:, 1] + 2 * c[:, 2] * o), 2 * c[:, 2] * s * s], axis=1)
        else:
            coef[ok[good]] = np.stack([s * (c[:, 1] + 2 * c[:, 2] * o + 3 * c[:, 3] * o * o),
                                       s * s * (2 * c[:, 2] + 6 * c[:, 3] * o), 3 * c[:, 3] * s * s * s], axis=1)
        for r in ok[~good]:
            xs, ys = x[r, order[r]], y[r, order[r]]
            coef[r] = _fit_sorted(xs, ys if degree == 2 else ys * ys, degree)
        out.append(coef)
    return out[0], out[1]


def peak_slope_many(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``peak_slope`` (default grid, refinements and bandwidth) of every row of ``x``, ``y`` (P, n), finite fp64,
    n ≥ 3: ``(c_opt (P,), resolution (P,))``, equal to ``peak_slope``'s bit for bit.

    Rows of one size draw the same seeded subsamples, so every step is one call over all rows and slopes. What
    cannot change the result is skipped: slopes whose bandwidth scale is bounded above the best
    (``_min_scale_many``), histograms and smoothing of slopes whose peak is bounded below the best, and the bins
    of a histogram away from its maximum (``_best_slopes_many``); what is computed is the reference's arithmetic.
    """
    n = x.shape[1]
    grid = C_GRID
    step = float(np.min(np.diff(np.sort(grid))))
    h = _bandwidth_many(x, y, grid, np.random.default_rng(seed))
    fallback = np.maximum(np.maximum(np.ptp(y, axis=1), np.ptp(x, axis=1)), 1e-12) * 1e-3
    h = np.where(h <= 0, fallback, h)
    sub = (np.random.default_rng(seed).choice(n, COARSE_MAX_PAIRS, replace=False)
           if n > COARSE_MAX_PAIRS else slice(None))
    xc, yc = np.ascontiguousarray(x[:, sub]), np.ascontiguousarray(y[:, sub])
    cs = np.broadcast_to(grid, (x.shape[0], grid.size))
    c = cs[0][_best_slopes_many(xc, yc, cs, h)]
    del xc, yc
    for _ in range(2):
        cs = np.linspace(c - step, c + step, 21, axis=-1)
        c = np.take_along_axis(cs, _best_slopes_many(x, y, cs, h)[:, None], axis=1)[:, 0]
        step /= 10
    span = np.ptp(x, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.where(span > 0, np.maximum(step, h / span), np.nan)
    return c, res


def _scale_items(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, robust)`` of the residuals ``y[rows[i]] − cs[i]·x[rows[i]]`` per item i: ``_scales``' value and
    min(std, IQR/1.349) before its zero-IQR fallback, bit for bit: ``drift_numba.residual_spread`` gives numpy's
    std and the order statistics around both quartiles, and numpy's own interpolation (``np.quantile`` of the two
    neighbours at the fractional rank) makes the quartiles."""
    from zooscope.kernels import drift_numba

    n = x.shape[1]
    ranks, gammas = [], []
    for q in (0.25, 0.75):  # np.quantile's 'linear' method: rank (n − 1)·q
        virtual = (n - 1) * q
        below = int(np.floor(virtual))
        ranks += [below, min(below + 1, n - 1)]
        gammas.append(virtual - below)
    std, order = drift_numba.residual_spread(x, y, rows, np.ascontiguousarray(cs, dtype=np.float64),
                                             np.array(ranks, dtype=np.int64))
    q25 = np.quantile(order[:, :2].T, gammas[0], axis=0)
    q75 = np.quantile(order[:, 2:].T, gammas[1], axis=0)
    robust = np.minimum(std, (q75 - q25) / 1.349)
    return np.where(robust > 0, robust, std), robust


def _min_scale_many(x: np.ndarray, y: np.ndarray, grid: np.ndarray, stride: int = 8, per_round: int = 2
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(first argmin, min)`` over the slopes ``grid`` (K,) of ``_scales(x[p], y[p], grid)``, per row p of ``x``,
    ``y`` (P, n): (P,) each, equal to the reference's.

    Moving c by Δ moves every residual by at most |Δ|·max|w_i|, so the quartiles by as much and the IQR by twice
    that, and the std by at most |Δ|·std(w_i): the robust scale at c' is at least robust(c) − L·|c − c'| with
    L = max(std(w_i), 2·max|w_i|/1.349), and a slope's scale is at least its robust scale. Every ``stride``-th
    slope is measured first; then, round by round, each row's ``per_round`` unmeasured slopes of lowest bound,
    while that bound (less a 1e-9 relative margin for rounding) does not exceed the row's best measured scale.
    A slope never measured cannot be the minimum nor tie it.
    """
    n_rows = x.shape[0]
    lipschitz = np.maximum(x.std(axis=1), 2 * np.abs(x).max(axis=1) / 1.349)
    gaps = np.diff(grid)
    if np.any(gaps <= 0):
        raise ValueError("_min_scale_many: the slope grid must be increasing")
    margin = 1e-9 * lipschitz * (grid[-1] - grid[0])
    scale = np.full((n_rows, grid.size), np.inf)
    robust = np.full((n_rows, grid.size), np.nan)
    todo = np.zeros((n_rows, grid.size), dtype=bool)
    todo[:, ::stride] = True
    todo[:, -1] = True
    while todo.any():
        rows, ks = np.nonzero(todo)
        scale[rows, ks], robust[rows, ks] = _scale_items(x, y, rows, grid[ks])
        seen = np.isfinite(scale)
        lower = _cone_envelope(np.where(seen, robust, -np.inf), lipschitz, gaps)
        lower -= margin[:, None] + 1e-9 * np.nanmax(np.abs(np.where(seen, robust, np.nan)), axis=1)[:, None]
        lower[seen] = np.inf
        rank = np.argsort(lower, axis=1, kind="stable")[:, :per_round]
        todo = np.zeros_like(todo)
        np.put_along_axis(todo, rank, np.take_along_axis(lower, rank, axis=1) <= scale.min(axis=1)[:, None], axis=1)
    k = np.argmin(scale, axis=1)
    return k, scale[np.arange(n_rows), k]


def _cone_envelope(a: np.ndarray, slope: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """max_j (a[:, j] − slope·|c_k − c_j|) for every k (rows of ``a`` (P, K), ``slope`` (P,), grid steps ``gaps``
    (K − 1,)): a left and a right sweep."""
    left, right = a.copy(), a.copy()
    for k in range(1, a.shape[1]):
        left[:, k] = np.maximum(left[:, k], left[:, k - 1] - slope * gaps[k - 1])
        j = a.shape[1] - 1 - k
        right[:, j] = np.maximum(right[:, j], right[:, j + 1] - slope * gaps[j])
    return np.maximum(left, right)


def _bandwidth_many(x: np.ndarray, y: np.ndarray, grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``_bandwidth`` of every row of ``x``, ``y`` (P, n) (one size, so one set of seeded subsamples): (P,)."""
    n = x.shape[1]
    if n > 100_000:
        idx = rng.choice(n, 100_000, replace=False)
        x, y = x[:, idx], y[:, idx]
    if x.shape[1] > SCALE_PAIRS:
        sub = rng.choice(x.shape[1], SCALE_PAIRS, replace=False)
        k, _ = _min_scale_many(np.ascontiguousarray(x[:, sub]), np.ascontiguousarray(y[:, sub]), grid)
        s, _ = _scale_items(x, y, np.arange(x.shape[0]), grid[k])
    else:
        _, s = _min_scale_many(x, y, grid)
    return np.where(s > 0, 0.9 * s * n ** -0.2, 0.0)


def _best_slopes_many(x: np.ndarray, y: np.ndarray, cs: np.ndarray, h: np.ndarray, upsample: int = 4
                      ) -> np.ndarray:
    """Index of the first maximum of ``_peak_densities(x[p], y[p], cs[p], h[p])`` for every row p of ``x``, ``y``
    (P, n) with slopes ``cs`` (P, K) and bandwidths ``h`` (P,): (P,), the reference's argmax exactly.

    Each slope's histogram is the reference's (its block's bin step, ``drift_numba.residual_counts``; rows in
    chunks of at most about ``BLOCK_ELEMENTS`` bins). Its smoothed peak is at most w₀·(largest count of
    2·radius + 1 consecutive bins)/(n·step), w₀ the filter's central weight: a slope whose bound is below the
    exact peak of its row's best-bounded slope cannot win and is not smoothed; the others get the reference's
    exact peak (``_smoothed_peaks``).
    """
    from zooscope.kernels import drift_numba

    n_rows, n = x.shape
    n_slopes = cs.shape[1]
    cs = np.ascontiguousarray(cs, dtype=np.float64)
    lo, hi = drift_numba.residual_ranges(x, y, cs)
    span = hi - lo
    starts = np.arange(0, n_slopes, max(1, BLOCK_ELEMENTS // max(n, MAX_BINS)))
    widest = np.maximum.reduceat(span, starts, axis=1)
    block_width = np.maximum((h / upsample)[:, None], widest / MAX_BINS)
    repeat = np.diff(np.r_[starts, n_slopes])
    width = np.repeat(block_width, repeat, axis=1)
    n_bins = np.repeat(np.ceil(widest / block_width).astype(np.intp) + 1, repeat, axis=1)
    sigma = h[:, None] / width
    sigmas, which = np.unique(sigma, return_inverse=True)
    radii = np.array([int(4.0 * float(v) + 0.5) for v in sigmas], dtype=np.intp)  # as gaussian_filter1d's
    w0 = np.array([1.0 / np.exp(-0.5 / (v * v) * np.arange(-r, r + 1) ** 2).sum() for v, r in zip(sigmas, radii)])
    radius, w0 = radii[which].reshape(cs.shape), w0[which].reshape(cs.shape)
    best = np.empty(n_rows, dtype=np.intp)
    reach = np.abs(x).max(axis=1)  # a residual moves by at most |Δc|·max|w_i| when c moves by Δc
    probe = np.zeros(n_slopes, dtype=bool)
    probe[:: PROBE_STRIDE if n_slopes > 2 * PROBE_STRIDE else 1] = True
    probe[-1] = True
    probes, others = np.flatnonzero(probe), np.flatnonzero(~probe)
    grid = {"cs": cs, "lo": lo, "width": width, "n_bins": n_bins, "sigma": sigma, "radius": radius, "w0": w0,
            "flat": span > 0}
    row_bins = n_bins.max(axis=1) * n_slopes
    start = 0
    while start < n_rows:
        stop = start + 1
        while stop < n_rows and (stop + 1 - start) * max(row_bins[start:stop + 1]) <= BLOCK_ELEMENTS:
            stop += 1
        best[start:stop] = _best_in_rows(x, y, range(start, stop), probes, others, grid, reach, n)
        start = stop
    return best


#: ``_best_slopes_many`` histograms every this-many-th slope of a grid first; a slope in between is histogrammed
#: only when the neighbouring histograms leave room for its peak to beat the best found.
PROBE_STRIDE = 4


def _best_in_rows(x: np.ndarray, y: np.ndarray, rows: range, probes: np.ndarray, others: np.ndarray,
                  grid: dict[str, np.ndarray], reach: np.ndarray, n: int) -> np.ndarray:
    """``_best_slopes_many`` for ``rows``: the ``probes`` slopes are histogrammed first, the ``others`` only where
    their probed neighbours allow a peak that high (``grid``: per (row, slope) ``cs, lo, width, n_bins, sigma,
    radius, w0, flat``; ``reach``: max|w_i| per row)."""
    from zooscope.kernels import drift_numba

    k_rows, n_slopes = len(rows), grid["cs"].shape[1]
    f = {key: value[rows.start:rows.stop] for key, value in grid.items()}

    def histograms(r: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, np.ndarray]:
        """For the items (row ``r`` of ``rows``, slope ``k``): themselves, their counts, their quantities and their
        own peak bounds."""
        it = {key: value[r, k] for key, value in f.items()}
        counts = drift_numba.residual_counts(x, y, rows.start + r, it["cs"], it["lo"], it["width"],
                                             int(it["n_bins"].max()))
        window = drift_numba.window_max(counts, np.arange(r.size), it["n_bins"], 2 * it["radius"] + 1)
        return r, k, counts, it, np.where(it["flat"], it["w0"] * window / (n * it["width"]) * (1 + 1e-9), np.inf)

    sets = [histograms(np.repeat(np.arange(k_rows), probes.size), np.tile(probes, k_rows))]
    _, _, counts, items, bound = sets[0]
    top = np.argmax(bound.reshape(k_rows, probes.size), axis=1) + np.arange(k_rows) * probes.size
    first = np.where(items["flat"][top], _smoothed_peaks(counts, top, items, n), np.inf)
    if others.size:
        # A window of 2·radius + 1 bins at slope c' holds residuals that lie, at the nearest probed slope c, within
        # (2·radius + 1)·step' + 2·|c' − c|·max|w_i|: at most ceil(that / step) + 1 of its bins (or any longer run).
        at = np.searchsorted(probes, others)
        left_gap = others - probes[at - 1]
        col = np.where(left_gap <= probes[np.minimum(at, probes.size - 1)] - others, at - 1, at)  # nearest probe
        side = probes[col]
        shift = np.abs(f["cs"][:, others] - f["cs"][:, side]) * reach[rows.start:rows.stop, None] * (1 + 1e-9)
        shift += 1e-9 * (f["width"][:, others] + f["width"][:, side])
        length = np.ceil(((2 * f["radius"][:, others] + 1) * f["width"][:, others] + 2 * shift)
                         / f["width"][:, side]).astype(np.intp) + 1
        longest = np.zeros((k_rows, probes.size), dtype=np.intp)  # one window per probe: its others' longest
        np.maximum.at(longest, (slice(None), col), length)
        window = drift_numba.window_max(counts, np.arange(counts.shape[0]), items["n_bins"], longest.ravel())
        near = f["w0"][:, others] * window.reshape(k_rows, probes.size)[:, col] / (n * f["width"][:, others])
        near *= 1 + 1e-9
        near = np.where(f["flat"][:, others], near, np.inf)
        r, j = np.nonzero(near >= first[:, None])
        if r.size:
            sets.append(histograms(r, others[j]))
    peaks = np.full((k_rows, n_slopes), -np.inf)
    for r, k, counts, items, bound in sets:
        keep = np.flatnonzero(bound >= first[r])
        peaks[r[keep], k[keep]] = np.where(items["flat"][keep], _smoothed_peaks(counts, keep, items, n), np.inf)
    return np.argmax(peaks, axis=1)


def _smoothed_peaks(counts: np.ndarray, which: np.ndarray, items: dict[str, np.ndarray], n: int) -> np.ndarray:
    """``_peak_densities``' value (smoothed histogram maximum / (n·step)) of the histograms ``counts[which]``
    (``items``: their ``n_bins``, ``sigma`` = h / step and ``width`` = step, per row of ``counts``), by the
    reference's ``gaussian_filter1d``. Histograms of one smoothing width are smoothed together, and only around
    the bins where the maximum can be (``drift_numba.peak_windows``: with ``radius`` bins of context each side,
    so their smoothed values are the full histogram's), padded with empty bins to the longest (the filter's
    ``constant`` mode pads with the same zeros)."""
    from scipy.ndimage import gaussian_filter1d

    from zooscope.kernels import drift_numba

    out = np.empty(which.size)
    sigma = items["sigma"][which]
    order = np.argsort(sigma, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(sigma[order]) != 0) + 1):
        sel = which[group]
        g_sigma = float(sigma[group[0]])
        radius = int(4.0 * g_sigma + 0.5)  # gaussian_filter1d's
        inner = min(max(1, int(g_sigma)), radius)  # weights within ``inner`` bins are ≥ w₀·exp(−inner²/2σ²)
        factor = np.exp(-0.5 * inner * inner / (g_sigma * g_sigma)) * (1 - 1e-9)
        windows, hull = drift_numba.peak_windows(counts[sel], items["n_bins"][sel], radius, inner, factor)
        smooth = gaussian_filter1d(windows, sigma=g_sigma, axis=1, mode="constant", truncate=4.0)
        at = np.arange(smooth.shape[1])[None, :]
        smooth[(at < radius) | (at >= radius + hull[:, None])] = -np.inf
        out[group] = smooth.max(axis=1) / (n * items["width"][sel])
    return out
