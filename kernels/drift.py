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
    c_opt_resolution`` (weight units; slopes dimensionless). Non-finite pairs are dropped."""
    x, y = _pairs(wi, wf)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    a = tuple(float(v) for v in _fit_sorted(xs, ys, 2))
    b = tuple(float(v) for v in _fit_sorted(xs, ys * ys, 3))
    c_opt, res = peak_slope(x, y, seed=seed)
    return {"rmsd": rmsd(x, y), "a0": a[0], "a1": a[1], "b0": b[0], "b1": b[1], "b2": b[2],
            "sigma_at_0": _sigma(a, b, 0.0), "c_opt": c_opt, "c_opt_resolution": res}
