"""Weight statistics of one layer (paper 000): moments, quantiles, histogram, KDE, node strength.

Arrays in, numbers/arrays out, fp64 throughout. Non-finite weights: ``moments`` and ``histogram`` use the finite
entries only and ``moments`` reports how many were dropped (``w_nonfinite``); ``layer_stats`` (what the analysis
pipeline calls) refuses a tensor with non-finite entries with ``ValueError`` so that the layer row carries an error
instead of statistics of a partial tensor.

Node strength layouts (paper 000: sum of absolute incoming weights of a unit):
- ``"out_in"`` (default): PyTorch ``Linear`` ``(out, in)``, ``Conv1d`` ``(Cout, Cin, k)``, ``Conv2d``
  ``(Cout, Cin, kh, kw)``: unit = axis 0, incoming = all other axes.
- ``"in_out"``: HF ``transformers`` ``Conv1D`` ``(in, out)`` (and Keras ``Dense``): unit = last axis. Callers with such
  a tensor pass ``layout="in_out"`` (``layer_stats`` does so for a 2-D ``layer_type="conv1d"``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np


#: Quantile levels reported by ``moments`` (as ``w_q01`` ... ``w_q99``).
QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)

#: Default relative tolerance of ``w_frac_zero``: a weight is near zero when ``|w| < ZERO_TOL * max|w|``.
ZERO_TOL = 1e-3

#: Largest number of points ``kde`` builds its estimator from; bigger layers are subsampled (seeded).
KDE_MAX_POINTS = 100_000

Layout = Literal["out_in", "in_out"]

def _finite(w: np.ndarray) -> tuple[np.ndarray, int]:
    x = np.asarray(w, dtype=np.float64).ravel()
    ok = np.isfinite(x)
    if ok.all():
        return x, 0
    return x[ok], int(x.size - ok.sum())


def moments(w: np.ndarray, *, zero_tol: float = ZERO_TOL) -> dict[str, float]:
    """Distribution statistics of all entries of ``w`` (any shape), in weight units, fp64.

    Returns ``w_mean, w_std`` (population, ddof=0), ``w_skew`` (biased, = ``scipy.stats.skew``), ``w_kurtosis``
    (excess, biased, = ``scipy.stats.kurtosis``), ``w_min, w_max``, quantiles ``w_q01 w_q05 w_q25 w_q50 w_q75
    w_q95 w_q99`` (``np.quantile``, linear), ``w_frac_zero`` (fraction with ``|w| < zero_tol * max|w|``),
    ``w_count`` (finite entries used) and ``w_nonfinite`` (NaN/inf entries dropped). All NaN when no finite entry;
    skew and kurtosis are NaN for a constant tensor.
    """
    x, n_bad = _finite(w)
    if x.size == 0:
        return {**dict.fromkeys(MOMENT_KEYS, float("nan")), "w_count": 0, "w_nonfinite": n_bad}
    rows = moments_rows(x[None], zero_tol=zero_tol)
    return {**{k: float(v[0]) for k, v in rows.items()}, "w_count": int(x.size), "w_nonfinite": n_bad}


#: The float statistics of ``moments`` / ``moments_rows``, in their order.
MOMENT_KEYS = ("w_mean", "w_std", "w_skew", "w_kurtosis", "w_min", "w_max",
               *(f"w_q{round(q * 100):02d}" for q in QUANTILES), "w_frac_zero")


def moments_rows(x: np.ndarray, *, zero_tol: float = ZERO_TOL, x64: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """``moments`` of every row of ``x`` (G, n) at once (finite float values, n ≥ 1): ``{MOMENT_KEYS: (G,)}``, fp64.

    The mean is numpy's, the quantiles numpy's bit for bit (``quantile_rows``); the central moments are compensated
    sums (``weightstats_numba``). ``x64``: ``x`` in fp64 when the caller has it (not converted again)."""
    from zooscope.kernels import weightstats_numba

    x64 = np.ascontiguousarray(x if x64 is None else x64, dtype=np.float64)
    mean = x64.mean(axis=1)
    m2, m3, m4, lo, hi, near_zero = weightstats_numba.central_moments(x64, mean, zero_tol).T
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(m2 > 0, m3 / m2**1.5, np.nan)
        kurt = np.where(m2 > 0, m4 / m2**2 - 3.0, np.nan)
    qs = quantile_rows(x, QUANTILES)
    return dict(zip(MOMENT_KEYS, (mean, np.sqrt(m2), skew, kurt, lo, hi, *qs, near_zero)))


def quantile_rows(x: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """``np.quantile(x, q, axis=1)`` (method ``linear``) of finite rows ``x`` (G, n), bit for bit: ``(len(q), G)``
    fp64. The order statistics are taken in the rows' own dtype (float16 as float32: the same numbers) by
    ``weightstats_numba.order_statistics``, which sorts only the values near them, and interpolated in fp64 as
    numpy does (``quantiles_at_ranks``)."""
    from zooscope.kernels import weightstats_numba

    values = np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float16 else None)
    n = x.shape[1]
    return quantiles_at_ranks(weightstats_numba.order_statistics(values, quantile_ranks(n, q)), n, q)


def _linear_positions(n: int, q: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's method ``linear`` for rows of n values: (rank below, rank above, weight (len(q), 1)) per level."""
    q = np.asarray(q, dtype=np.float64)
    virtual = (n - 1) * q  # numpy's virtual index
    before = np.floor(virtual)
    after = before + 1
    before[virtual >= n - 1] = after[virtual >= n - 1] = -1
    before[virtual < 0] = after[virtual < 0] = 0
    gamma = (virtual - before.astype(np.intp))[:, None]
    return before.astype(np.intp) % n, after.astype(np.intp) % n, gamma


def quantile_ranks(n: int, q: tuple[float, ...]) -> np.ndarray:
    """The ranks (ascending, distinct) of the order statistics that numpy's ``linear`` quantiles ``q`` of n values
    interpolate between."""
    lo, hi, _ = _linear_positions(n, q)
    return np.unique(np.r_[lo, hi])


def quantiles_at_ranks(ordered: np.ndarray, n: int, q: tuple[float, ...]) -> np.ndarray:
    """``np.quantile(x, q, axis=1)``, bit for bit, from ``ordered`` (G, K): the values of ``quantile_ranks(n, q)``
    in each row of ``x`` (G, n), i.e. ``np.sort(x, axis=1)[:, quantile_ranks(n, q)]``. Returns (len(q), G) fp64."""
    lo, hi, gamma = _linear_positions(n, q)
    kth = np.unique(np.r_[lo, hi])
    a = ordered[:, np.searchsorted(kth, lo)].T.astype(np.float64)
    b = ordered[:, np.searchsorted(kth, hi)].T.astype(np.float64)
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def histogram(w: np.ndarray, bins: int = 64, range: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram`` of the finite entries of ``w``: ``(counts (bins,) float64, edges (bins+1,) float64)``.

    ``range`` defaults to ``(min, max)`` of the finite entries. Without finite entries: zero counts, NaN edges.
    """
    x, _ = _finite(w)
    if x.size == 0 and range is None:
        return np.zeros(bins), np.full(bins + 1, np.nan)
    counts, edges = np.histogram(x, bins=bins, range=range)
    return counts.astype(np.float64), edges.astype(np.float64)


def histogram_rows(x: np.ndarray, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(row, bins)`` of every row of ``x`` (G, n), finite fp64, n ≥ 1, over each row's own
    (min, max): ``(counts (G, bins) float64, edges (G, bins + 1) float64)``, equal to numpy's bin for bin (the
    same edges and the same index correction at the edges)."""
    from zooscope.kernels import weightstats_numba

    return weightstats_numba.histograms(np.ascontiguousarray(x, dtype=np.float64), bins)


def kde(w: np.ndarray, grid: np.ndarray, bandwidth: str | float = "scott", *,
        max_points: int = KDE_MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Gaussian KDE (``scipy.stats.gaussian_kde``) of the finite entries of ``w`` evaluated on ``grid``.

    Density in 1/weight units, shape ``grid.shape``. ``bandwidth`` is ``"scott"``, ``"silverman"`` or a scalar
    factor (scipy's ``bw_method``). Layers with more than ``max_points`` finite entries are subsampled without
    replacement by ``np.random.default_rng(seed)`` (the estimate's cost grows as points × grid). NaN where no
    density can be formed (fewer than 2 distinct finite values).
    """
    from scipy.stats import gaussian_kde

    grid = np.asarray(grid, dtype=np.float64)
    x, _ = _finite(w)
    if x.size > max_points:
        x = np.random.default_rng(seed).choice(x, size=max_points, replace=False)
    if x.size < 2 or x.min() == x.max():
        return np.full(grid.shape, np.nan)
    return gaussian_kde(x, bw_method=bandwidth)(grid.ravel()).reshape(grid.shape)


def _check(tensor: np.ndarray, layout: Layout) -> np.ndarray:
    t = np.asarray(tensor)
    if t.ndim < 2:
        raise ValueError(f"node strength needs a tensor with at least 2 axes, got shape {t.shape}")
    if layout == "in_out":
        if t.ndim != 2:
            raise ValueError(f"layout 'in_out' is for 2-D (in, out) tensors, got shape {t.shape}")
        return t.T
    if layout != "out_in":
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    return t


def strength_layout(layer_type: str, ndim: int) -> Layout:
    """The node-strength layout of a layer's tensor: ``"in_out"`` for a 2-D ``conv1d`` (HF ``Conv1D``), else
    ``"out_in"``."""
    return "in_out" if layer_type == "conv1d" and ndim == 2 else "out_in"


def _abs64(tensor: np.ndarray, layout: Layout) -> np.ndarray:
    """|W| in fp64 with the unit on axis 0 and the inputs on axis 1 (see ``_check``)."""
    return np.abs(_check(tensor, layout).astype(np.float64, copy=False))


def _in_sums(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _out_sums(a: np.ndarray) -> np.ndarray:
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != 1))


def node_strength(tensor: np.ndarray, *, layout: Layout = "out_in") -> np.ndarray:
    """In-strength per output unit: sum of |incoming weights|, shape ``(n_out,)`` fp64.

    ``(out, in)`` → sum over ``in``; ``(Cout, Cin, kh, kw)`` → sum over ``Cin, kh, kw``; see the module docstring
    for ``layout``.
    """
    return _in_sums(_abs64(tensor, layout))


def out_strength(tensor: np.ndarray, *, layout: Layout = "out_in") -> np.ndarray:
    """Out-strength per input unit: sum of |outgoing weights|, shape ``(n_in,)`` fp64.

    ``(out, in)`` → sum over ``out``; ``(Cout, Cin, kh, kw)`` → sum over ``Cout, kh, kw`` (one value per input
    channel).
    """
    return _out_sums(_abs64(tensor, layout))


def layer_strengths(tensor: np.ndarray, *, layer_type: str = "dense") -> tuple[np.ndarray, np.ndarray]:
    """``(node_strength, out_strength)`` of a layer's tensor (layout from ``layer_type`` as in ``layer_stats``),
    with |W| formed once."""
    a = _abs64(tensor, strength_layout(layer_type, np.ndim(tensor)))
    return _in_sums(a), _out_sums(a)


def strength_correlation(in_strength_next_hidden: np.ndarray, out_strength: np.ndarray) -> float:
    """Pearson correlation between hidden units' in-strength (from layer l) and out-strength (into layer l+1).

    Both are ``(n_hidden,)``. NaN when undefined: fewer than 2 units or a constant vector. Raises ``ValueError`` when
    the lengths differ (the two layers do not chain, e.g. a conv layer followed by a flatten).
    """
    a = np.asarray(in_strength_next_hidden, dtype=np.float64).ravel()
    b = np.asarray(out_strength, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"strength_correlation: {a.size} in-strengths vs {b.size} out-strengths "
                         "(the layers do not chain)")
    return float(strength_correlation_rows(a[None], b[None])[0])


def strength_correlation_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``strength_correlation`` of every row pair of ``a``, ``b`` (P, n_hidden) at once: (P,), in [-1, 1]; NaN for
    rows with fewer than 2 units or a constant vector."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    da = a - a.mean(axis=1, keepdims=True)
    db = b - b.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.einsum("ij,ij->i", da, db) / np.sqrt(np.einsum("ij,ij->i", da, da) * np.einsum("ij,ij->i", db, db))
    undefined = (a.shape[1] < 2) | (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0) if a.size else \
        np.ones(a.shape[0], bool)
    return np.where(undefined, np.nan, np.clip(r, -1.0, 1.0))


def chained_strength_correlation(w_l: np.ndarray, w_next: np.ndarray, *, layout: Layout = "out_in") -> float:
    """Correlation of layer l's in-strengths with layer l+1's out-strengths over the hidden units between them.

    NaN when the layers do not chain (``w_l``'s output count differs from ``w_next``'s input count).
    """
    a = node_strength(w_l, layout=layout)
    b = out_strength(w_next, layout=layout)
    return strength_correlation(a, b) if a.size == b.size else float("nan")


def layer_stats(tensor: np.ndarray, bins: int = 64, *, layer_type: str = "dense", zero_tol: float = ZERO_TOL,
                in_strength: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Everything the analysis stores per layer: ``(stats, counts (bins,), edges (bins+1,))``.

    ``stats`` holds ``moments`` plus ``ns_mean, ns_std`` (mean and population std of ``node_strength``; NaN for
    tensors with fewer than 2 axes). ``layer_type`` ``"conv1d"`` with a 2-D tensor means HF ``Conv1D`` (in, out);
    other types use the ``(out, in, ...)`` layout. Raises ``ValueError`` when the tensor has non-finite entries.
    ``in_strength``: the tensor's ``node_strength`` when the caller already has it (not recomputed).
    """
    t = np.asarray(tensor, dtype=np.float64)
    stats, counts, edges, strengths = layer_stats_many(t[None], bins, layer_type=layer_type, zero_tol=zero_tol,
                                                       in_strength=None if in_strength is None
                                                       else np.asarray(in_strength)[None])
    return {k: v[0].item() for k, v in stats.items()}, counts[0], edges[0]


def layer_stats_many(tensors: np.ndarray, bins: int = 64, *, layer_type: str = "dense", zero_tol: float = ZERO_TOL,
                     in_strength: np.ndarray | None = None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``layer_stats`` of G same-shaped tensors ``tensors`` (G, *shape) of one ``layer_type`` at once.

    Returns ``(stats {name: (G,)}, counts (G, bins), edges (G, bins + 1), strengths)``; ``strengths`` is
    ``(in_strength (G, n_out), out_strength (G, n_in))`` (``layer_strengths`` of each tensor; None for 1-D
    tensors). ``in_strength`` (G, n_out): already known in-strengths (not recomputed). Raises ``ValueError`` when
    any tensor has non-finite entries. ``bins=0``: no histogram (empty ``counts``/``edges`` rows).
    """
    stored = np.asarray(tensors)
    if stored.dtype.kind != "f":
        stored = stored.astype(np.float64)
    t = stored.astype(np.float64, copy=False)  # converted once: moments, node strength and histogram reuse it
    g = t.shape[0]
    x = t.reshape(g, -1)
    n_bad = x.size - int(np.count_nonzero(np.isfinite(stored)))  # as in fp64: a cast keeps finiteness
    if n_bad:
        raise ValueError(f"{n_bad} of {x.size} weights are NaN or infinite")
    stats = moments_rows(stored.reshape(g, -1), zero_tol=zero_tol, x64=x)
    stats["w_count"] = np.full(g, x.shape[1], dtype=np.int64)
    stats["w_nonfinite"] = np.zeros(g, dtype=np.int64)
    strengths = None
    if t.ndim >= 3:
        a = np.abs(t.transpose(0, 2, 1) if strength_layout(layer_type, t.ndim - 1) == "in_out" else t)
        ins = a.reshape(g, a.shape[1], -1).sum(axis=2) if in_strength is None else np.asarray(in_strength)
        strengths = (ins, a.sum(axis=1).reshape(g, a.shape[2], -1).sum(axis=2))  # over the outputs first: faster
        stats["ns_mean"], stats["ns_std"] = ins.mean(axis=1), ins.std(axis=1)
    else:
        stats["ns_mean"] = stats["ns_std"] = np.full(g, np.nan)
    counts, edges = histogram_rows(x, bins) if bins else (np.zeros((g, 0)), np.zeros((g, 1)))
    return stats, counts, edges, strengths
