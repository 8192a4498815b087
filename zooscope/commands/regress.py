"""``zooscope regress``: regress a quality column on model-level weight metrics, per (dataset, series)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from zooscope.commands._args import int_at_least

EXAMPLES = """examples:
  zooscope regress zoo.zarr --y top1_error --out regress/
      per (dataset, series) group present in the store, every summary metric against top1_error
  zooscope regress metrics.csv --y test_acc --by series --metrics alpha,log_spectral_norm --out r/
      a published metrics table (one row per model: 'model', grouping columns, y and metric columns)
  zooscope regress zoo.zarr --y top1_error --summary-mode robust --exclude-file outliers.txt --out r/
      robust model means (failed fits, alpha > 8 and embeddings dropped), without the listed model ids

Writes DIR/groups.csv, DIR/summary.csv, the same as Markdown, and one PNG per (group, metric).
exit status: 0 done, 2 usage error (bad source, missing or non-numeric column, nothing to fit).
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "regress",
        help="meta-regression of a quality column on weight metrics",
        description="Ordinary least squares of Y on each model-level metric within each group of models, with "
                    "R², MSE, rank correlations and a bootstrap interval for R² (paper 002, Table 3).",
        epilog=EXAMPLES,
    )
    parser.add_argument("source", metavar="SOURCE", help="zooscope store directory, or a CSV with one row per model")
    parser.add_argument("--y", required=True, metavar="COL", help="the quality column (e.g. top1_error)")
    parser.add_argument("--by", metavar="COLS",
                        help="grouping columns, comma-separated (default: whichever of dataset,series exist)")
    parser.add_argument("--metrics", metavar="COLS", help="metric columns, comma-separated (default: all summary "
                        "metrics present)")
    parser.add_argument("--min-models", type=int_at_least(3), default=4, metavar="N",
                        help="drop groups with fewer models (default 4)")
    excl = parser.add_mutually_exclusive_group()
    excl.add_argument("--exclude", metavar="IDS", help="model ids to leave out, comma-separated")
    excl.add_argument("--exclude-file", metavar="FILE", help="model ids to leave out, one per line (# comments)")
    parser.add_argument("--summary-mode", choices=("ww", "robust"), default="ww",
                        help="model means: ww (WeightWatcher's plain means) or robust (robust_<metric> columns)")
    parser.add_argument("--n-boot", type=int_at_least(0), default=1000, metavar="N",
                        help="bootstrap resamples for the R² interval (0: none; default 1000)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="bootstrap seed")
    parser.add_argument("--all-versions", action="store_true",
                        help="regress every stored version of each model (default: only the latest)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.set_defaults(func=run)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def load_source(source: str, summary_mode: str = "ww") -> pd.DataFrame:
    """The model table of a store (summary columns computed from its layers if missing) or of a metrics CSV."""
    from zooscope.pipelines.regress import load_metrics_csv
    from zooscope.pipelines.summary import SUMMARY_METRICS, summarize_models

    path = Path(source)
    if path.is_file():
        return load_metrics_csv(path)
    if not path.is_dir():
        raise ValueError(f"{source}: no such store directory or CSV file")
    from zooscope.engine.store import ZooStore

    prefix = "" if summary_mode == "ww" else f"{summary_mode}_"
    with ZooStore.open(str(path), "r") as store:
        models = store.models()
        if not any(prefix + m in models for m in SUMMARY_METRICS):
            esd = (lambda row: store.esd(int(row.name))) if summary_mode == "ww" else None
            summary = summarize_models(store.layers(), summary_mode, prefix=prefix, esd=esd)
            summary = summary.set_index("model_row").reindex(models.index.to_numpy())
            for column in summary.columns:
                if column not in models:
                    models[column] = summary[column].to_numpy()
    if "model" not in models and "model_id" in models:
        models.insert(0, "model", models["model_id"].astype(str))
    return models


def run(args: argparse.Namespace) -> int:
    from zooscope.pipelines.regress import regress, write_outputs
    from zooscope.pipelines.summary import SUMMARY_METRICS

    try:
        models = load_source(args.source, args.summary_mode)
        exclude = _split(args.exclude)
        if args.exclude_file:
            lines = Path(args.exclude_file).read_text(encoding="utf-8").splitlines()
            exclude = [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
        by = _split(args.by) if args.by is not None else [c for c in ("dataset", "series") if c in models]
        metrics = _split(args.metrics) or None
        if args.summary_mode == "robust" and metrics:
            metrics = [f"robust_{m}" if f"robust_{m}" in models else m for m in metrics]
        elif args.summary_mode == "robust":
            metrics = [f"robust_{m}" for m in SUMMARY_METRICS if f"robust_{m}" in models] or None
        result = regress(models, args.y, by=by, metrics=metrics, min_models=args.min_models, exclude=exclude,
                         n_boot=args.n_boot, seed=args.seed, all_versions=args.all_versions)
    except (ValueError, OSError) as exc:
        print(f"zooscope regress: error: {exc}", file=sys.stderr)
        return 2
    for message in result.messages:
        print(f"note: {message}", file=sys.stderr)
    if not len(result.groups):
        print(f"zooscope regress: error: no group has at least {args.min_models} models with {args.y} and a "
              "metric; lower --min-models or check --by", file=sys.stderr)
        return 2
    write_outputs(result, args.out)
    print(result.summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {len(result.groups)} group rows to {Path(args.out) / 'groups.csv'}")
    return 0
