"""Quantiles of weight rows: ``kernels.weightstats.quantile_rows`` (order statistics by binning, Numba) against
numpy's routes to the same numbers, on the same rows in one run.

Rows: a zoo bucket (770 small-CNN conv layers of 16×16×3×3, float32: what one scan task holds) and one large conv
layer (512×512×3×3, float32). Baselines: ``np.quantile`` of the rows in fp64 (in float32 it interpolates in
float32: other numbers); the rows sorted (``np.sort(axis=1)``, the
route before, in row blocks on the same threads) and ``np.partition`` at the needed ranks (the route before for
rows of 2^19 values or more). Every route's quantiles are checked equal to ``np.quantile``'s, bit for bit.

    python bench/quantiles.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import functools

import numpy as np

from _results import best_time, load_average, record
from zooscope.kernels.backends import map_row_blocks
from zooscope.kernels.weightstats import QUANTILES, quantile_ranks, quantile_rows, quantiles_at_ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per route; the fastest is kept")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {"zoo bucket 770 × (16,16,3,3)": rng.standard_t(3, size=(770, 2304)).astype(np.float32),
             "one conv layer (512,512,3,3)": rng.standard_t(3, size=(1, 2359296)).astype(np.float32)}
    rows = ["| rows | values | zooscope ms | baseline | baseline ms | baseline / zooscope | same bits |",
            "|---|---|---|---|---|---|---|"]
    for name, x in cases.items():
        n = x.shape[1]
        kth = quantile_ranks(n, QUANTILES)
        reference = np.quantile(x.astype(np.float64), QUANTILES, axis=1)
        quantile_rows(x[:1], QUANTILES)  # Numba's first call (cache load or compile) outside the timing
        t_ours, ours = best_time(lambda: quantile_rows(x, QUANTILES), args.repeats)
        baselines = {
            "np.quantile(axis=1) of fp64": lambda: np.quantile(x.astype(np.float64), QUANTILES, axis=1),
            "np.sort rows (row blocks)": lambda: quantiles_at_ranks(
                map_row_blocks(functools.partial(np.sort, axis=1), x)[:, kth], n, QUANTILES),
            "np.partition at the ranks": lambda: quantiles_at_ranks(np.partition(x, kth, axis=1)[:, kth], n,
                                                                    QUANTILES),
        }
        for label, route in baselines.items():
            t_base, theirs = best_time(route, args.repeats)
            same = np.array_equal(ours, reference) and np.array_equal(theirs, reference)
            rows.append(f"| {name} | {x.size} | {1e3 * t_ours:.2f} | {label} | {1e3 * t_base:.2f} | "
                        f"{t_base / t_ours:.1f}x | {same} |")
    record("Quantiles of weight rows: order statistics kernel vs numpy", "\n".join(rows),
           notes=f"fastest of {args.repeats}; Student-t (df 3) float32 rows; quantiles {QUANTILES}; {load_average()}")


if __name__ == "__main__":
    main()
