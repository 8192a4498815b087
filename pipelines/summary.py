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
    out = model_summaries(layers, np.zeros(len(layers), np.int64), 1, mode, max_alpha=max_alpha,
                          drop_types=drop_types, drop_first_last=drop_first_last, esd=esd)
    return {k: int(v[0]) if k in ("n_layers", "n_used") else float(v[0]) for k, v in out.items()}


def model_summaries(
    layers: pd.DataFrame,
    model_of_row: np.ndarray,
    n_models: int,
    mode: str = "ww",
    *,
    max_alpha: float = 8.0,
    drop_types: tuple[str, ...] = ("embedding",),
    drop_first_last: bool = False,
    esd: Callable[[pd.Series], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``model_summary`` of many models at once: row ``i`` of ``layers`` belongs to model ``model_of_row[i]``
    (0 ≤ index < ``n_models``). Returns ``{metric: (n_models,) float}`` plus ``n_layers`` and ``n_used`` (int)."""
    if mode not in MODES:
        raise ValueError(f"unknown summary mode {mode!r}; expected one of {MODES}")
    model_of_row = np.asarray(model_of_row, dtype=np.int64)
    analysed = (layers["status"] != "error").to_numpy() if "status" in layers else np.ones(len(layers), bool)
    if mode == "ww":
        used = weightwatcher_rows(layers, esd)
        owner = model_of_row[analysed] if "status" in layers else model_of_row
    else:
        keep = analysed.copy()
        if drop_first_last and keep.any():
            order = layers["layer_id"].to_numpy() if "layer_id" in layers else np.arange(len(layers))
            first = np.full(n_models, np.inf)
            last = np.full(n_models, -np.inf)
            np.minimum.at(first, model_of_row[keep], order[keep])
            np.maximum.at(last, model_of_row[keep], order[keep])
            keep &= (order != first[model_of_row]) & (order != last[model_of_row])
        if "status" in layers:
            keep &= (layers["status"] == "ok").to_numpy()
        if "alpha" in layers:
            keep &= (layers["alpha"] <= max_alpha).to_numpy()
        if "layer_type" in layers and drop_types:
            keep &= ~layers["layer_type"].isin(drop_types).to_numpy()
        used, owner = layers[keep], model_of_row[keep]
    out: dict[str, np.ndarray] = {}
    for metric in SUMMARY_METRICS:
        if metric in used:
            values = pd.to_numeric(used[metric], errors="coerce").to_numpy(dtype=np.float64)
            finite = np.isfinite(values)
            count = np.bincount(owner[finite], minlength=n_models)
            total = np.bincount(owner[finite], weights=values[finite], minlength=n_models)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[metric] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    out["n_layers"] = np.bincount(model_of_row[analysed], minlength=n_models)
    out["n_used"] = np.bincount(owner, minlength=n_models)
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
    codes, models = pd.factorize(layers[key], sort=True)
    summary = model_summaries(layers, codes, len(models), mode, esd=esd, **options)
    out = pd.DataFrame({key: np.asarray(models)})
    for m in SUMMARY_METRICS:
        if m in summary:
            out[prefix + m] = summary[m]
    out["n_layers"] = summary["n_layers"]
    if {"N", "M"} <= set(layers.columns):
        analysed = (layers["status"] != "error").to_numpy() if "status" in layers else np.ones(len(layers), bool)
        rf = layers["rf"].to_numpy() if "rf" in layers else np.ones(len(layers))
        if "slice_id" in layers:  # a per-slice row (pool=False) holds one N x M slice of its layer
            rf = np.where(layers["slice_id"].fillna(-1).to_numpy() >= 0, 1, rf)
        weights = (layers["N"].to_numpy() * layers["M"].to_numpy() * rf)[analysed]
        out["n_params"] = np.bincount(codes[analysed], weights=weights, minlength=len(models)).astype(np.int64)
    return out


def summary_columns(result, model_of_row: np.ndarray, n_models: int) -> dict[str, np.ndarray]:
    """The summary columns of the model rows of a ``ModelResult`` holding ``n_models`` models (row ``i`` belongs to
    ``model_of_row[i]``): WeightWatcher's means and the robust ones (``robust_*``), each ``(n_models,)``."""
    def esd(layer_row: pd.Series) -> np.ndarray:
        return result.esd[layer_row.name]

    ww = model_summaries(result.layers, model_of_row, n_models, "ww", esd=esd)
    robust = model_summaries(result.layers, model_of_row, n_models, "robust")
    return {**{m: ww[m] for m in SUMMARY_METRICS if m in ww},
            **{f"robust_{m}": robust[m] for m in SUMMARY_METRICS if m in robust}}
