"""Zoo scaling: scan throughput (models/s, MB/s) over 1, 2, 4, ... Dask CPU workers (and a GPU worker), the
workers' peak memory, and the time a nightly rerun takes when nothing is new.

    python bench/scaling.py --n-models 12 --workers 1,2                   # the 2-core CI machine
    python bench/scaling.py --n-models 200 --workers 1,2,4,8 --gpu        # the 16-core GPU machine

CPU rows run the ``local`` profile with ``gpus: 0`` (CPU workers only, none sees a GPU). ``--gpu`` adds the
``local`` layout of a GPU machine (one worker per GPU plus CPU workers that see no GPU, as ``--cluster local`` and
``auto`` start it; as many workers as the largest CPU row) and one ``local-cuda`` worker per GPU.

The zoo is ``bench/make_zoo.py``'s synthetic ResNet-50 (fp16 safetensors, real tensor shapes). Each worker count
gets a fresh LocalCluster whose workers are warmed up first (imports, Numba caches) on a tiny model, so the
timed scan measures steady-state throughput; cluster start-up and warm-up are reported separately. Speed-up
and efficiency are against 1 worker in the same run. Every run's layer table is compared bitwise with the
1-worker run. Results are appended to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import csv
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from _results import record
from make_zoo import write_zoo

from zooscope.engine.cluster import describe_compute, make_client
from zooscope.engine.scan import scan
from zooscope.engine.store import ZooStore
from zooscope.pipelines.analyze import AnalysisOptions
from zooscope.pipelines.batch import analyze_batch


def ensure_zoo(root: Path, arch: str, n_models: int) -> Path:
    """``root/manifest.csv`` listing ``n_models`` models of ``arch`` (written unless already there)."""
    manifest = root / "manifest.csv"
    if manifest.exists():
        with open(manifest) as fh:
            rows = list(csv.DictReader(fh))
        if len(rows) == n_models and all(r["series"] == arch and (root / r["path"]).exists() for r in rows):
            return manifest
    t0 = time.perf_counter()
    write_zoo(arch, n_models, root)
    print(f"wrote {n_models} {arch} models to {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return manifest


def layer_values(store: Path) -> np.ndarray:
    """The store's metric columns in a canonical (model_id, layer_id) order, for bitwise comparisons."""
    with ZooStore.open(str(store)) as zoo:
        models, layers = zoo.models(), zoo.layers()
    layers = layers.assign(model_id=models.loc[layers["model_row"], "model_id"].to_numpy())
    layers = layers.sort_values(["model_id", "layer_id"])
    return layers[["alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank"]].to_numpy(np.float64)


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_peak_rss(client) -> int:
    """The largest peak resident memory among the client's workers (this process without a client), bytes."""
    return max(client.run(peak_rss).values()) if client is not None else peak_rss()


def run_one(label: str, profile: str, config: Path | None, workers: int | None, manifest: Path, store: Path,
            warm: Path, options: AnalysisOptions) -> dict:
    """Start the cluster, warm its workers, time one scan of the manifest into a new store; the workers' peak
    memory after the warm-up and after the scan."""
    t0 = time.perf_counter()
    with make_client(profile, config=config, workers=workers) as client:
        started = time.perf_counter()
        if client is not None:
            client.run(analyze_batch, [(str(warm), None)], options)  # a task: the scan's routes
        else:
            analyze_batch([(str(warm), None)], options)
        warmed = time.perf_counter()
        rss_warm = worker_peak_rss(client)
        report = scan(store=store, manifest=manifest, options=options, client=client, cluster="none",
                      progress=False)
        seconds = time.perf_counter() - warmed
        rss_scan = worker_peak_rss(client)
        n_workers = len(client.scheduler_info()["workers"]) if client is not None else 1
        print(f"{label}: {describe_compute(client)}", flush=True)
    if report.n_error:
        raise RuntimeError(f"{label}: {report.n_error} models failed: {report.failed[:3]}")
    print(f"{label}: {report.n_ok} models in {seconds:.1f} s (start {started - t0:.1f} s, warm-up "
          f"{warmed - started:.1f} s)", flush=True)
    return {"label": label, "workers": n_workers, "models": report.n_ok, "seconds": seconds,
            "startup": warmed - t0, "store": store, "rss_warm": rss_warm, "rss_scan": rss_scan}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--n-models", type=int, default=12)
    parser.add_argument("--workers", default="1,2", help="comma-separated CPU worker counts")
    parser.add_argument("--gpu", action="store_true",
                        help="also the GPU machine's local layout and local-cuda (needs dask-cuda)")
    parser.add_argument("--in-process", action="store_true", help="also --cluster none (all BLAS threads)")
    parser.add_argument("--zoo", type=Path, help="zoo directory, reused between runs (default: a temp dir)")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="zooscope-scaling-") as tmp:
        tmp = Path(tmp)
        zoo = args.zoo or tmp / "zoo"
        manifest = ensure_zoo(zoo, args.arch, args.n_models)
        warm_dir = tmp / "warm"
        (warm,) = write_zoo("mlp", 1, warm_dir)
        sizes = [p.stat().st_size for p in zoo.glob(f"{args.arch}-*.safetensors")]
        nbytes, largest = sum(sizes), max(sizes)
        config = tmp / "cluster.yaml"
        config.write_text(yaml.safe_dump({
            "bench": {"kind": "local", "gpus": 0, "threads_per_worker": 1, "dashboard_address": ":0"},
            "bench-mixed": {"kind": "local", "threads_per_worker": 1, "dashboard_address": ":0"},
            "bench-cuda": {"kind": "local-cuda", "dashboard_address": ":0"},
        }))
        options = AnalysisOptions()
        runs = []
        if args.in_process:
            runs.append(run_one("in-process", "none", None, None, manifest, tmp / "none.zarr", warm, options))
        for w in counts:  # CPU rows: gpus: 0, no worker sees a GPU
            runs.append(run_one(f"local {w}w", "bench", config, w, manifest, tmp / f"cpu{w}.zarr", warm, options))
        if args.gpu:
            w = max(counts)
            runs.append(run_one(f"local {w}w, GPU layout", "bench-mixed", config, w, manifest, tmp / "mixed.zarr",
                                warm, options))
            runs.append(run_one("local-cuda", "bench-cuda", config, None, manifest, tmp / "gpu.zarr", warm, options))

        store = runs[-1]["store"]
        t0 = time.perf_counter()
        rerun = scan(store=store, manifest=manifest, options=options, cluster="auto", progress=False)
        rescan = time.perf_counter() - t0
        t0 = time.perf_counter()
        scan(store=store, manifest=manifest, options=options, cluster="auto", rehash=True, progress=False)
        rehash = time.perf_counter() - t0
        assert rerun.n_skipped == args.n_models and rerun.n_ok == 0

        base = next((r for r in runs if r["label"] == f"local {min(counts)}w"), runs[0])
        reference = layer_values(base["store"])
        lines = ["| run | workers | models | seconds | models/s | MB/s | speed-up vs "
                 f"{base['label']} | efficiency | start + warm-up (s) | bitwise = {base['label']} | "
                 "worker peak RSS MB: warm → scanned |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            speedup = base["seconds"] / r["seconds"]
            same = np.array_equal(layer_values(r["store"]), reference, equal_nan=True)
            lines.append(
                f"| {r['label']} | {r['workers']} | {r['models']} | {r['seconds']:.1f} | "
                f"{r['models'] / r['seconds']:.3f} | {nbytes / 1e6 / r['seconds']:.1f} | {speedup:.2f}x | "
                f"{speedup * base['workers'] / r['workers']:.0%} | {r['startup']:.1f} | {'yes' if same else 'NO'} | "
                f"{r['rss_warm'] / 1e6:.0f} → {r['rss_scan'] / 1e6:.0f} |")
        lines.append(f"| rerun, nothing new (stat check) | - | {args.n_models} skipped | {rescan:.2f} | "
                     f"{args.n_models / rescan:.1f} | - | - | - | - | - | - |")
        lines.append(f"| rerun, nothing new (--rehash) | - | {args.n_models} skipped | {rehash:.2f} | "
                     f"{args.n_models / rehash:.1f} | {nbytes / 1e6 / rehash:.0f} | - | - | - | - | - |")
        record(f"Zoo scaling: {args.n_models} synthetic {args.arch} (fp16 safetensors, {nbytes / 1e6:.0f} MB)",
               "\n".join(lines),
               "timed scan excludes cluster start and worker warm-up (shown apart); one thread per worker; "
               "efficiency = speed-up x base workers / workers; rerun rows: a second scan of the same zoo "
               "into the filled store (no cluster is started when nothing is new); worker peak RSS: the largest "
               f"ru_maxrss among the workers after the warm-up and after the scan (largest model file "
               f"{largest / 1e6:.0f} MB).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
