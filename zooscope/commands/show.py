"""``zooscope show``: print a store's models (or layers) as a table."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import pandas as pd

EXAMPLES = """examples:
  zooscope show zoo.zarr
      one row per model: id, version, status, layer count, mean alpha, log norms ... (errors shown)
  zooscope show zoo.zarr --latest
      only the newest version of each model
  zooscope show zoo.zarr --model resnet50 --layers
      the layers of one model (every version of it; add --latest for the newest)
  zooscope show zoo.zarr --layers --columns name,N,M,alpha,D,log_spectral_norm --limit 0
      chosen columns, all rows
"""

MODEL_COLUMNS = ("model_id", "version", "status", "n_layers", "alpha", "alpha_weighted", "log_norm",
                 "log_spectral_norm", "log_alpha_norm", "error")
LAYER_COLUMNS = ("model_id", "layer_id", "name", "layer_type", "N", "M", "num_evals", "status", "alpha", "D",
                 "xmin", "log_norm", "log_spectral_norm", "warning", "error")
MAX_TEXT = 60
#: Console width when stdout is not a terminal: wide enough that tables are never folded.
PIPED_WIDTH = 1000


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "show",
        help="print a store's models or layers",
        description="Print the models (or layers) of a zooscope store as a table.",
        epilog=EXAMPLES,
    )
    parser.add_argument("store", metavar="STORE", help="zooscope store (directory or zarr URL)")
    parser.add_argument("--layers", action="store_true", help="show layer rows instead of model rows")
    parser.add_argument("--model", metavar="ID", help="only this model_id")
    parser.add_argument("--latest", action="store_true", help="only the newest version of each model")
    parser.add_argument("--columns", metavar="A,B", help="columns to show, comma-separated (default: a summary)")
    parser.add_argument("--limit", type=int, default=50, metavar="N", help="rows to show (default 50, 0: all)")
    parser.set_defaults(func=run)


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from zooscope.engine.store import ZooStore

    try:
        store = ZooStore.open(args.store, "r")
    except (FileNotFoundError, ValueError) as exc:
        print(f"zooscope show: error: {exc}", file=sys.stderr)
        return 2
    models = store.models(latest=args.latest)
    if args.model is not None:
        models = models[models["model_id"] == args.model] if len(models) else models
        if not len(models):
            print(f"zooscope show: error: no model {args.model!r} in {args.store}", file=sys.stderr)
            return 2
    if args.layers:
        frame = store.layers(models)
        if len(frame):
            frame.insert(0, "model_id", models["model_id"].reindex(frame["model_row"]).to_numpy())
        defaults, what = LAYER_COLUMNS, "layers"
    else:
        frame, defaults, what = models, MODEL_COLUMNS, "models"
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in frame.columns]
        if unknown:
            print(f"zooscope show: error: unknown column(s) {', '.join(unknown)}; {what} columns: "
                  f"{', '.join(map(str, frame.columns))}", file=sys.stderr)
            return 2
    else:
        wanted = [c for c in defaults if c in frame.columns]
    total = len(frame)
    if args.limit > 0:
        frame = frame.head(args.limit)

    table = Table()
    table.add_column(frame.index.name or "row", justify="right", style="dim")
    for col in wanted:
        numeric = pd.api.types.is_numeric_dtype(frame[col].dtype)
        table.add_column(col, justify="right" if numeric else "left", overflow="fold")
    errors = frame["status"].to_numpy() == "error" if "status" in frame.columns else np.zeros(len(frame), bool)
    for (index, row), is_error in zip(frame[wanted].iterrows(), errors):
        table.add_row(str(index), *(_cell(v) for v in row.tolist()), style="red" if is_error else None)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: the table at its natural width, not folded to 80 columns
        console = Console(width=PIPED_WIDTH)
    console.print(f"{args.store}: {total} {what}", markup=False, highlight=False, soft_wrap=True)
    console.print(table)
    if total > len(frame):
        console.print(f"… {total - len(frame)} more rows (--limit 0 shows all)")
    return 0
