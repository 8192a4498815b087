"""``zooscope demo``: the embedded default — train a small real zoo, scan it, regress, report.

It runs the same subcommands a user would (``sweep``, ``scan``, ``regress``, ``report``), so the demo is also
an end-to-end check of the command line. Rerunning it reuses the zoo and skips models already in the store.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from zooscope.commands._args import int_at_least

EXAMPLES = """examples:
  zooscope demo                          everything under ./zooscope-demo
  zooscope demo --out /tmp/demo --cluster none
"""

#: The demo zoo: 4 widths x 2 seeds x 3 checkpoints (epochs 0, 4 and 40) = 24 MLPs on scikit-learn's digits.
WIDTHS, SEEDS, EPOCHS, CHECKPOINTS = "16,32,64,128", "0,1", "40", "3"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a small zoo on digits, scan it, regress and report (no downloads)",
        description=__doc__, epilog=EXAMPLES,
    )
    parser.add_argument("--out", default="zooscope-demo", help="output directory (default: %(default)s)")
    parser.add_argument("--cluster", default="local",
                        help="Dask profile for the scan: local (default), none (in-process), or a cluster.yaml name")
    parser.add_argument("--workers", type=int_at_least(1), default=2,
                        help="workers of the local cluster (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zooscope.cli import main

    started = time.perf_counter()
    out = Path(args.out)
    zoo, store = out / "zoo", out / "demo.zarr"
    manifest = zoo / "manifest.csv"
    if not manifest.exists():
        print(f"[1/4] training the demo zoo into {zoo}")
        rc = main(["sweep", "--out", str(zoo), "--widths", WIDTHS, "--seeds", SEEDS, "--epochs", EPOCHS,
                   "--checkpoints", CHECKPOINTS])
        if rc:
            return rc
    else:
        print(f"[1/4] reusing the demo zoo in {zoo}")
    print(f"[2/4] scanning it into {store}")
    scan_rc = main(["scan", "--manifest", str(manifest), "--store", str(store), "--cluster", args.cluster,
                    "--workers", str(args.workers)])
    if scan_rc not in (0, 3):
        return scan_rc
    print("[3/4] regressing test accuracy against the metrics")
    rc = main(["regress", str(store), "--y", "test_acc", "--by", "dataset", "--out", str(out / "regress")])
    if rc:
        return rc
    print("[4/4] writing the report")
    report = out / "report.html"
    rc = main(["report", str(store), "--regress", str(out / "regress"), "--out", str(report)])
    if rc:
        return rc
    _print_summary(store, report, time.perf_counter() - started)
    return scan_rc


def _print_summary(store: Path, report: Path, seconds: float) -> None:
    import zooscope

    z = zooscope.open(str(store))
    models, layers = z.models, z.layers
    ok = int((models["status"] == "ok").sum())
    print(f"\nstore:  {store.resolve()}  ({ok}/{len(models)} models ok, {len(layers)} layers)")
    print(f"report: {report.resolve()}")
    columns = [c for c in ("series", "step", "test_acc", "alpha", "log_norm", "log_spectral_norm") if c in models]
    by_series = models.groupby(["series", "step"])[columns[2:]].mean().round(3) if "series" in models else None
    if by_series is not None:
        print("\nmean per width and epoch:\n" + by_series.to_string())
    print(f"\ndone in {seconds:.0f} s")
