"""``zooscope show``: print a store's models (or layers) as a table."""
from __future__ import annotations

import argparse
import sys
from typing import Any
from zooscope.commands._args import int_at_least

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
    parser.add_argument("--limit", type=int_at_least(0), default=50, metavar="N",
                        help="rows to show (default 50, 0: all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zooscope.commands._table import pick_columns, print_frame
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
        frame = store.layers(models)  # carries model_id
        defaults, what = LAYER_COLUMNS, "layers"
    else:
        frame, defaults, what = models, MODEL_COLUMNS, "models"
    try:
        wanted = pick_columns(frame, args.columns, defaults)
    except ValueError as exc:
        print(f"zooscope show: error: {exc}", file=sys.stderr)
        return 2
    print_frame(frame, wanted, title=f"{args.store}: {len(frame)} {what}", limit=args.limit)
    return 0
