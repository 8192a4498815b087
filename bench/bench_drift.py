"""Weight-statistics and distance-from-init kernels against the direct routes, on synthetic layers.

- ``moments`` (one fp64 pass + one quantile call) vs ``scipy.stats`` skew/kurtosis + ``np.quantile`` per level.
- ``peak_slope`` (binned Gaussian KDE per slope, coarse grid + 2 refinements) vs the same search with
  ``scipy.stats.gaussian_kde`` evaluated on a 512-point grid per slope (subsampled to 20k points to stay feasible),
  and vs the brute-force B.6 window count (sorted residuals, δ = bandwidth) on the same slope grid.
- ``drift_table`` throughput (weights/s) on a two-layer safetensors checkpoint pair.

Usage: python bench/bench_drift.py [--sizes 100000 1000000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import record  # noqa: E402
from zooscope.kernels import drift, weightstats  # noqa: E402


def _time(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def moments_direct(w: np.ndarray) -> dict:
    x = w.astype(np.float64).ravel()
    return {"mean": x.mean(), "std": x.std(), "skew": stats.skew(x), "kurt": stats.kurtosis(x),
            **{q: np.quantile(x, q) for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)}}


def c_search(objective, grid: np.ndarray) -> float:
    c = grid[int(np.argmax([objective(c) for c in grid]))]
    step = grid[1] - grid[0]
    for _ in range(2):
        cs = np.linspace(c - step, c + step, 21)
        c = cs[int(np.argmax([objective(v) for v in cs]))]
        step /= 10
    return float(c)


def peak_slope_scipy_kde(wi, wf, n_sub=20_000):
    idx = np.random.default_rng(0).choice(wi.size, min(n_sub, wi.size), replace=False)
    x, y = wi[idx], wf[idx]

    def peak(c):
        r = y - c * x
        grid = np.linspace(r.min(), r.max(), 512)
        return stats.gaussian_kde(r)(grid).max()
    return c_search(peak, drift.C_GRID)


def peak_slope_window(wi, wf, delta):
    def peak(c):
        r = np.sort(wf - c * wi)
        return np.max(np.searchsorted(r, r + delta, side="right") - np.arange(r.size))
    return c_search(peak, drift.C_GRID)


def ridge(n: int, c: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    wi = rng.uniform(-0.1, 0.1, n)
    on = rng.random(n) < 0.5
    return wi, np.where(on, c * wi + 0.002 * rng.standard_normal(n), rng.normal(0, 0.1, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args()
    rows = ["| task | n weights | zooscope s | baseline | baseline s | baseline / zooscope | |c − 0.8| zooscope | "
            "|c − 0.8| baseline |", "|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        w = np.random.default_rng(1).standard_t(5, n).astype(np.float32)
        tz, _ = _time(lambda: weightstats.moments(w), 3)
        tb, _ = _time(lambda: moments_direct(w), 3)
        rows.append(f"| moments | {n} | {tz:.3f} | scipy.stats + np.quantile ×7 | {tb:.3f} | {tb / tz:.2f} | | |")
        wi, wf = ridge(n)
        tz, (c, res) = _time(lambda: drift.peak_slope(wi, wf))
        h = res * np.ptp(wi)
        tb, cb = _time(lambda: peak_slope_window(wi, wf, h))
        rows.append(f"| peak_slope | {n} | {tz:.3f} | brute-force B.6 window count | {tb:.3f} | {tb / tz:.2f} | "
                    f"{abs(c - 0.8):.4f} | {abs(cb - 0.8):.4f} |")
        tb, cb = _time(lambda: peak_slope_scipy_kde(wi, wf))
        rows.append(f"| peak_slope | {n} | {tz:.3f} | scipy gaussian_kde (20k subsample) | {tb:.3f} | "
                    f"{tb / tz:.2f} | {abs(c - 0.8):.4f} | {abs(cb - 0.8):.4f} |")
    from safetensors.numpy import save_file

    from zooscope.pipelines.drift import drift_table

    rng = np.random.default_rng(2)
    init = {"fc1.weight": rng.uniform(-0.05, 0.05, (1000, 784)).astype(np.float32),
            "fc2.weight": rng.uniform(-0.05, 0.05, (1000, 1000)).astype(np.float32)}
    final = {k: v + rng.normal(0, 0.005, v.shape).astype(np.float32) for k, v in init.items()}
    with tempfile.TemporaryDirectory() as d:
        save_file(init, f"{d}/i.safetensors")
        save_file(final, f"{d}/f.safetensors")
        tz, table = _time(lambda: drift_table(f"{d}/i.safetensors", f"{d}/f.safetensors", model_id="f",
                                              init_model_id="i", step=1))
    n = sum(v.size for v in init.values())
    rows.append(f"| drift_table (2 layers + all) | {n} | {tz:.3f} | weights per second | {n / tz:.3g} | | | |")
    record("Weight statistics and drift kernels vs direct routes", "\n".join(rows),
           "best of 3 for moments, one run otherwise; peak_slope baselines use the same coarse grid (81 slopes) "
           "and two 21-point refinements; true slope 0.8, half the pairs on the ridge, half broad background")


if __name__ == "__main__":
    main()
