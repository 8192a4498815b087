"""Weight-statistics and distance-from-init kernels against the direct routes, on synthetic layers.

- ``moments`` (one fp64 pass + one quantile call) vs ``scipy.stats`` skew/kurtosis + ``np.quantile`` per level.
- ``peak_slope`` (binned Gaussian KDE per slope, coarse grid + 2 refinements) vs the same search with
  ``scipy.stats.gaussian_kde`` evaluated on a 512-point grid per slope (subsampled to 20k points to stay feasible),
  and vs the brute-force B.6 window count (sorted residuals, δ = bandwidth) on the same slope grid.
- ``drift_table`` throughput (weights/s) on a two-layer safetensors checkpoint pair.
- ``--zoo MANIFEST``: a sweep's drift in a scan against its spectral analysis, this tree against ``--baseline``
  (a git revision, exported and run in its own process), on the same files in one run: the spectral scan of the
  manifest without its ``init`` column, then a rescan with it (the models are skipped, only drift runs); the two
  drift tables are compared (c_opt, resolution, rmsd bit for bit; the fits' relative differences).

Usage: python bench/bench_drift.py [--sizes 100000 1000000]
       python bench/bench_drift.py --zoo /tmp/ztp/sweep-1000/manifest_small.csv [--baseline main] [--cluster none]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import importable_tree, record  # noqa: E402
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
    ap.add_argument("--zoo", help="manifest of a sweep (with an init column): drift vs spectral, this tree vs "
                    "--baseline")
    ap.add_argument("--baseline", default="main", help="git revision to compare with (--zoo)")
    ap.add_argument("--cluster", default="none", help="scan cluster profile (--zoo)")
    ap.add_argument("--worker", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return zoo_worker(*args.worker, cluster=args.cluster)
    if args.zoo:
        return zoo_main(args.zoo, args.baseline, args.cluster)
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


def zoo_worker(manifest: str, out: str, cluster: str) -> None:
    """In this process's tree: spectral scan without ``init``, then the drift-only rescan; timings to OUT.json,
    the drift table to OUT.pkl."""
    import pandas as pd

    from zooscope.engine.scan import scan

    zoo = Path(manifest).resolve().parent
    table = pd.read_csv(manifest)
    variant = zoo / f".bench_drift_noinit_{os.getpid()}.csv"  # next to the zoo: manifest paths stay inside it
    warm = zoo / f".bench_drift_warm_{os.getpid()}.csv"
    table.drop(columns=["init"]).to_csv(variant, index=False)
    table.head(8).to_csv(warm, index=False)
    timings = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            scan(store=f"{d}/warm.zarr", manifest=str(warm), cluster=cluster, progress=False)  # JIT compiles
            for phase, m in (("spectral", variant), ("drift", manifest)):
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                report = scan(store=f"{d}/zoo.zarr", manifest=str(m), cluster=cluster, progress=False)
                timings[phase] = {"s": time.perf_counter() - t0, "load": load, "n_ok": report.n_ok,
                                  "n_drift": report.n_drift}
            import zooscope

            zooscope.open(f"{d}/zoo.zarr").drift.to_pickle(out + ".pkl")
    finally:
        variant.unlink()
        warm.unlink()
    Path(out + ".json").write_text(json.dumps(timings))


def _run_worker(tree: Path, manifest: str, out: str, cluster: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", manifest, out, "--cluster", cluster],
                   check=True, env=env, cwd=str(tree))
    return json.loads(Path(out + ".json").read_text())


def _export(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` (of this repository) in ``into``, importable as ``zooscope``."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return importable_tree(into)


def zoo_main(manifest: str, baseline: str, cluster: str) -> None:
    import pandas as pd

    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "baseline").mkdir()
        base_tree = _export(baseline, Path(d) / "baseline")
        before = _run_worker(base_tree, manifest, f"{d}/before", cluster)
        after = _run_worker(here, manifest, f"{d}/after", cluster)
        key = ["model_id", "init_model_id", "layer"]
        old = pd.read_pickle(f"{d}/before.pkl").sort_values(key).reset_index(drop=True)
        new = pd.read_pickle(f"{d}/after.pkl").sort_values(key).reset_index(drop=True)
    assert old[key].equals(new[key]), "the two scans stored different drift rows"
    diffs = []
    for col in ("rmsd", "c_opt", "c_opt_resolution", "a0", "a1", "b0", "b1", "b2", "sigma_at_0"):
        a, b = old[col].to_numpy(float), new[col].to_numpy(float)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.nanmax(np.abs(a - b) / np.abs(a)) if not same.all() else 0.0
        diffs.append(f"{col} {int(same.sum())}/{same.size} equal, max rel {rel:.1e}")
    rows = ["| tree | spectral scan s | drift rescan s | drift / spectral | pairs | load at start (spectral, drift) |",
            "|---|---|---|---|---|---|"]
    for name, t in ((f"baseline `{baseline}`", before), ("this tree", after)):
        rows.append(f"| {name} | {t['spectral']['s']:.1f} | {t['drift']['s']:.1f} | "
                    f"{t['drift']['s'] / t['spectral']['s']:.2f} | {t['drift']['n_drift']} | "
                    f"{t['spectral']['load']:.1f}, {t['drift']['load']:.1f} |")
    rows.append(f"| speedup of drift | | {before['drift']['s'] / after['drift']['s']:.1f}x | | | |")
    record("Drift from initialization in a sweep scan, batched vs one task per pair",
           "\n".join(rows), f"{manifest}, {len(new)} drift rows, cluster {cluster}, "
           f"os.cpu_count() {os.cpu_count()}, NUMBA_NUM_THREADS {os.environ.get('NUMBA_NUM_THREADS', 'default')}; "
           "shared machine (load averages in the table); stored tables compared: " + "; ".join(diffs))


if __name__ == "__main__":
    main()
