"""Meta-regression of a model-level quality column on weight metrics, per group (paper 002, Tables 3, 7, 8).

For every group (e.g. one ``(dataset, series)``) and every metric: ordinary least squares ``y = a + b·x`` with
R², MSE = SSR/n, RMSE, Kendall τ (tau-b), Spearman ρ and a paired-bootstrap percentile interval for R²; then the
mean and sample standard deviation (ddof = 1) of R² and MSE over groups per metric.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from zooscope.pipelines.summary import SUMMARY_METRICS

GROUP_COLUMNS = (
    "metric", "n", "slope", "intercept", "r2", "mse", "rmse", "kendall_tau", "spearman_rho",
    "r2_ci_low", "r2_ci_high", "status",
)
SUMMARY_COLUMNS = ("metric", "n_groups", "r2_mean", "r2_std", "mse_mean", "mse_std")
ID_COLUMNS = ("model", "model_id")


@dataclass
class RegressionResult:
    """Output of ``regress``.

    groups: one row per (group, metric): the ``by`` columns then ``GROUP_COLUMNS``; ``status`` is ``ok`` or
        ``not fittable: <reason>`` (numbers NaN then).
    summary: one row per metric over the ``ok`` groups: ``SUMMARY_COLUMNS``.
    data: the rows used (after exclusions), for plots: id column, ``by`` columns, ``y`` and the metrics.
    dropped: per metric, rows dropped because ``y`` or the metric was missing (NaN) or infinite.
    small_groups: per metric, groups dropped for having fewer than ``min_models`` usable rows.
    excluded: rows removed by ``exclude``.
    messages: human-readable notes on all of the above.
    """

    groups: pd.DataFrame
    summary: pd.DataFrame
    y: str
    by: tuple[str, ...]
    metrics: tuple[str, ...]
    data: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    small_groups: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    messages: list[str] = field(default_factory=list)


def _id_column(df: pd.DataFrame) -> str | None:
    return next((c for c in ID_COLUMNS if c in df), None)


def _check_numeric(df: pd.DataFrame, column: str, role: str) -> None:
    """Raise ``ValueError`` naming ``column`` and its first non-numeric value if it is not numeric."""
    if pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column]):
        return
    coerced = pd.to_numeric(df[column], errors="coerce")
    bad = df[column][coerced.isna() & df[column].notna()]
    example = f"; first non-numeric value {bad.iloc[0]!r} in row {bad.index[0]!r}" if len(bad) else ""
    raise ValueError(f"{role} column {column!r} is not numeric (dtype {df[column].dtype}){example}")


def _r2_statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """R² of the OLS line = squared Pearson r, vectorised along ``axis``; 0 where x or y has no variance."""
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    sxy = (xc * yc).sum(axis=axis)
    sxx = (xc * xc).sum(axis=axis)
    syy = (yc * yc).sum(axis=axis)
    den = sxx * syy
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, sxy * sxy / np.where(den > 0, den, 1.0), 0.0)


def fit_one(x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, rng: np.random.Generator | None = None) -> dict:
    """OLS of ``y`` on ``x`` (1-D, same length, no NaN) with rank correlations and a bootstrap R² interval.

    Returns the ``GROUP_COLUMNS`` except ``metric`` as a dict. Constant x or y gives ``status`` ``not fittable:
    constant x`` / ``constant y`` and NaN numbers. The interval is the 2.5–97.5 % percentile interval of R² over
    ``n_boot`` paired resamples (``scipy.stats.bootstrap``; resamples with constant x count as R² = 0);
    ``n_boot=0`` skips it.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"fit_one needs 1-D x and y of the same length, got shapes {x.shape} and {y.shape}")
    n = len(x)
    out = dict.fromkeys(GROUP_COLUMNS[1:], np.nan)
    out["n"] = n
    if n == 0:
        out["status"] = "not fittable: 0 points"
        return out
    for name, v in (("x", x), ("y", y)):
        if np.ptp(v) == 0:
            out["status"] = f"not fittable: constant {name}"
            return out
    if n < 3:
        out["status"] = f"not fittable: {n} points"
        return out
    fit = stats.linregress(x, y)
    resid = y - (fit.intercept + fit.slope * x)
    mse = float(np.mean(resid * resid))
    out.update(
        slope=float(fit.slope), intercept=float(fit.intercept), r2=float(fit.rvalue**2), mse=mse,
        rmse=float(np.sqrt(mse)), kendall_tau=float(stats.kendalltau(x, y).statistic),
        spearman_rho=float(stats.spearmanr(x, y).statistic), status="ok",
    )
    if n_boot > 0:
        ci = stats.bootstrap(
            (x, y), _r2_statistic, paired=True, vectorized=True, n_resamples=n_boot, method="percentile",
            confidence_level=0.95, rng=rng if rng is not None else np.random.default_rng(0),
        ).confidence_interval
        out["r2_ci_low"], out["r2_ci_high"] = float(ci.low), float(ci.high)
    return out


def _finite_rows(df: pd.DataFrame, *columns: str) -> pd.Series:
    """Rows whose ``columns`` are all finite numbers (NaN and ±inf are missing values here)."""
    return np.isfinite(df[list(columns)].astype(float)).all(axis=1)


def regress(
    models: pd.DataFrame,
    y: str,
    *,
    by: tuple[str, ...] | list[str] = ("dataset", "series"),
    metrics: tuple[str, ...] | list[str] | None = None,
    min_models: int = 4,
    exclude: tuple[str, ...] | list[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
    all_versions: bool = False,
) -> RegressionResult:
    """Regress ``y`` on each metric within each group of ``models`` (one row per model).

    ``by``: grouping columns (empty: one group of all rows). ``metrics``: metric columns (default: the
    ``summary.SUMMARY_METRICS`` present, plain or ``robust_``). ``exclude``: model ids removed first (matched in
    the ``model`` or ``model_id`` column). Per metric, rows with NaN or ±inf in ``y`` or the metric are dropped and
    groups with fewer than ``min_models`` remaining rows are dropped; both are counted in the result. The
    bootstrap of each (group, metric) uses its own generator seeded from ``(seed, group number, metric
    number)``, so results are reproducible and independent of which other groups exist. A table with
    ``model_id`` and ``version`` columns (a store's) keeps only each model's latest version unless
    ``all_versions``.

    Raises ``ValueError`` with a clear message for a missing ``y``/``by``/metric column, a non-numeric one, no
    metrics at all, or ``min_models < 3``.
    """
    by = tuple(by)
    if min_models < 3:
        raise ValueError(f"min_models must be at least 3 (a line through 2 points always fits), got {min_models}")
    if y not in models:
        raise ValueError(f"y column {y!r} not in the table; columns are {list(models.columns)}")
    missing_by = [c for c in by if c not in models]
    if missing_by:
        raise ValueError(f"grouping column(s) {missing_by} not in the table; columns are {list(models.columns)}")
    if metrics is None:
        candidates = (*SUMMARY_METRICS, *(f"robust_{m}" for m in SUMMARY_METRICS))
        metrics = tuple(c for c in candidates if c in models and c != y)
        if not metrics:
            raise ValueError(f"no metric columns found (looked for {list(SUMMARY_METRICS)}); pass metrics=")
    metrics = tuple(metrics)
    missing = [m for m in metrics if m not in models]
    if missing:
        raise ValueError(f"metric column(s) {missing} not in the table; columns are {list(models.columns)}")
    _check_numeric(models, y, "y")
    for m in metrics:
        _check_numeric(models, m, "metric")

    messages: list[str] = []
    id_col = _id_column(models)
    df = models
    if not all_versions and {"model_id", "version"} <= set(df.columns):
        latest = df.groupby("model_id", sort=False)["version"].transform("max")
        older = df["version"] != latest
        if older.any():
            df = df[~older]
            messages.append(f"used the latest version of each model: {int(older.sum())} older version row(s) "
                            "left out (all_versions=True / --all-versions keeps them)")
    n_excluded = 0
    if exclude:
        if id_col is None:
            raise ValueError("exclude= needs a 'model' or 'model_id' column to match ids against")
        ids = {str(e) for e in exclude}
        mask = df[id_col].astype(str).isin(ids)
        n_excluded = int(mask.sum())
        unknown = ids - set(df.loc[mask, id_col].astype(str))
        df = df[~mask]
        messages.append(f"excluded {n_excluded} model(s)")
        if unknown:
            messages.append(f"exclude: {len(unknown)} id(s) not found: {sorted(unknown)[:10]}")
    keep_cols = [c for c in (id_col, *by, y, *metrics) if c is not None]
    df = df.loc[:, list(dict.fromkeys(keep_cols))].reset_index(drop=True)

    rows: list[dict] = []
    dropped: dict[str, int] = {}
    small: dict[str, int] = {}
    grouped = list(df.groupby(list(by), sort=True, dropna=False)) if by else [((), df)]
    for mi, metric in enumerate(metrics):
        ok_rows = _finite_rows(df, y, metric)
        dropped[metric] = int((~ok_rows).sum())
        small[metric] = 0
        for gi, (key, group) in enumerate(grouped):
            key = key if isinstance(key, tuple) else (key,)
            sub = group[ok_rows.loc[group.index]]
            if len(sub) < min_models:
                small[metric] += 1
                continue
            rng = np.random.default_rng([seed, gi, mi])
            res = fit_one(sub[metric].to_numpy(float), sub[y].to_numpy(float), n_boot=n_boot, rng=rng)
            rows.append({**dict(zip(by, key)), "metric": metric, **res})
        if dropped[metric]:
            messages.append(f"{metric}: dropped {dropped[metric]} row(s) with a missing value (NaN or ±inf) in "
                            f"{y!r} or {metric!r}")
        if small[metric]:
            messages.append(f"{metric}: dropped {small[metric]} group(s) with fewer than {min_models} models")
    groups = pd.DataFrame(rows, columns=[*by, *GROUP_COLUMNS])
    unfit = groups[groups["status"] != "ok"]
    for _, r in unfit.iterrows():
        where = ", ".join(f"{c}={r[c]}" for c in by) or "all models"
        messages.append(f"{r['metric']} [{where}]: {r['status']}")
    return RegressionResult(
        groups=groups, summary=summarize_groups(groups, metrics), y=y, by=by, metrics=metrics, data=df,
        dropped=dropped, small_groups=small, excluded=n_excluded, messages=messages,
    )


def summarize_groups(groups: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Per metric over the ``ok`` groups: number of groups, mean and std (ddof=1) of R² and MSE (Table 3 layout)."""
    ok = groups[groups["status"] == "ok"]
    rows = []
    for metric in metrics:
        g = ok[ok["metric"] == metric]
        rows.append({
            "metric": metric, "n_groups": len(g),
            "r2_mean": g["r2"].mean(), "r2_std": g["r2"].std(ddof=1),
            "mse_mean": g["mse"].mean(), "mse_std": g["mse"].std(ddof=1),
        })
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def load_metrics_csv(path: str | Path) -> pd.DataFrame:
    """Read a metrics table (one row per model) from CSV; it must have a ``model`` column."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot read as CSV: {exc}") from exc
    if "model" not in df:
        raise ValueError(f"{path}: a metrics CSV needs a 'model' column; it has {list(df.columns)}")
    return df


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "all"


def group_label(row: pd.Series | dict, by: tuple[str, ...]) -> str:
    """``dataset=imagenet, series=vgg`` for a groups row (``all models`` without grouping)."""
    return ", ".join(f"{c}={row[c]}" for c in by) or "all models"


def plot_name(row: pd.Series | dict, by: tuple[str, ...]) -> str:
    """File name of the PNG of one (group, metric) row of ``RegressionResult.groups``."""
    return _slug("__".join([*(str(row[c]) for c in by), str(row["metric"])])) + ".png"


def group_figures(result: RegressionResult, max_plots: int | None = None):
    """Yield ``(groups_row, Figure)``: metric against y with the fitted line, per fitted (group, metric) row."""
    from zooscope.pipelines.plots import regression_plot

    fitted = result.groups[result.groups["status"] == "ok"]
    if max_plots is not None:
        fitted = fitted.head(max_plots)
    id_col = _id_column(result.data)
    for _, row in fitted.iterrows():
        sel = np.ones(len(result.data), bool)
        for c in result.by:
            sel &= (result.data[c] == row[c]).to_numpy() | (result.data[c].isna() & pd.isna(row[c])).to_numpy()
        sub = result.data[sel]
        sub = sub[_finite_rows(sub, result.y, row["metric"])]
        fig = regression_plot(
            sub[row["metric"]].to_numpy(float), sub[result.y].to_numpy(float),
            slope=row["slope"], intercept=row["intercept"], r2=row["r2"],
            xlabel=row["metric"], ylabel=result.y, title=group_label(row, result.by),
            labels=sub[id_col].astype(str).tolist() if id_col else None,
        )
        yield row, fig


def write_outputs(result: RegressionResult, out_dir: str | Path) -> list[Path]:
    """Write ``groups.csv``, ``summary.csv``, ``groups.md``, ``summary.md`` and one PNG per fitted (group,
    metric) into ``out_dir`` (created), plus ``data.csv`` and ``regression.json`` from which ``load_outputs``
    rebuilds the result. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.data.to_csv(out / "data.csv", index=False)
    meta = {"y": result.y, "by": list(result.by), "metrics": list(result.metrics), "dropped": result.dropped,
            "small_groups": result.small_groups, "excluded": result.excluded, "messages": result.messages}
    (out / "regression.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    written = [out / "data.csv", out / "regression.json"]
    for name, table in (("groups", result.groups), ("summary", result.summary)):
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n", encoding="utf-8")
        written += [out / f"{name}.csv", out / f"{name}.md"]
    for row, fig in group_figures(result):
        path = out / plot_name(row, result.by)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    return written


def load_outputs(out_dir: str | Path) -> RegressionResult:
    """Read back a ``RegressionResult`` written by ``write_outputs`` (for reports)."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / "regression.json").read_text(encoding="utf-8"))
        groups = pd.read_csv(out / "groups.csv")
        summary = pd.read_csv(out / "summary.csv")
        data = pd.read_csv(out / "data.csv")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{out}: not a complete 'zooscope regress' output directory: {exc}") from exc
    return RegressionResult(
        groups=groups, summary=summary, y=meta["y"], by=tuple(meta["by"]), metrics=tuple(meta["metrics"]),
        data=data, dropped=meta["dropped"], small_groups=meta["small_groups"], excluded=meta["excluded"],
        messages=meta["messages"],
    )
