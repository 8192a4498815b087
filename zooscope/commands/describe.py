"""``zooscope describe``: the layers a checkpoint would be analysed as, from shapes only (nothing computed)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """examples:
  zooscope describe model.safetensors
      one row per weight tensor: type, N, M, rf, eigenvalue count, and why it would be skipped
  zooscope describe llama-70b/ --analysed
      only the layers 'zooscope analyze' would analyse (reads shard headers only: seconds)
  zooscope describe model.gguf --ww-version 0.7.7 --out plan.csv
      WeightWatcher 0.7.7's min_evals; every column written to plan.csv

exit status: 0 done, 2 unreadable checkpoint or bad option.
"""

COLUMNS = ("name", "layer_type", "shape", "N", "M", "rf", "num_evals", "skip_reason")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "describe",
        help="list a checkpoint's layers and how they would be analysed (shapes only)",
        description="List the weight tensors of one checkpoint (any format 'analyze' reads) with their layer type, "
                    "matrix sides N >= M, kernel positions rf, eigenvalue count and skip reason, from shapes only "
                    "(WeightWatcher's describe()).",
        epilog=EXAMPLES,
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file or model directory")
    parser.add_argument("--min-evals", type=int, default=None,
                        help="skip layers with fewer eigenvalues (default: the --ww-version's)")
    parser.add_argument("--max-evals", type=int, default=15000, help="skip layers with more eigenvalues")
    parser.add_argument("--ww-version", default="0.7.5", choices=("0.7.5", "0.7.7"),
                        help="WeightWatcher release whose defaults to use")
    parser.add_argument("--slices", action="store_true", help="count eigenvalues per Conv2D kernel position")
    parser.add_argument("--analysed", action="store_true", help="only the layers that would be analysed")
    parser.add_argument("--out", metavar="CSV", help="also write every column to this CSV file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zooscope import describe
    from zooscope.commands._table import print_frame, write_csv
    from zooscope.pipelines.readers import CheckpointError

    try:
        frame = describe(args.model, min_evals=args.min_evals, max_evals=args.max_evals,
                         ww_version=args.ww_version, pool=not args.slices)
    except (CheckpointError, ValueError) as exc:
        print(f"zooscope describe: error: {exc}", file=sys.stderr)
        return 2
    n_used = int((frame["skip_reason"] == "").sum())
    n_skipped = len(frame) - n_used
    if args.analysed:
        frame = frame[frame["skip_reason"] == ""]
    if args.out and not write_csv(frame, args.out, "describe"):
        return 2
    print_frame(frame.set_index("layer_id"), list(COLUMNS),
                title=f"{args.model}: {n_used} layers analysed, {n_skipped} weights skipped")
    return 0
