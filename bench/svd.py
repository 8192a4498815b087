"""Eigenvalue backends on real layer shapes, and the vectorised MP fit against WeightWatcher's.

    python bench/svd.py                       # both tables, default shapes
    python bench/svd.py --shapes 9x64x64,1x3072x768 --precision fp64 --skip-mp

Table 1: every available backend × precision on conv stacks (9×64², 9×256²) and transformer matrices (768²,
3072×768, 1024², 2048²), seconds per call and speed-up over scipy-gesdd (WeightWatcher's path) measured in the
same run, error max |Δλ|/λmax against fp64 LAPACK SVD.
Table 2: ``zooscope.kernels.spectral.mp_fit`` against ``weightwatcher``'s ``WeightWatcher.mp_fit`` on the same
eigenvalues: time and the largest relative difference over its columns.
Both are appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import record  # noqa: E402

from zooscope.engine import tune  # noqa: E402
from zooscope.kernels.esd import BACKENDS, eigenvalues  # noqa: E402
from zooscope.kernels.spectral import MP_COLUMNS, mp_fit  # noqa: E402

DEFAULT_SHAPES = "9x64x64,9x256x256,1x768x768,1x3072x768,1x1024x1024,1x2048x2048"
MP_SHAPES = "1x1000x500,1x3072x768,1x1024x1024"


def bench_backends(shapes, precisions, repeats) -> None:
    df = tune.with_ratios(tune.measure(shapes, BACKENDS, precisions, repeats,
                                       progress=lambda label: print(f"  {label}", file=sys.stderr)))
    table = df[["shape", "backend", "precision", "seconds", "speedup", "max_rel_error"]].rename(
        columns={"speedup": "speed-up vs scipy-gesdd", "max_rel_error": "max |Δλ|/λmax"})
    record("Eigenvalue backends (zooscope.kernels.esd)", table.to_markdown(index=False, floatfmt=".3g"),
           f"median of {repeats} calls after a warm-up, host array in/out; Student-t(3) fp32 stacks; "
           "speed-up = scipy-gesdd time / this time at the same shape and precision")


def bench_mp_fit(shapes) -> None:
    logging.disable(logging.WARNING)
    import weightwatcher

    watcher = weightwatcher.WeightWatcher()
    rows = []
    for shape in shapes:
        _, n, m = shape
        lam = np.sort(eigenvalues(tune.heavy_tailed_stack(shape), backend="scipy-gesdd").ravel())
        start = time.perf_counter()
        ours = mp_fit(lam, n=n, m=m)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        ref = watcher.mp_fit(lam, n, m, 1, "layer", 0, 0, False, False, "", "blue", 0.5, True, lam)
        t_ww = time.perf_counter() - start
        ref = dict(zip(("num_spikes", "sigma_mp", "mp_softrank", "bulk_min", "bulk_max", "W_scale"), ref))
        diff = max(abs(ours[k] - ref[k]) / max(abs(ref[k]), 1e-300) for k in MP_COLUMNS)
        rows.append({"shape": tune.shape_label(shape), "num_evals": lam.size, "weightwatcher s": t_ww,
                     "zooscope s": t_ours, "speed-up": t_ww / t_ours, "max rel diff": diff,
                     "sigma_mp": ours["sigma_mp"], "num_spikes": ours["num_spikes"]})
    record("MP fit: zooscope.kernels.spectral.mp_fit vs weightwatcher 0.7.7 WeightWatcher.mp_fit",
           pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"),
           "same eigenvalues (Student-t(3) matrices, scipy-gesdd); one call each; max rel diff over "
           "num_spikes, sigma_mp, mp_softrank, W_scale, bulk_max, bulk_min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"BxNxM,... (default {DEFAULT_SHAPES})")
    parser.add_argument("--precision", default="fp64,fp32", help="fp64,fp32 (default both)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per case (default 2)")
    parser.add_argument("--mp-shapes", default=MP_SHAPES, help=f"shapes for the MP-fit table (default {MP_SHAPES})")
    parser.add_argument("--skip-mp", action="store_true", help="only the backend table")
    args = parser.parse_args()
    bench_backends(tune.parse_shapes(args.shapes), [p for p in args.precision.split(",") if p], args.repeats)
    if not args.skip_mp:
        bench_mp_fit(tune.parse_shapes(args.mp_shapes))


if __name__ == "__main__":
    main()
