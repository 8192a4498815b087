"""``zooscope bench svd``: time every eigenvalue backend on real shapes, check its accuracy, tune ``auto``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from zooscope.commands._args import int_at_least

DEFAULT_SHAPES = "9x64x64,9x256x256,1x768x768,1x3072x768,1x1024x1024"

EXAMPLES = f"""examples:
  zooscope bench svd
      every backend, fp64 and fp32, on {DEFAULT_SHAPES}
  zooscope bench svd --shapes 64x512x512,4x1024x1024 --precision fp64 --out bench-out/
      batch x N x M stacks; NxM means one matrix
  zooscope bench svd --model ckpts/resnet18.safetensors
      the distinct (slices x N x M) layer shapes of a checkpoint
  zooscope bench svd --tune
      measure, then save the fastest accurate backend per shape bucket as the routing table that
      backend="auto" uses ($ZOOSCOPE_HOME/esd_routing.json, ZOOSCOPE_HOME defaults to ~/.cache/zooscope)

Prints a table (seconds per call, speed-up over scipy-gesdd = WeightWatcher's path, max |Δλ|/λmax against
fp64 LAPACK SVD) and writes DIR/svd_bench.csv and DIR/svd_bench.png (time vs shape per backend).
exit status: 0 done, 2 usage error (bad shape, unreadable model, nothing measurable).
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the compute backends",
        description="Benchmarks of zooscope's compute backends on this machine.",
        epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    svd = sub.add_parser(
        "svd",
        help="eigenvalue backends: time and accuracy per shape",
        description="Time numpy/scipy/torch/cupy, SVD vs Gram+eigh, fp64 vs fp32 on stacks of heavy-tailed "
                    "matrices; error against fp64 LAPACK SVD.",
        epilog=EXAMPLES,
    )
    source = svd.add_mutually_exclusive_group()
    source.add_argument("--shapes", metavar="BxNxM,...", help=f"stacks to time (default {DEFAULT_SHAPES})")
    source.add_argument("--model", metavar="PATH", help="use the analysed layer shapes of this checkpoint")
    svd.add_argument("--precision", default="fp64,fp32", metavar="P,...", help="fp64, fp32 or both (default)")
    svd.add_argument("--backends", metavar="B,...", help="backends to time (default: every one available)")
    svd.add_argument("--repeats", type=int_at_least(1), default=3, metavar="N", help="timed calls per case (default 3)")
    svd.add_argument("--tune", action="store_true", help="save the routing table for backend='auto'")
    svd.add_argument("--table", metavar="FILE", help="where --tune saves (default $ZOOSCOPE_HOME/esd_routing.json)")
    svd.add_argument("--out", default="bench-svd", metavar="DIR", help="output directory (default bench-svd)")
    parser.set_defaults(func=run)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def model_shapes(path: str) -> list[tuple[int, int, int]]:
    """The distinct ``(n_slices, N, M)`` stacks of a checkpoint's analysed layers, from its shapes only."""
    from zooscope.pipelines.layers import plan_layers
    from zooscope.pipelines.readers import open_checkpoint

    with open_checkpoint(path) as ckpt:
        infos = plan_layers(ckpt)
    return sorted({(i.n_slices, i.N, i.M) for i in infos if i.skip_reason is None}, key=lambda s: (s[1] * s[2], s))


def plot(df: pd.DataFrame, path: Path) -> Path:
    """Seconds per call against shape (ordered by work B·N·M²), one line per backend and precision, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = df.drop_duplicates("shape").assign(work=lambda d: d["batch"] * d["n"] * d["m"] ** 2)
    order = order.sort_values("work")["shape"].tolist()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(order) + 3), 4.5))
    for (backend, precision), group in df.groupby(["backend", "precision"]):
        group = group.set_index("shape").reindex(order)
        ax.plot(order, group["seconds"], marker="o", linestyle="-" if precision == "fp64" else "--",
                label=f"{backend} {precision}")
    ax.set_yscale("log")
    ax.set_xlabel("stack (batch x N x M)")
    ax.set_ylabel("seconds per call")
    ax.set_title("Eigenvalues of WᵀW: time per backend")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(df: pd.DataFrame) -> None:
    """A rich table on a terminal, Markdown otherwise."""
    shown = df[["shape", "backend", "precision", "seconds", "speedup", "max_rel_error"]]
    if not sys.stdout.isatty():
        print(shown.to_markdown(index=False, floatfmt=".3g"))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="eigenvalue backends (speed-up vs scipy-gesdd, error vs fp64 LAPACK)")
    for column in shown.columns:
        table.add_column(column, justify="left" if column in {"shape", "backend", "precision"} else "right")
    for row in shown.itertuples(index=False):
        table.add_row(row.shape, row.backend, row.precision, f"{row.seconds:.4g}", f"{row.speedup:.3g}",
                      f"{row.max_rel_error:.2g}")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    from zooscope.engine import tune
    from zooscope.kernels.esd import BACKENDS, PRECISIONS

    try:
        if args.model:
            shapes = model_shapes(args.model)
            if not shapes:
                raise ValueError(f"{args.model}: no analysable layer")
        else:
            shapes = tune.parse_shapes(args.shapes or DEFAULT_SHAPES)
        precisions = _split(args.precision)
        backends = _split(args.backends) or list(BACKENDS)
        bad = [p for p in precisions if p not in PRECISIONS] + [b for b in backends if b not in BACKENDS]
        if bad or not precisions:
            raise ValueError(f"unknown precision or backend: {', '.join(bad) or '(none given)'}; "
                             f"precisions: {', '.join(PRECISIONS)}; backends: {', '.join(BACKENDS)}")
    except (ValueError, OSError, ImportError) as exc:
        print(f"zooscope bench svd: {exc}", file=sys.stderr)
        return 2
    if tune.REFERENCE_BACKEND not in backends:
        backends.insert(0, tune.REFERENCE_BACKEND)  # the baseline of the speed-up column

    from tqdm import tqdm

    from zooscope.kernels.backends import describe_device

    print(f"device: {describe_device()}", flush=True)
    with tqdm(total=None, desc="bench svd", unit="case", disable=None) as bar:
        df = tune.measure(shapes, backends, precisions, args.repeats,
                          progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    if df.empty:
        print("zooscope bench svd: no backend could run", file=sys.stderr)
        return 2
    df = tune.with_ratios(df)
    print_table(df)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "svd_bench.csv", index=False)
    print(f"wrote {out / 'svd_bench.csv'} and {plot(df, out / 'svd_bench.png')}")
    if args.tune:
        path = tune.save_table(tune.build_table(df), args.table)
        print(f"saved the routing table of {tune.device_key()} for backend='auto' to {path}")
    return 0
