"""``zooscope check``: verify the integrity of a store (counters, ESD offsets, model rows, duplicates)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """examples:
  zooscope check zoo.zarr
      prints OK and the committed row counts, or one line per fault
  zooscope check nightly.zarr || echo "store damaged"
      exit status: 0 sound, 1 faults found, 2 no store at that path
  zooscope check big.zarr --fast
      metadata and counters only (seconds on any store)

Checked (--fast and full): every column and array holds at least the committed rows; each layer's ESD slice
follows the previous one and the slices cover exactly the committed eigenvalues; layer rows point at existing
models, in order; one histogram row per layer row (when histograms are stored); no (model_id, content hash)
stored twice; the versions of each model_id are 1, 2, ... . Full (the default) also reads every committed chunk
of every array (present, decodable, of the right length) and checks the values that must be valid: eigenvalues
finite and >= 0, histogram rows finite, model ids non-empty, statuses known, alpha of an ok layer not NaN, each
model's n_layers layer rows. Rows a crashed writer left beyond the counters are not faults: they are invisible
to readers and removed when the store is next opened for writing.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="verify a store's integrity",
        description="Verify the integrity of a zooscope store; exit 1 on any fault.",
        epilog=EXAMPLES,
    )
    parser.add_argument("store", metavar="STORE", help="zooscope store (directory or zarr URL)")
    parser.add_argument("--fast", action="store_true", help="metadata and counters only, no data chunk read")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zooscope.engine.store import ZooStore

    try:
        store = ZooStore.open(args.store, "r")
    except (FileNotFoundError, ValueError) as exc:
        print(f"zooscope check: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # unreadable metadata (a corrupt zarr.json) is a fault of the store, not a crash
        print(f"FAULT {args.store}: cannot open: {type(exc).__name__}: {exc}")
        return 1
    problems = store.check(full=not args.fast)
    for problem in problems:
        print(f"FAULT {args.store}: {problem}")
    if problems:
        print(f"{len(problems)} fault(s) in {args.store}")
        return 1
    c = store.counters
    print(f"OK {args.store}: {c['n_models']} models, {c['n_layers']} layers, {c['n_esd']} eigenvalues, "
          f"{c['n_drift']} drift rows")
    return 0
