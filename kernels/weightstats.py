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
    keys = ["w_mean", "w_std", "w_skew", "w_kurtosis", "w_min", "w_max",
            *(f"w_q{round(q * 100):02d}" for q in QUANTILES), "w_frac_zero"]
    if x.size == 0:
        return {**dict.fromkeys(keys, float("nan")), "w_count": 0, "w_nonfinite": n_bad}
    mean = x.mean()
    d = x - mean
    m2 = np.dot(d, d) / x.size
    d2 = d * d
    m3 = np.dot(d2, d) / x.size
    m4 = np.dot(d2, d2) / x.size
    skew = m3 / m2**1.5 if m2 > 0 else np.nan
    kurt = m4 / m2**2 - 3.0 if m2 > 0 else np.nan
    qs = np.quantile(x, QUANTILES)
    amax = np.abs(x).max()
    out = {
        "w_mean": float(mean), "w_std": float(np.sqrt(m2)), "w_skew": float(skew), "w_kurtosis": float(kurt),
        "w_min": float(x.min()), "w_max": float(x.max()),
        **{f"w_q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs)},
        "w_frac_zero": float(np.count_nonzero(np.abs(x) < zero_tol * amax) / x.size) if amax > 0 else 1.0,
        "w_count": int(x.size), "w_nonfinite": n_bad,
    }
    return out


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
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


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
    t = np.asarray(tensor, dtype=np.float64)  # converted once: moments, node_strength and histogram reuse it
    n_bad = t.size - int(np.count_nonzero(np.isfinite(t)))
    if n_bad:
        raise ValueError(f"{n_bad} of {t.size} weights are NaN or infinite")
    stats = moments(t, zero_tol=zero_tol)
    if t.ndim >= 2:
        layout = strength_layout(layer_type, t.ndim)
        ns = node_strength(t, layout=layout) if in_strength is None else np.asarray(in_strength)
        stats["ns_mean"], stats["ns_std"] = float(ns.mean()), float(ns.std())
    else:
        stats["ns_mean"] = stats["ns_std"] = float("nan")
    counts, edges = histogram(t, bins=bins)
    return stats, counts, edges
