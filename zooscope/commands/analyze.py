"""``zooscope analyze``: one checkpoint's layer metrics and summary on the terminal (no store)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from zooscope.commands._args import int_at_least

EXAMPLES = """examples:
  zooscope analyze model.safetensors
      one row per layer matrix (WeightWatcher's metrics), then the model's means
  zooscope analyze ckpt.pt --ww-version 0.7.7 --ww-compat --out layers.csv
      WeightWatcher 0.7.7's defaults and its -1 for failed fits; every column written to layers.csv
  zooscope analyze hf-model/ --columns name,N,M,alpha,D,xmin,stable_rank --mp-fit
      chosen columns (any of the CSV's), with the Marchenko-Pastur fit
  zooscope analyze cnn.pt --slices --fix-fingers clip_xmax
      one row per Conv2D kernel position, power laws fitted with WeightWatcher's clip_xmax

Options are WeightWatcher's analyze() options; 'zooscope scan' analyses many checkpoints into a store.
exit status: 0 done, 2 unreadable checkpoint or bad option.
"""

#: Columns printed by default (of WeightWatcher's details frame), after ``layer_id``.
COLUMNS = ("name", "slice_id", "layer_type", "N", "M", "num_evals", "alpha", "D", "xmin", "num_pl_spikes",
           "alpha_weighted", "log_spectral_norm", "stable_rank", "warning")


def register(subparsers: Any) -> None:
    from zooscope.commands.scan import add_analysis_arguments

    parser = subparsers.add_parser(
        "analyze",
        help="print one checkpoint's layer metrics (WeightWatcher-style)",
        description="Analyse one checkpoint (safetensors, HF directory, .pt/.pth/.bin, .npz) and print one row "
                    "per layer matrix with WeightWatcher's column names, then the model's means.",
        epilog=EXAMPLES,
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file or model directory")
    parser.add_argument("--ww-compat", action="store_true",
                        help="failed fits as WeightWatcher writes them (alpha = -1), and its bugs that change numbers")
    parser.add_argument("--out", metavar="CSV", help="also write every column of every layer to this CSV file")
    parser.add_argument("--columns", metavar="A,B", help="columns to print, comma-separated (default: a summary)")
    parser.add_argument("--limit", type=int_at_least(0), default=0, metavar="N",
                        help="layers to print (default 0: all)")
    add_analysis_arguments(parser)
    extra = parser.add_argument_group("one model only")
    extra.add_argument("--fix-fingers", choices=("clip_xmax", "xmin_peak"), help="WeightWatcher's fix_fingers")
    extra.add_argument("--slices", action="store_true",
                       help="one row per Conv2D kernel position (WeightWatcher's pool=False / ww2x)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from zooscope import _analyze
    from zooscope.commands._table import console, pick_columns, print_frame, write_csv
    from zooscope.commands.scan import option_values
    from zooscope.pipelines.readers import CheckpointError
    from zooscope.pipelines.summary import SUMMARY_METRICS, model_summary

    started = time.perf_counter()
    try:
        result, frame = _analyze(args.model, ww_compat=args.ww_compat, fix_fingers=args.fix_fingers,
                                 pool=not args.slices, **option_values(args))
    except (CheckpointError, ValueError) as exc:
        print(f"zooscope analyze: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    try:
        columns = pick_columns(frame, args.columns, COLUMNS)
    except ValueError as exc:
        print(f"zooscope analyze: error: {exc}", file=sys.stderr)
        return 2
    if args.out and not write_csv(frame, args.out, "analyze"):
        return 2
    print_frame(frame.set_index("layer_id"), [c for c in columns if c != "layer_id"],
                title=f"{args.model}: {len(frame)} layer matrices ({seconds:.2f} s)", limit=args.limit)
    if len(result.layers):
        means = {mode: model_summary(result.layers, mode, esd=lambda row: result.esd[row.name])
                 for mode in ("ww", "robust")}
        table = pd.DataFrame({mode: {**{m: v for m, v in s.items() if m in SUMMARY_METRICS},
                                     "layers used": s["n_used"]} for mode, s in means.items()}).T
        table.index = ["mean (WeightWatcher get_summary)", "robust mean (ok fits, alpha <= 8, no embeddings)"]
        print_frame(table.rename_axis("summary"), list(table.columns), title="")
    if args.out:
        console().print(f"every column: {args.out}", markup=False, highlight=False)
    return 0
