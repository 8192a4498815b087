"""Report sections for trained zoos: masked weight images and distance from initialization (paper 001), weight
statistics (paper 000), and paper 000's accuracy-group figures per dataset x architecture of a sweep.

``sections(...)`` returns ``report.Section`` objects for ``report.build_report(extra_sections=...)``; each section is
built only when its data is present. Figures are built without pyplot (``matplotlib.figure.Figure``).
"""
from __future__ import annotations

import html as _html
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from zooscope.kernels import drift as drift_kernels
from zooscope.kernels import weightstats
from zooscope.pipelines.drift import time_to_loss
from zooscope.pipelines.embed import accuracy_groups, embed, stat_vectors
from zooscope.pipelines.report import Section, figure_html

#: Metadata columns tried, in order, to group models by accuracy (higher is better; errors are negated).
METRICS = ("test_acc", "top1_acc", "accuracy", "train_acc", "top1_error", "test_error")
#: Per-layer statistics that make up a model's vector in the t-SNE map (those present are used).
MAP_COLUMNS = ("w_mean", "w_std", "w_skew", "w_kurtosis", "ns_mean", "ns_std", "alpha", "log_norm")
GROUP_COLORS = {"low": "#d62728", "mid": "#ff7f0e", "high": "#2ca02c"}
MAX_LAYER_PLOTS = 6
#: Colour scale of the weight images: ± this quantile of |w| pooled over a network's checkpoints.
IMAGE_QUANTILE = 0.99


def sections(models: pd.DataFrame | None, layers: pd.DataFrame | None = None,
             hist: tuple[np.ndarray, np.ndarray] | None = None, drift: pd.DataFrame | None = None, *,
             pairs: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
             weights: Mapping[str, np.ndarray] | None = None, theta: Sequence[float] | None = None,
             metric: str | None = None, loss: str = "train_loss", seed: int = 0,
             weight_images: Mapping[str, Sequence[tuple[int, np.ndarray]]] | None = None,
             image_layer: str = "fc2.weight",
             final_weights: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> list[Section]:
    """Training-zoo sections, in order: weight-matrix images at each checkpoint of masked networks (001 Fig. 1),
    RMSD and loss against step per width (001 Fig. 5), time to reach loss θ and
    RMSD there against width (Fig. 6), (w_i, w_f) densities with median, interquartile band and c_opt line
    (Fig. 3), per-accuracy-group weight densities and node-strength correlations (000), and a t-SNE map.

    models: one row per checkpoint/model (``model_id``; ``width``, ``step``, ``train_loss``, accuracy columns when
        known — a sweep manifest works). layers: the layer table (``model_id`` or ``model_row``, ``name``,
        ``layer_id``, ``w_*``, ``ns_mean``...). hist: ``(counts (rows, bins), edges (rows, bins+1))`` aligned with
        ``layers``. drift: the drift table (``pipelines.drift.DRIFT_COLUMNS``). pairs: title → (w_i, w_f) arrays.
    weights: model_id → weights (any shape) for KDEs from raw weights (else the histograms are averaged).
    theta: loss levels for Fig. 6 (default: the largest and the median of the runs' lowest losses).
    metric: the accuracy column for groups (default: first of ``METRICS`` present; error columns are negated).
    weight_images, image_layer: see :func:`mask_section`.
    final_weights: model_id → tensor name → array for the networks drawn in the paper-000 sections. When the models
        carry a sweep's ``acc_group``, one :func:`paper000_section` per dataset x architecture replaces the
        tertile-group sections.
    """
    out: list[Section] = []
    masks = mask_section(weight_images or {}, image_layer)
    if masks is not None:
        out.append(masks)
    models = models if models is not None else pd.DataFrame()
    runs = _runs(models, drift, loss)
    if runs is not None:
        out.append(_rmsd_section(runs, loss))
        if "width" in runs.columns and loss in runs.columns:
            out.append(_time_to_loss_section(runs, loss, theta))
    if pairs:
        out.append(_fig3_section(pairs, seed))
    blocks = paper000_blocks(models)
    if blocks:
        lab = _with_model_id(models, layers) if layers is not None and len(layers) else None
        for dataset, series, block in blocks:
            out.append(paper000_section(dataset, series, block, lab, final_weights or {}, seed=seed))
        return out
    groups = _groups(models, metric)
    if groups is not None:
        lab = _with_model_id(models, layers) if layers is not None else None
        dens = _density_section(groups, lab, hist, weights, seed)
        if dens is not None:
            out.append(dens)
        if lab is not None and "ns_mean" in lab.columns:
            ns = _strength_section(groups, lab)
            if ns is not None:
                out.append(ns)
        if lab is not None:
            tsne = _map_section(groups, lab, seed)
            if tsne is not None:
                out.append(tsne)
    return out


# ---- data preparation ------------------------------------------------------------------------------------------

def _runs(models: pd.DataFrame, drift: pd.DataFrame | None, loss: str) -> pd.DataFrame | None:
    """Whole-network drift rows joined with the models' metadata (width, loss, ...), or None."""
    if drift is None or not len(drift) or "layer" not in drift.columns:
        return None
    whole = drift[drift["layer"] == "all"]
    if not len(whole):
        return None
    if len(models) and "model_id" in models.columns:
        meta = models.drop(columns=[c for c in ("step", "init", "init_model_id", "rmsd") if c in models.columns])
        meta = meta.assign(model_id=meta["model_id"].astype(str)).drop_duplicates("model_id", keep="last")
        whole = whole.merge(meta, on="model_id", how="left")
        # the init checkpoint itself: RMSD 0 at its step, with its loss when the manifest has it
        if "step" in models.columns:
            init = models[models["model_id"].astype(str).isin(whole["init_model_id"])]
            if len(init):
                start = init.assign(model_id=init["model_id"].astype(str),
                                    init_model_id=init["model_id"].astype(str), rmsd=0.0, layer="all")
                whole = pd.concat([start.reindex(columns=whole.columns), whole], ignore_index=True)
    return whole.sort_values(["init_model_id", "step"]).reset_index(drop=True)


def _with_model_id(models: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    lab = layers.reset_index(drop=True)
    if "model_id" in lab.columns:
        return lab.assign(model_id=lab["model_id"].astype(str))
    key = models["model_row"] if "model_row" in models.columns else pd.Series(range(len(models)))
    ids = dict(zip(key, models["model_id"].astype(str)))
    if "model_row" not in lab.columns:
        raise ValueError("layers need a 'model_id' or 'model_row' column to be grouped by model")
    return lab.assign(model_id=lab["model_row"].map(ids))


def _groups(models: pd.DataFrame, metric: str | None) -> pd.Series | None:
    """model_id → low / mid / high, or None when no accuracy column (or fewer than 3 models) is present."""
    if not len(models) or "model_id" not in models.columns:
        return None
    col = metric or next((c for c in METRICS if c in models.columns and models[c].notna().sum() >= 3), None)
    if col is None or col not in models.columns:
        return None
    last = models.assign(model_id=models["model_id"].astype(str)).drop_duplicates("model_id", keep="last")
    values = last[col].to_numpy(dtype=np.float64)
    if "error" in col:
        values = -values
    g = pd.Series(accuracy_groups(values), index=last["model_id"], name=col).dropna()
    return g if g.nunique() > 1 else None


# ---- figures ---------------------------------------------------------------------------------------------------

def _figure(width: float = 6.4, height: float = 4.2, nrows: int = 1, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _width_colors(widths) -> dict:
    from matplotlib import colormaps

    ws = sorted(pd.unique(pd.Series(widths).dropna()))
    cmap = colormaps["viridis"]
    return {w: cmap(x) for w, x in zip(ws, np.linspace(0.0, 0.9, max(len(ws), 1)))}


def _rmsd_section(runs: pd.DataFrame, loss: str) -> Section:
    has_loss = loss in runs.columns and runs[loss].notna().any()
    has_width = "width" in runs.columns and runs["width"].notna().any()
    fig, axes = _figure(7.2, 6.4 if has_loss else 3.6, nrows=2 if has_loss else 1)
    colors = _width_colors(runs["width"]) if has_width else {}
    seen = set()
    by_run = list(runs.groupby("init_model_id", sort=True))
    if has_width:
        by_run.sort(key=lambda item: item[1]["width"].iloc[0])
    for _, run in by_run:
        w = run["width"].iloc[0] if has_width else None
        color = colors.get(w, "#1f77b4")
        label = f"width {w:g}" if has_width and w not in seen else None
        seen.add(w)
        if has_loss:
            axes[0, 0].plot(run["step"], run[loss], color=color, lw=1, label=label)
        axes[-1, 0].plot(run["step"], run["rmsd"], color=color, lw=1, label=None if has_loss else label)
    for ax in axes[:, 0]:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    if has_loss:
        axes[0, 0].set(yscale="log", ylabel=loss, title="Training loss")
        axes[0, 0].legend(fontsize=7, ncols=2)
    axes[-1, 0].set(xlabel="step (epoch)", ylabel="RMSD from initialization", title="RMSD(t), paper 001 Eq. 3")
    if not has_loss and has_width:
        axes[-1, 0].legend(fontsize=7, ncols=2)
    text = ("<p>Root-mean-square distance of all weights from their initial values against training time, one "
            "line per run, coloured by width (paper 001 Fig. 5). Wide networks stay close to their initialization; "
            "narrow ones travel further, and a jump in RMSD together with the loss marks a crossing into "
            "untrainability.</p>")
    return Section("Distance from initialization over training", text + figure_html(fig, "RMSD and loss vs step"),
                   "drift-rmsd")


def _time_to_loss_section(runs: pd.DataFrame, loss: str, theta: Sequence[float] | None) -> Section:
    lowest = runs.groupby("init_model_id")[loss].min().dropna()
    levels = sorted(set(theta if theta is not None else (float(lowest.max()), float(lowest.median()))),
                    reverse=True)
    fig, axes = _figure(7.2, 6.0, nrows=2)
    rows = []
    for th in levels:
        t = time_to_loss(runs[["init_model_id", "step", "rmsd", loss, "width"]], th, loss=loss)
        per_width = t.groupby("width")[["t_theta", "rmsd_theta"]].mean()
        axes[0, 0].plot(per_width.index, per_width["t_theta"], marker="o", label=f"θ = {th:.3g}")
        axes[1, 0].plot(per_width.index, per_width["rmsd_theta"], marker="o", label=f"θ = {th:.3g}")
        rows.append(per_width.reset_index().assign(theta=th))
    axes[0, 0].set(xscale="log", yscale="log", ylabel="t_θ (first step with loss ≤ θ)",
                   title="Time to reach loss θ, paper 001 Fig. 6")
    axes[1, 0].set(xscale="log", yscale="log", xlabel="width", ylabel="RMSD at t_θ")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    table = pd.concat(rows, ignore_index=True)[["theta", "width", "t_theta", "rmsd_theta"]]
    text = ("<p>For each loss level θ, the first checkpoint at which a run's training loss is at most θ and its RMSD "
            "from initialization there, averaged over the runs of each width (runs that never reach θ are left "
            "out). Wider networks reach a given loss closer to their initialization.</p>")
    body = text + figure_html(fig, "t_theta and RMSD at t_theta vs width") + table.to_html(
        index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0)
    return Section("Time and distance to reach a loss", body, "drift-theta")


def mask_section(images: Mapping[str, Sequence[tuple[int, np.ndarray]]], layer: str = "fc2.weight"
                 ) -> Section | None:
    """Paper 001 Fig. 1: one image of the weight matrix ``layer`` per checkpoint of each network, or None when
    ``images`` holds no matrix.

    images: network title → ``(step, weights)`` per checkpoint (any order; shown by step). Weights are ``(out, in)``
    (more dimensions are flattened to ``(shape[0], -1)``). The diverging colour scale is symmetric around 0 and shared
    by a network's checkpoints (± the ``IMAGE_QUANTILE`` of |w|). When the first checkpoint has exact zeros (a masked
    initialization), a table gives the RMS weight inside and outside its non-zero support at every checkpoint.
    """
    parts = []
    for title, ckpts in images.items():
        if not ckpts:
            continue
        ckpts = sorted(((int(step), np.asarray(w, dtype=np.float64)) for step, w in ckpts), key=lambda c: c[0])
        mats = [w.reshape(w.shape[0], -1) if w.ndim != 2 else w for _, w in ckpts]
        vmax = float(np.quantile(np.abs(np.concatenate([m.ravel() for m in mats])), IMAGE_QUANTILE)) or 1.0
        figs = [_weight_image(m, vmax, f"{title}: {layer} at step {step}", f"step {step}")
                for (step, _), m in zip(ckpts, mats)]
        parts.append(f"<h3>{_html.escape(title)}</h3><div class=\"grid\">{''.join(figs)}</div>")
        support = mats[0] != 0
        if support.any() and not support.all() and all(m.shape == support.shape for m in mats):
            table = pd.DataFrame({"step": [s for s, _ in ckpts],
                                  "RMS inside": [np.sqrt(np.mean(m[support] ** 2)) for m in mats],
                                  "RMS outside": [np.sqrt(np.mean(m[~support] ** 2)) for m in mats]})
            parts.append(table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0))
    if not parts:
        return None
    text = (f"<p>The weight matrix {_html.escape(layer)} (rows: output units, columns: input units) at each checkpoint "
            "of a network whose initial weights were zeroed outside a letter (paper 001 Fig. 1; red positive, blue "
            "negative, one colour scale per network). If the letter stays visible, training moved the weights little "
            "relative to their initial values. RMS inside / outside: root-mean-square weight on and off the "
            "initial non-zero support.</p>")
    return Section("Weight matrices over training", text + "".join(parts), "drift-images")


def _weight_image(W: np.ndarray, vmax: float, caption: str, title: str) -> str:
    fig, axes = _figure(3.4, 3.0)
    ax = axes[0, 0]
    im = ax.imshow(W, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    fig.colorbar(im, ax=ax, extend="both", shrink=0.85)
    ax.set(title=title, xlabel="input unit", ylabel="output unit")
    return figure_html(fig, caption)


def _fig3_section(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int) -> Section:
    from matplotlib.colors import LogNorm

    parts = ["<p>Density of final against initial weights with the median (line) and interquartile band of w_f at "
             "each w_i, the identity w_f = w_i (dotted) and the peak line of slope c_opt (dashed; paper 001 "
             "Fig. 3 and Appendix B).</p>"]
    for title, (wi, wf) in pairs.items():
        wi = np.asarray(wi, dtype=np.float64).ravel()
        wf = np.asarray(wf, dtype=np.float64).ravel()
        H, xe, ye = drift_kernels.joint_histogram(wi, wf, bins=120)
        centers, Q = drift_kernels.conditional_quantiles(wi, wf, bins=40)
        c_opt, res = drift_kernels.peak_slope(wi, wf, seed=seed)
        fig, axes = _figure(5.6, 4.6)
        ax = axes[0, 0]
        mesh = ax.pcolormesh(xe, ye, np.where(H > 0, H, np.nan).T, norm=LogNorm(), cmap="Blues", shading="flat")
        fig.colorbar(mesh, ax=ax, label="count")
        ax.fill_between(centers, Q[:, 0], Q[:, 2], color="#ffbf00", alpha=0.45, label="interquartile range")
        ax.plot(centers, Q[:, 1], color="k", lw=1.2, label="median")
        ax.plot(xe[[0, -1]], xe[[0, -1]], color="#555", ls=":", lw=1, label="w_f = w_i")
        r = wf - c_opt * wi
        b = float(np.median(r)) if np.isfinite(c_opt) else np.nan
        ax.plot(xe[[0, -1]], b + c_opt * xe[[0, -1]], color="#d62728", ls="--", lw=1.2,
                label=f"c_opt = {c_opt:.3f} ± {res:.1g}")
        ax.set(xlabel="initial weight w_i", ylabel="final weight w_f", title=title)
        ax.legend(fontsize=7, loc="upper left")
        parts.append(figure_html(fig, f"(w_i, w_f) density: {title}"))
    return Section("Final against initial weights", "".join(parts), "drift-joint")


def _density_section(groups: pd.Series, lab: pd.DataFrame | None, hist, weights, seed: int) -> Section | None:
    if weights:
        data = {g: [np.asarray(weights[m]).ravel() for m in groups.index[groups == g] if m in weights]
                for g in ("low", "mid", "high")}
        data = {g: np.concatenate(v) for g, v in data.items() if v}
        if not data:
            return None
        lo = min(np.nanquantile(v, 0.001) for v in data.values())
        hi = max(np.nanquantile(v, 0.999) for v in data.values())
        grid = np.linspace(lo, hi, 400)
        fig, axes = _figure()
        for g, v in data.items():
            axes[0, 0].plot(grid, weightstats.kde(v, grid, seed=seed), color=GROUP_COLORS[g], label=g)
        axes[0, 0].set(xlabel="weight", ylabel="density", title="Weights by accuracy group (KDE)")
        axes[0, 0].legend(fontsize=8)
        axes[0, 0].grid(alpha=0.3)
        figs = [figure_html(fig, "weight KDE per accuracy group")]
    elif hist is not None and lab is not None and len(lab) and np.shape(hist[0])[1] > 0:
        figs = _hist_density_figs(groups, lab, np.asarray(hist[0]), np.asarray(hist[1]))
    else:
        return None
    text = (f"<p>Weight distributions of the models grouped by tertiles of {_html.escape(str(groups.name))} (paper "
            "000): successful networks share a narrow distribution, poor ones vary.</p>")
    return Section("Weights by accuracy group", text + "".join(figs), "stats-groups")


def _hist_density_figs(groups: pd.Series, lab: pd.DataFrame, counts: np.ndarray, edges: np.ndarray) -> list[str]:
    """Per layer: each group's mean of the models' normalised histograms, resampled on a common grid."""
    order = lab.groupby("name", sort=False)["layer_id"].min().sort_values().index if "layer_id" in lab else \
        pd.unique(lab["name"])
    figs = []
    for name in list(order)[:MAX_LAYER_PLOTS]:
        rows = np.flatnonzero((lab["name"] == name).to_numpy() & lab["model_id"].isin(groups.index).to_numpy())
        rows = [r for r in rows if counts[r].sum() > 0 and np.isfinite(edges[r]).all()]
        if not rows:
            continue
        grid = np.linspace(min(edges[r][0] for r in rows), max(edges[r][-1] for r in rows), 300)
        fig, axes = _figure(6.0, 3.4)
        for g in ("low", "mid", "high"):
            sel = [r for r in rows if groups.get(lab["model_id"].iloc[r]) == g]
            if not sel:
                continue
            dens = np.mean([_step_density(counts[r], edges[r], grid) for r in sel], axis=0)
            axes[0, 0].plot(grid, dens, color=GROUP_COLORS[g], label=f"{g} ({len(sel)})")
        axes[0, 0].set(xlabel="weight", ylabel="density", title=f"{name}: normalised histogram per group")
        axes[0, 0].legend(fontsize=7)
        axes[0, 0].grid(alpha=0.3)
        figs.append(figure_html(fig, f"weight density of {name} per accuracy group"))
    return figs


def _step_density(counts: np.ndarray, edges: np.ndarray, grid: np.ndarray) -> np.ndarray:
    density = counts / (counts.sum() * np.diff(edges))
    idx = np.searchsorted(edges, grid, side="right") - 1
    inside = (idx >= 0) & (idx < counts.size)
    return np.where(inside, density[np.clip(idx, 0, counts.size - 1)], 0.0)


def _strength_section(groups: pd.Series, lab: pd.DataFrame) -> Section | None:
    wide = stat_vectors(lab[lab["model_id"].isin(groups.index)], ["ns_mean"], standardize=False)
    if wide.shape[1] < 2:
        return None
    names = [layer for _, layer in wide.columns]
    fig, axes = _figure(7.2, 3.8)
    table = {}
    for g in ("low", "mid", "high"):
        sub = wide[wide.index.isin(groups.index[groups == g])].to_numpy()
        if len(sub) < 3:
            continue
        corr = [float(pd.Series(sub[:, k]).corr(pd.Series(sub[:, k + 1]))) for k in range(sub.shape[1] - 1)]
        table[g] = corr
        axes[0, 0].plot(range(len(corr)), corr, marker="o", color=GROUP_COLORS[g], label=f"{g} ({len(sub)})")
    if not table:
        return None
    labels = [f"{a}→{b}" for a, b in zip(names[:-1], names[1:])]
    axes[0, 0].set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    axes[0, 0].set(ylabel="Pearson r across models", ylim=(-1.05, 1.05),
                   title="Correlation of mean node strength between consecutive layers")
    axes[0, 0].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    text = ("<p>For each pair of consecutive layers, the correlation across the models of a group of their mean "
            "node strength (sum of absolute incoming weights per unit; paper 000).</p>")
    df = pd.DataFrame(table, index=labels).reset_index(names="layers")
    return Section("Node strength across layers", text + figure_html(fig, "node strength correlation per group") +
                   df.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.3f}", border=0), "stats-strength")


def _map_section(groups: pd.Series, lab: pd.DataFrame, seed: int) -> Section | None:
    cols = [c for c in MAP_COLUMNS if c in lab.columns]
    if not cols:
        return None
    vec = stat_vectors(lab[lab["model_id"].isin(groups.index)], cols)
    if len(vec) < 5 or vec.shape[1] == 0:
        return None
    Z = embed(vec.to_numpy(), method="tsne", seed=seed)
    g = groups.reindex(vec.index).to_numpy()
    fig, axes = _figure(5.6, 4.6)
    for name in ("low", "mid", "high"):
        sel = g == name
        if sel.any():
            axes[0, 0].scatter(Z[sel, 0], Z[sel, 1], s=18, color=GROUP_COLORS[name], label=f"{name} ({sel.sum()})")
    axes[0, 0].set(xlabel="t-SNE 1", ylabel="t-SNE 2", title="Models by per-layer weight statistics")
    axes[0, 0].legend(fontsize=7)
    text = (f"<p>t-SNE map of the models, each described by its standardised per-layer statistics "
            f"({_html.escape(', '.join(cols))}), coloured by accuracy group (paper 000).</p>")
    return Section("Weight-space map", text + figure_html(fig, "t-SNE map by accuracy group"), "stats-tsne")


# ---- paper 000: accuracy groups of a sweep, per dataset x architecture --------------------------------------------

GROUPS = ("low", "mid", "high")
#: Models per dataset x architecture block whose weights are read for the histograms, KDEs and t-SNE map.
PAPER000_MAX_MODELS = 300


def paper000_blocks(models: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """``(dataset, series, rows)`` for each dataset x architecture (series) of a sweep: the rows of its trained
    networks (last ``step`` of the block) that carry an ``acc_group``; empty without an ``acc_group`` column."""
    if "acc_group" not in models.columns or "model_id" not in models.columns:
        return []
    rows = models[models["acc_group"].isin(GROUPS)]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    keys = [c for c in ("dataset", "series") if c in rows.columns]
    blocks = []
    for key, block in (rows.groupby(keys, sort=True) if keys else [((), rows)]):
        key = key if isinstance(key, tuple) else (key,)
        if "step" in block.columns:
            block = block[block["step"] == block["step"].max()]
        names = dict(zip(keys, map(str, key)))
        blocks.append((names.get("dataset", "all"), names.get("series", "all"), block))
    return blocks


def paper000_sample(block: pd.DataFrame, limit: int = PAPER000_MAX_MODELS, seed: int = 0) -> pd.DataFrame:
    """At most ``limit`` rows of ``block``, drawn without replacement by ``default_rng(seed)`` (order kept)."""
    if len(block) <= limit:
        return block
    pick = np.sort(np.random.default_rng(seed).choice(len(block), size=limit, replace=False))
    return block.iloc[pick]


def paper000_section(dataset: str, series: str, block: pd.DataFrame, layers: pd.DataFrame | None,
                     weights: Mapping[str, Mapping[str, np.ndarray]], *, seed: int = 0) -> Section:
    """Paper 000's figures for one dataset x architecture: weight mean/std by accuracy group (from the scan's layer
    table), weight histograms + KDE by group and a t-SNE map of the networks' weight vectors (from ``weights``:
    model_id → tensor name → array, the weight tensors of the networks to draw), mean node strength per layer by
    group with the within-network correlation of consecutive layers' node strengths (``ns_corr_prev``).

    block: the networks' model rows (``model_id``, ``acc_group``, ``final_acc``). layers: the layer table with
    ``model_id`` (see ``_with_model_id``), or None.
    """
    groups = pd.Series(block["acc_group"].to_numpy(), index=block["model_id"].astype(str), name="acc_group")
    counts = groups.value_counts()
    acc = block.groupby("acc_group")["final_acc"].agg(["min", "max", "mean"]) if "final_acc" in block else None
    parts = ["<p>" + ", ".join(
        f"{g}: {int(counts.get(g, 0))} networks" + (f" (accuracy {acc.loc[g, 'min']:.3f}–{acc.loc[g, 'max']:.3f})"
                                                    if acc is not None and g in acc.index else "")
        for g in GROUPS) + ". Paper 000: successful networks resemble each other in their converged weights; poor "
        "ones vary.</p>"]
    lab = None
    if layers is not None and len(layers) and "w_std" in layers.columns:
        lab = layers[layers["model_id"].isin(groups.index)].assign(acc_group=lambda d: d["model_id"].map(groups))
        parts += ["<h3>Weight mean and standard deviation by group</h3>",
                  "<p>Per layer: the mean over a group's networks of each network's weight mean and standard "
                  "deviation, and their spread (standard deviation) across the group's trials.</p>",
                  _group_stats_table(lab)]
    vectors = {m: w for m, w in weights.items() if m in groups.index}
    if vectors:
        parts += ["<h3>Weight distributions by group</h3>", _group_density_figure(groups, vectors, seed)]
    if lab is not None and "ns_mean" in lab.columns:
        parts += ["<h3>Node strength per layer by group</h3>", _group_strength(lab)]
    if len(vectors) >= 5:
        parts += ["<h3>t-SNE map of the weight vectors</h3>", _group_map(groups, vectors, seed)]
    return Section(f"Paper 000 accuracy groups: {dataset} × {series}", "".join(parts),
                   f"p000-{dataset}-{series}".replace(" ", "_"))


def _layer_order(lab: pd.DataFrame) -> list[str]:
    if "layer_id" in lab.columns:
        return list(lab.groupby("name", sort=False)["layer_id"].min().sort_values().index)
    return list(pd.unique(lab["name"]))


def _group_stats_table(lab: pd.DataFrame) -> str:
    order = _layer_order(lab)
    stats = lab.groupby(["name", "acc_group"])[["w_mean", "w_std"]].agg(["mean", "std", "count"])
    rows = []
    for name in order:
        for g in GROUPS:
            if (name, g) not in stats.index:
                continue
            s = stats.loc[(name, g)]
            rows.append({"layer": name, "group": g, "networks": int(s[("w_std", "count")]),
                         "w_mean (mean)": s[("w_mean", "mean")], "w_mean (std across trials)": s[("w_mean", "std")],
                         "w_std (mean)": s[("w_std", "mean")], "w_std (std across trials)": s[("w_std", "std")]})
    return pd.DataFrame(rows).to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0)


def _weight_tensors(w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weight matrices / kernels of a checkpoint (tensors of 2 or more dimensions), in their given order."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in w.items() if np.ndim(v) >= 2}


def _group_density_figure(groups: pd.Series, vectors: Mapping[str, Mapping[str, np.ndarray]], seed: int) -> str:
    names = list(_weight_tensors(next(iter(vectors.values()))))[:MAX_LAYER_PLOTS]
    fig, axes = _figure(3.2 * len(names), 3.2, ncols=len(names))
    for ax, name in zip(axes[0], names):
        pooled = {g: np.concatenate([np.ravel(vectors[m][name]) for m in groups.index[groups == g]
                                     if m in vectors and name in vectors[m]] or [np.empty(0)]) for g in GROUPS}
        pooled = {g: v for g, v in pooled.items() if v.size}
        lo = min(np.quantile(v, 0.001) for v in pooled.values())
        hi = max(np.quantile(v, 0.999) for v in pooled.values())
        grid = np.linspace(lo, hi, 300)
        for g, v in pooled.items():
            counts, edges = weightstats.histogram(v, bins=60, range=(lo, hi))
            ax.stairs(counts / (max(counts.sum(), 1) * np.diff(edges)), edges, color=GROUP_COLORS[g], alpha=0.35,
                      fill=True)
            ax.plot(grid, weightstats.kde(v, grid, seed=seed), color=GROUP_COLORS[g], lw=1.4, label=g)
        ax.set(xlabel="weight", title=name)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=7)
    return figure_html(fig, "normalised histograms (shaded) and Gaussian KDEs (lines) of the weights of each layer, "
                            "pooled over the networks of each accuracy group")


def _group_strength(lab: pd.DataFrame) -> str:
    order = _layer_order(lab)
    fig, axes = _figure(6.4, 3.6)
    ax = axes[0, 0]
    x = np.arange(len(order))
    for g in GROUPS:
        sub = lab[lab["acc_group"] == g].groupby("name")["ns_mean"]
        if not len(sub):
            continue
        mean, std = sub.mean().reindex(order), sub.std().reindex(order)
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=GROUP_COLORS[g], label=g)
    ax.set_xticks(x, order, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="mean node strength (Σ|w| in)", title="Node strength per layer (mean ± std over networks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    body = figure_html(fig, "node strength per layer by accuracy group")
    if "ns_corr_prev" in lab.columns and lab["ns_corr_prev"].notna().any():
        corr = lab.dropna(subset=["ns_corr_prev"]).groupby(["name", "acc_group"])["ns_corr_prev"].agg(["mean", "std"])
        table = corr.unstack("acc_group")
        table.columns = [f"{g} r ({stat})" for stat, g in table.columns]
        cols = [f"{g} r ({stat})" for g in GROUPS for stat in ("mean", "std") if f"{g} r ({stat})" in table.columns]
        table = table.reindex([n for n in order if n in table.index])[cols].reset_index(names="layer")
        body += ("<p>Inter-layer correlation: within each network, the Pearson correlation between the node "
                 "strengths of a layer's inputs (the previous layer's in-strengths) and this layer's out-strengths "
                 "over the hidden units they share (<code>ns_corr_prev</code>), mean and spread per group.</p>"
                 + table.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.3f}", border=0))
    return body


def _group_map(groups: pd.Series, vectors: Mapping[str, Mapping[str, np.ndarray]], seed: int) -> str:
    ids = [m for m in groups.index if m in vectors]
    X = np.stack([np.concatenate([np.ravel(v) for v in _weight_tensors(vectors[m]).values()]) for m in ids])
    Z = embed(X, method="tsne", seed=seed)
    g = groups.reindex(ids).to_numpy()
    fig, axes = _figure(5.6, 4.6)
    for name in GROUPS:
        sel = g == name
        if sel.any():
            axes[0, 0].scatter(Z[sel, 0], Z[sel, 1], s=14, color=GROUP_COLORS[name], label=f"{name} ({sel.sum()})")
    axes[0, 0].set(xlabel="t-SNE 1", ylabel="t-SNE 2", title="Networks by their flattened weights")
    axes[0, 0].legend(fontsize=7)
    return figure_html(fig, f"t-SNE (PCA to ≤50 dimensions first, seed {seed}) of the {len(ids)} networks' "
                            "concatenated weight tensors, coloured by accuracy group")
