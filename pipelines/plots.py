"""Matplotlib figures for regressions and reports. Each function returns a ``matplotlib.figure.Figure`` built
without pyplot (no global state, safe off the main thread); save it or pass it to ``report.embed_png``."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

ALPHA_OVER, ALPHA_UNDER = 2.0, 6.0  # WeightWatcher's over-/under-trained alpha thresholds


def _figure(width: float = 6.4, height: float = 4.2) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.91)
    return fig, fig.add_subplot()


def regression_plot(
    x: np.ndarray, y: np.ndarray, *, slope: float, intercept: float, r2: float,
    xlabel: str, ylabel: str, title: str, labels: Sequence[str] | None = None,
) -> Figure:
    """Scatter of ``y`` against ``x`` (one point per model) with the OLS line ``y = intercept + slope·x``."""
    fig, ax = _figure()
    ax.scatter(x, y, s=28, color="#1f77b4", zorder=3)
    ax.margins(x=0.08)
    if labels is not None and len(labels) <= 30:
        for xi, yi, text in zip(x, y, labels):
            ax.annotate(text, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points", color="#444")
    grid = np.linspace(np.min(x), np.max(x), 50)
    sign = "−" if slope < 0 else "+"
    ax.plot(grid, intercept + slope * grid, color="#d62728", lw=1.8,
            label=f"y = {intercept:.4g} {sign} {abs(slope):.4g}·x   (R² = {r2:.3f}, n = {len(x)})")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def depth_plot(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, ylabel: str, title: str,
    bands: Sequence[float] = (),
) -> Figure:
    """One line per model of a layer metric against layer depth (``curves[model] = (depth, values)``).

    Models are coloured in their given order (viridis); a legend is drawn for up to 12 models. ``bands`` draws
    dashed horizontal reference lines (e.g. the alpha thresholds 2 and 6).
    """
    fig, ax = _figure(6.0, 3.8)
    colors = _colors(len(curves))
    for color, (name, (depth, values)) in zip(colors, curves.items()):
        ax.plot(depth, values, marker="o", ms=3, lw=1.2, color=color, label=name)
    for level in bands:
        ax.axhline(level, color="#888", ls="--", lw=0.9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer depth (index among analysed layers)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if 0 < len(curves) <= 12:
        ax.legend(fontsize=7, ncols=2 if len(curves) > 6 else 1, loc="best")
    return fig


def esd_plot(evals: np.ndarray, *, alpha: float, xmin: float, xmax: float | None = None, title: str,
             thresh: float = 1e-5) -> Figure:
    """Log-log ESD (density histogram over log-spaced bins of the eigenvalues above ``thresh``) with the fitted
    power law ``p(λ) ∝ λ^−alpha`` drawn from ``xmin`` to ``xmax``, scaled to the tail's share of the
    eigenvalues, and ``xmin`` marked by a vertical line. A NaN ``alpha`` (failed fit) draws the ESD only."""
    fig, ax = _figure(6.0, 3.8)
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > thresh]
    if ev.size == 0:
        ax.text(0.5, 0.5, "no eigenvalues above threshold", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        return fig
    lo, hi = ev.min(), ev.max()
    hi = hi if hi > lo else lo * 10
    bins = np.logspace(np.log10(lo), np.log10(hi), max(10, min(60, ev.size // 4)))
    bins[0], bins[-1] = lo, hi  # logspace rounding must not drop the extreme eigenvalues
    density, edges = np.histogram(ev, bins=bins, density=True)
    centers = np.sqrt(edges[:-1] * edges[1:])
    nz = density > 0
    ax.loglog(centers[nz], density[nz], "o", ms=3.5, color="#1f77b4", label=f"ESD ({ev.size} eigenvalues)")
    if np.isfinite(alpha) and np.isfinite(xmin) and xmin > 0:
        top = xmax if xmax is not None and np.isfinite(xmax) else hi
        tail_share = np.mean(ev >= xmin)
        grid = np.logspace(np.log10(xmin), np.log10(max(top, xmin * 1.01)), 50)
        pdf = tail_share * (alpha - 1.0) / xmin * (grid / xmin) ** (-alpha)
        ax.loglog(grid, pdf, color="#d62728", lw=2, label=f"power law fit, α = {alpha:.3f}")
        ax.axvline(xmin, color="#2ca02c", ls="--", lw=1.3, label=f"xmin = {xmin:.4g}")
    ax.set(xlabel="eigenvalue λ of WᵀW", ylabel="density", title=title)
    _decade_limits(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def series_histograms(values: Mapping[str, np.ndarray], *, xlabel: str, title: str, bins: int = 30) -> Figure:
    """Overlaid density histograms (steps, common bins) of one layer metric, one per label (e.g. per model)."""
    fig, ax = _figure(6.0, 3.8)
    finite = {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in values.items()}
    allv = np.concatenate([v for v in finite.values()] or [np.zeros(0)])
    if allv.size == 0:
        ax.text(0.5, 0.5, "no finite values", ha="center", transform=ax.transAxes)
    else:
        edges = np.histogram_bin_edges(allv, bins=bins)
        for color, (name, v) in zip(_colors(len(finite)), finite.items()):
            if v.size:
                ax.hist(v, bins=edges, density=True, histtype="step", lw=1.6, color=color, label=f"{name} ({v.size})")
        if len(finite) <= 12:
            ax.legend(fontsize=7, loc="best")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.grid(alpha=0.3)
    return fig


def _decade_limits(ax) -> None:
    """Widen log axes to whole decades and label only the decades (minor labels collide on narrow ranges)."""
    for axis, (lo, hi), setter in ((ax.xaxis, ax.get_xlim(), ax.set_xlim), (ax.yaxis, ax.get_ylim(), ax.set_ylim)):
        setter(10.0 ** np.floor(np.log10(lo)), 10.0 ** np.ceil(np.log10(hi)))
        axis.set_minor_formatter(NullFormatter())


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


def esd_linear_plot(evals: np.ndarray, *, xmin: float, title: str, bulk: tuple[float, float] | None = None,
                    thresh: float = 1e-5) -> Figure:
    """Lin-lin ESD (density histogram, 100 bins, of the eigenvalues above ``thresh``) with ``xmin`` marked and,
    when ``bulk = (bulk_min, bulk_max)`` is finite, the Marchenko–Pastur bulk shaded (WeightWatcher's ``esd2``)."""
    fig, ax = _figure(6.0, 3.8)
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > thresh]
    ax.hist(ev, bins=100, density=True, color="#1f77b4", label=f"ESD ({ev.size} eigenvalues)")
    if np.isfinite(xmin):
        ax.axvline(xmin, color="#d62728", lw=1.3, label=f"xmin = {xmin:.4g}")
    if bulk is not None and all(np.isfinite(bulk)):
        ax.axvspan(bulk[0], bulk[1], color="#ff7f0e", alpha=0.2, label="MP bulk")
    ax.set(xlabel="eigenvalue λ of WᵀW", ylabel="density", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _log_gaps(evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(index, log10 gap)`` of the gaps between consecutive sorted eigenvalues; zero gaps (repeated eigenvalues,
    log10 = −inf) are left out."""
    with np.errstate(divide="ignore"):
        logs = np.log10(np.diff(np.sort(np.asarray(evals, dtype=np.float64))))
    index = np.flatnonzero(np.isfinite(logs))
    return index, logs[index]


def eigenvalue_gaps_plot(evals: np.ndarray, *, xmin: float, title: str) -> Figure:
    """log10 of the gaps ``λ[i+1] − λ[i]`` against ``i`` (all eigenvalues, ascending), with the index of ``xmin``
    (``searchsorted``, left) marked: WeightWatcher's ``deltas`` figure ``deltaEs``."""
    fig, ax = _figure(6.0, 3.8)
    x, logs = _log_gaps(evals)
    ax.scatter(x, logs, color="#1f77b4", marker=".")
    if np.isfinite(xmin):
        ax.axvline(np.searchsorted(np.sort(evals), xmin, side="left"), color="#d62728", label="λ xmin")
        ax.legend(fontsize=8, loc="best")
    ax.set(xlabel="index i of the ascending eigenvalues", ylabel="log10 Δλ", title=f"Log Delta Es for {title}")
    ax.grid(alpha=0.3)
    return fig


def level_stats_plot(evals: np.ndarray, *, title: str) -> Figure:
    """Density histogram (100 bins) of the log10 eigenvalue gaps: WeightWatcher's ``deltas`` figure
    ``level-stats``."""
    fig, ax = _figure(6.0, 3.8)
    ax.hist(_log_gaps(evals)[1], bins=100, density=True, color="#1f77b4")
    ax.set(xlabel="log10 Δλ", ylabel="density", title=f"Log Level Statistics for {title}")
    ax.grid(alpha=0.3)
    return fig


#: WeightWatcher's panel labels of the eigenvector metrics (``pipelines.vectors.METRICS``).
VECTOR_LABELS = {"vec_entropy": "Vector Entropies", "loc_ratio": "Localization Ratios",
                 "part_ratio": "Participation Ratios"}


def vector_metrics_plot(metrics: Mapping[str, np.ndarray], evals: np.ndarray, n_bulk: int, *, title: str) -> Figure:
    """One panel per eigenvector metric and one of the eigenvalues, each against the eigenvector's index in
    ascending eigenvalue order, with the last bulk index (``n_bulk − 1``, when there is a bulk) marked as xmin:
    WeightWatcher's ``vectors`` figure ``vector_metrics``. ``metrics[name]`` and ``evals`` share that order."""
    fig = Figure(figsize=(8, 12))
    axes = fig.subplots(len(VECTOR_LABELS) + 1, sharex=True)
    panels = [(VECTOR_LABELS[name], metrics[name]) for name in VECTOR_LABELS] + [("Eigenvalues", evals)]
    for ax, (label, values) in zip(axes, panels):
        ax.scatter(np.arange(len(values)), values, marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if n_bulk > 0:
            ax.axvline(n_bulk - 1, color="r", label="xmin")
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("eigenvector index (ascending eigenvalue)")
    fig.suptitle(f"Vector Localization Metrics for {title}")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.05, top=0.95, hspace=0.08)
    return fig


def vector_histograms_plot(metrics: Mapping[str, np.ndarray], n_bulk: int, *, title: str) -> Figure:
    """Per eigenvector metric, its density histograms (100 bins each) over the bulk (the first ``n_bulk``
    eigenvectors in ascending eigenvalue order) and over the tail: WeightWatcher's ``vector_histograms`` (drawn as
    filled steps: one patch per histogram instead of 100 bars)."""
    fig = Figure(figsize=(6.4, 4.8))
    for ax, name in zip(fig.subplots(len(VECTOR_LABELS)), VECTOR_LABELS):
        for part, values, color in (("bulk", metrics[name][:n_bulk], "blue"),
                                    ("tail", metrics[name][n_bulk:], "purple")):
            if len(values):
                ax.hist(values, bins=100, color=color, alpha=0.5, label=part, density=True, histtype="stepfilled")
        ax.set_ylabel(VECTOR_LABELS[name])
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Vector Bulk/Tail Metrics for {title}")
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.06, top=0.91, hspace=0.25)
    return fig
