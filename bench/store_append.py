"""Store throughput: appending many small models to a zooscope Zarr store, batched commits vs one commit per model.

Each synthetic model has ``--layers`` layer rows with the columns of a real scan (about 50: identity, fit,
norms, weight statistics), ``--evals`` eigenvalues per layer and a ``--bins``-bin histogram per layer. The same
results are appended

- with the store's default batching (commit every 256 models or 10 s), for ``--models`` models;
- with a commit after every model (``flush_every=1``, the naive streaming writer), for ``--baseline-models``;
- in one single commit (every model buffered, the bulk-write upper bound), for ``--models`` models;

and the committed store is read back (models and layers tables, every ESD). Rows per second and the ratio to the
commit-per-model baseline, all measured in this run, go to ``bench/RESULTS.md``.

    python bench/store_append.py --models 2000 --baseline-models 200
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import record  # noqa: E402

from zooscope.engine.store import ZooStore  # noqa: E402
from zooscope.pipelines.result import ModelResult  # noqa: E402

METRICS = ("alpha", "D", "xmin", "xmax", "sigma", "lambda_max", "spectral_norm", "norm", "log_norm",
           "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "sv_max", "sv_min",
           "w_mean", "w_std", "w_skew", "w_kurtosis", "w_min", "w_max", "w_q01", "w_q25", "w_q50", "w_q75",
           "w_q99", "w_frac_zero", "ns_mean", "ns_std")
INTS = ("layer_id", "N", "M", "Q_int", "rf", "num_evals", "num_pl_spikes", "matrix_rank", "rank_loss",
        "weak_rank_loss")
TEXT = ("name", "layer_type", "status", "error", "warning", "esd_backend", "fit_backend")


def synthetic_results(n: int, layers: int, evals: int, bins: int, seed: int = 0) -> list[ModelResult]:
    """``n`` distinct model results with realistic column sets."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        frame = {c: rng.random(layers) for c in METRICS}
        frame.update({c: rng.integers(0, 1000, layers) for c in INTS})
        frame.update({c: [f"{c}-{i}" for i in range(layers)] for c in TEXT})
        esd = [np.sort(rng.exponential(size=evals)) for _ in range(layers)]
        out.append(ModelResult(pd.DataFrame(frame), esd, rng.random((layers, bins)),
                               np.sort(rng.random((layers, bins + 1)), axis=1), n_params=int(rng.integers(1e6))))
    return out


def append_all(path: Path, results: list[ModelResult], flush_every: int) -> float:
    """Seconds to append ``results`` (and close, i.e. commit) into a new store at ``path``."""
    t0 = time.perf_counter()
    with ZooStore.open(path, "a", flush_every=flush_every, flush_seconds=1e9,
                       max_pending_values=1 << 40) as store:
        for i, res in enumerate(results):
            store.append({"model_id": f"model-{i:05d}", "path": f"/zoo/model-{i:05d}.safetensors",
                          "content_hash": f"{i:064x}", "series": f"s{i % 7}", "top1_error": 0.01 * (i % 50),
                          "seconds": 1.0, "alpha": 3.0, "log_norm": 1.0}, res)
    return time.perf_counter() - t0


def read_all(path: Path) -> tuple[float, int]:
    """Seconds to read the models and layers tables and every ESD; number of eigenvalues read."""
    t0 = time.perf_counter()
    store = ZooStore.open(path, "r")
    store.models()
    store.layers()
    total = sum(len(e) for e in store.esds())
    return time.perf_counter() - t0, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--baseline-models", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--evals", type=int, default=128)
    parser.add_argument("--bins", type=int, default=64)
    args = parser.parse_args()

    results = synthetic_results(args.models, args.layers, args.evals, args.bins)
    tmp = Path(tempfile.mkdtemp(prefix="zooscope-bench-store-"))
    try:
        runs = [("commit per model (flush_every=1)", args.baseline_models, 1),
                ("batched (default: every 256 models)", args.models, 256),
                ("one commit (all buffered)", args.models, args.models)]
        timings = []
        for i, (label, n, every) in enumerate(runs):
            seconds = append_all(tmp / f"s{i}.zarr", results[:n], every)
            timings.append((label, n, seconds))
            print(f"{label}: {n} models in {seconds:.2f} s", flush=True)
        read_s, n_values = read_all(tmp / "s1.zarr")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_rate = timings[0][1] / timings[0][2]
    lines = ["| writer | models | layer rows | eigenvalues | seconds | models/s | layer rows/s | x commit-per-model |",
             "|---|---|---|---|---|---|---|---|"]
    for label, n, seconds in timings:
        lines.append(f"| {label} | {n} | {n * args.layers} | {n * args.layers * args.evals} | {seconds:.2f} | "
                     f"{n / seconds:.0f} | {n * args.layers / seconds:.0f} | {n / seconds / base_rate:.1f} |")
    n = args.models
    lines.append(f"| read back (models, layers, every ESD via esds()) | {n} | {n * args.layers} | {n_values} "
                 f"| {read_s:.2f} | {n / read_s:.0f} | {n * args.layers / read_s:.0f} | |")
    record("Store append throughput: batched commits vs one commit per model",
           "\n".join(lines),
           notes=f"{args.layers} layers x {len(METRICS) + len(INTS) + len(TEXT) + 3} columns per model, "
                 f"{args.evals} eigenvalues and a {args.bins}-bin histogram per layer; local directory store; "
                 f"times include closing the store (final commit, trim)")


if __name__ == "__main__":
    main()
