"""Model-level summaries: means over a model's layers of the spectral metrics (WeightWatcher ``get_summary``)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

#: The metrics WeightWatcher 0.7 ``get_summary`` averages, in its order (``mp_softrank`` only when present).
SUMMARY_METRICS = (
    "log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank", "mp_softrank",
)
MODES = ("ww", "robust")


def weightwatcher_rows(layers: pd.DataFrame, esd: Callable[[pd.Series], np.ndarray] | None = None) -> pd.DataFrame:
    """The rows WeightWatcher would report, with failed fits written the way it writes them.

    Rows with ``status == 'error'`` do not exist in WeightWatcher's details and are dropped. A failed fit
    (``status == 'failed'``; NaN alpha in a table without ``status``) gets alpha, D, sigma, xmin and num_pl_spikes
    −1 and warning 'over-trained'. WeightWatcher keeps alpha = −1 in its formulas: ``alpha_weighted = −log10 λmax``
    and ``log_alpha_norm = log10 Σ λ⁻¹`` over all eigenvalues, which needs the ESD (``esd(row)``); without it
    that layer's ``log_alpha_norm`` stays NaN and the plain mean skips it. Returns ``layers`` itself when no row
    changes.
    """
    df = layers
    if "status" in df:
        df = df[df["status"] != "error"]
        failed = (df["status"] == "failed").to_numpy()
    else:
        failed = df["alpha"].isna().to_numpy() if "alpha" in df else np.zeros(len(df), bool)
    if not failed.any():
        return df
    df = df.copy()
    for column in ("alpha", "D", "sigma", "xmin", "num_pl_spikes"):
        if column in df:
            df.loc[failed, column] = -1.0
    if "warning" in df:
        df.loc[failed, "warning"] = "over-trained"
    if "alpha_weighted" in df and "log_spectral_norm" in df:
        df.loc[failed, "alpha_weighted"] = -df.loc[failed, "log_spectral_norm"]
    if "log_alpha_norm" in df and esd is not None:
        for idx in df.index[failed]:
            evals = np.asarray(esd(df.loc[idx]), dtype=np.float64)
            if evals.size:
                with np.errstate(divide="ignore"):
                    df.loc[idx, "log_alpha_norm"] = np.log10(np.sum(1.0 / evals))
    return df


def _robust_frame(
    layers: pd.DataFrame, max_alpha: float, drop_types: tuple[str, ...], drop_first_last: bool
) -> pd.DataFrame:
    """Layers with a successful fit, alpha ≤ ``max_alpha``, not of ``drop_types``, optionally not first/last."""
    df = layers
    if "status" in df:
        df = df[df["status"] != "error"]
    if drop_first_last and len(df):
        order = df["layer_id"] if "layer_id" in df else pd.Series(np.arange(len(df)), index=df.index)
        df = df[(order != order.min()) & (order != order.max())]
    keep = np.ones(len(df), bool)
    if "status" in df:
        keep &= (df["status"] == "ok").to_numpy()
    if "alpha" in df:
        keep &= (df["alpha"] <= max_alpha).to_numpy()
    if "layer_type" in df and drop_types:
        keep &= ~df["layer_type"].isin(drop_types).to_numpy()
    return df[keep]


def model_summary(
    layers: pd.DataFrame,
    mode: str = "ww",
    *,
    max_alpha: float = 8.0,
    drop_types: tuple[str, ...] = ("embedding",),
    drop_first_last: bool = False,
    esd: Callable[[pd.Series], np.ndarray] | None = None,
) -> dict:
    """Means over one model's layer rows of the ``SUMMARY_METRICS`` present in ``layers``.

    ``layers`` uses the zooscope layer columns (docs/INTERFACES.md); failed fits have ``status='failed'`` and
    NaN numbers. Modes:

    - ``ww``: WeightWatcher 0.7 ``get_summary``: plain mean (NaN skipped) over every analysed layer, failed fits
      counted with alpha = −1, ``alpha_weighted = −log10 λmax`` and ``log_alpha_norm = log10 Σλ⁻¹`` (the latter
      only when ``esd(row) -> eigenvalues`` is given; see ``weightwatcher_rows``). ``max_alpha``/``drop_*`` are ignored.
    - ``robust``: mean over layers with ``status == 'ok'``, ``alpha <= max_alpha``, ``layer_type`` not in
      ``drop_types``, and with ``drop_first_last`` without the first and last layer (by ``layer_id``).

    Returns ``{metric: float}`` plus ``n_layers`` (analysed layers, ``status != 'error'``) and ``n_used``
    (layers that entered the means). Metrics with no usable value are NaN.
    """
    if mode not in MODES:
        raise ValueError(f"unknown summary mode {mode!r}; expected one of {MODES}")
    analysed = layers[layers["status"] != "error"] if "status" in layers else layers
    if mode == "ww":
        used = weightwatcher_rows(layers, esd)
    else:
        used = _robust_frame(layers, max_alpha, tuple(drop_types), drop_first_last)
    out: dict = {}
    for metric in SUMMARY_METRICS:
        if metric in used:
            col = pd.to_numeric(used[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
            out[metric] = float(col.mean()) if col.notna().any() else float("nan")
    out["n_layers"] = int(len(analysed))
    out["n_used"] = int(len(used))
    return out


def summarize_models(
    layers: pd.DataFrame,
    mode: str = "ww",
    *,
    prefix: str | None = None,
    esd: Callable[[pd.Series], np.ndarray] | None = None,
    **options,
) -> pd.DataFrame:
    """One row per model of ``model_summary`` over a layer table holding many models.

    Models are keyed by ``model_row`` (store layer tables), else ``model_id``, else ``model``; the key is the
    first column. Metric columns are named ``prefix + metric`` (default: no prefix for ``ww``, ``robust_`` for
    ``robust``, the store's naming). ``n_layers`` counts analysed layers; ``n_params`` is Σ N·M·rf over them
    (N·M for a per-slice row; weights in the analysed matrices, biases and skipped tensors excluded). ``options`` go to
    ``model_summary``.
    """
    key = next((k for k in ("model_row", "model_id", "model") if k in layers), None)
    if key is None:
        raise ValueError("layer table needs a model key column: one of model_row, model_id, model")
    if prefix is None:
        prefix = "" if mode == "ww" else f"{mode}_"
    rows = []
    for model, group in layers.groupby(key, sort=True):
        summary = model_summary(group, mode, esd=esd, **options)
        row = {key: model}
        row.update({prefix + m: summary[m] for m in SUMMARY_METRICS if m in summary})
        row["n_layers"] = summary["n_layers"]
        if {"N", "M"} <= set(group.columns):
            analysed = group[group["status"] != "error"] if "status" in group else group
            rf = analysed["rf"].to_numpy() if "rf" in analysed else 1
            if "slice_id" in analysed:  # a per-slice row (pool=False) holds one N x M slice of its layer
                rf = np.where(analysed["slice_id"].fillna(-1).to_numpy() >= 0, 1, rf)
            row["n_params"] = int((analysed["N"].to_numpy() * analysed["M"].to_numpy() * rf).sum())
        rows.append(row)
    return pd.DataFrame(rows)
