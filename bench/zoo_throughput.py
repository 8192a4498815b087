"""Zoo throughput: ms per model of ``zooscope scan`` on zoos of many small models, against WeightWatcher's
per-model loop and against an earlier zooscope (a git checkout given with ``--baseline``), in one run.

    python bench/zoo_throughput.py --n-models 10000 --ww-models 200 --workers 2 --baseline /tmp/old
    python bench/zoo_throughput.py --n-models 300 --ww-models 50 --resnet 0          # quick look
    python bench/zoo_throughput.py --rounds 5 --resnet 0 --sweep 0                  # the 15x and 2-worker rows

With ``--rounds R`` the in-process, local-workers and WeightWatcher rows run R times, taking turns, and show the
median (min-max) ms/model; their ratios compare medians. The small-CNN before/after row takes turns R times too.

Rows (each scan in a fresh process, after warming Numba and imports on one model outside the timing; ms/model is
the scan's wall time over the models scanned, peak RSS that process's high-water mark):

- ``in-process``: the small-CNN zoo (conv 1→16→16→16 3×3 + dense 16→10, 4,970 parameters, fp32 safetensors,
  ``bench/make_zoo.py --arch small-cnn``) with ``--cluster none``;
- ``local --workers N``: the same zoo on a LocalCluster of N processes (started and warmed before the timing); its
  layer table and eigenvalues are compared bitwise with the in-process store;
- ``baseline``: the same scans with the zooscope of ``--baseline`` (e.g. ``git worktree add /tmp/old <commit>``),
  on the same files;
- ``WeightWatcher``: ``weightwatcher.WeightWatcher(model=m).analyze()`` per model in a loop, the file read into the
  torch module as a user does (``--ww-models`` of the same files: WeightWatcher is timed on that subset only);
- ResNet-18-shaped models (``--resnet``, fp16) in-process, before and after;
- a ``zooscope sweep`` of ``--sweep`` MLPs (widths 30 and 100, 2 epochs, checkpoints at epochs 0, 1, 2: the
  manifest's ``init`` column makes the scan store drift from initialization too), in-process, before and after;
- cold start: ``zooscope analyze FILE`` in a fresh process on a ~5 MB checkpoint (best of 3), before and after.

The load average is printed with the results, which are appended to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import importable_tree, load_average, record
from make_zoo import write_zoo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The scan a child process runs: warm up on one model, then time ``scan`` alone.
_RUNNER = r"""
import json, resource, sys, time, shutil
from zooscope.engine.scan import scan
from zooscope.pipelines.analyze import AnalysisOptions, analyze_path
zoo, store, cluster, workers, warm = sys.argv[1:6]
warm_options = AnalysisOptions(fit_backend="numba")  # a scan's power-law route (a model alone may take numpy's)
analyze_path(warm, warm_options)
kwargs = {}
client = None
if cluster != "none":
    from zooscope.engine.cluster import make_client
    ctx = make_client(cluster, workers=int(workers))
    client = ctx.__enter__()
    client.run(analyze_path, warm, warm_options)
    kwargs["client"] = client
else:
    kwargs["cluster"] = "none"
t = time.perf_counter()
report = scan([] if zoo.endswith(".csv") else [zoo], store, manifest=zoo if zoo.endswith(".csv") else None,
              progress=False, **kwargs)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if client is not None:
    peak = max([peak, *client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024).values()])
    ctx.__exit__(None, None, None)
print(json.dumps({"seconds": seconds, "n_ok": report.n_ok, "n_error": report.n_error, "peak_mb": peak}))
"""

_WW_RUNNER = r"""
import json, sys, time, warnings, logging
import torch
from safetensors.torch import load_file
import weightwatcher as ww
logging.disable(logging.WARNING)
warnings.simplefilter("ignore")
arch, paths = sys.argv[1], sys.argv[2:]

def build():
    if arch == "small-cnn":
        return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.Conv2d(16, 16, 3), torch.nn.Conv2d(16, 16, 3),
                                   torch.nn.Flatten(), torch.nn.Linear(16, 10))
    raise SystemExit(f"no torch twin for {arch}")

names = {"conv1": "0", "conv2": "1", "conv3": "2", "fc": "4"}
def analyze(path):
    m = build()
    sd = {names[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in load_file(path).items()}
    m.load_state_dict(sd)
    return ww.WeightWatcher(model=m).analyze()
analyze(paths[0])
t = time.perf_counter()
for p in paths:
    analyze(p)
print(json.dumps({"seconds": time.perf_counter() - t, "n": len(paths)}))
"""


def _env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is not None:  # that checkout's zooscope first on sys.path
        env["PYTHONPATH"] = str(importable_tree(tree))
    return env


def run_scan(tree: Path | None, zoo: Path, cluster: str = "none", workers: int = 1) -> dict:
    """One timed scan of ``zoo`` into a fresh store, in a child process using the zooscope of ``tree``."""
    store = Path(tempfile.mkdtemp(prefix="zt-")) / "zoo.zarr"
    folder = zoo.parent if zoo.suffix == ".csv" else zoo
    warm = str(next(folder.rglob("*.safetensors")))
    try:
        out = subprocess.run([sys.executable, "-c", _RUNNER, str(zoo), str(store), cluster, str(workers), warm],
                             check=True, capture_output=True, text=True, env=_env(tree), cwd=tree or ROOT)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["store"] = store
        return result
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"scan failed ({tree or 'this tree'}, {cluster}):\n{err.stderr[-3000:]}") from err


def same_stores(a: Path, b: Path) -> bool:
    """Layer tables (model order aside) and eigenvalues bitwise equal."""
    import numpy as np

    from zooscope.engine.store import ZooStore

    with ZooStore.open(str(a)) as x, ZooStore.open(str(b)) as y:
        mx, my = x.models(), y.models()
        lx, ly = x.layers(), y.layers()
        ex, ey = x.esds(), y.esds()
    key_x = lx["model_row"].map(mx["model_id"])
    key_y = ly["model_row"].map(my["model_id"])
    ox = np.lexsort((lx["layer_id"], key_x))
    oy = np.lexsort((ly["layer_id"], key_y))
    for column in ("alpha", "D", "xmin", "log_norm", "alpha_weighted", "w_std"):
        if not np.array_equal(lx[column].to_numpy()[ox], ly[column].to_numpy()[oy], equal_nan=True):
            return False
    return all(np.array_equal(ex[i], ey[j]) for i, j in zip(ox, oy))


def ww_loop(paths: list[Path], arch: str) -> float:
    out = subprocess.run([sys.executable, "-c", _WW_RUNNER, arch, *map(str, paths)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def _spread(values: list[float]) -> str:
    """One value as it is, or ``median (min-max)`` of several, in ms."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _write_5mb(path: Path) -> None:
    """A 5.2 MB fp32 MLP (1024-1024-1024-256-10 less the input layer) with heavy-tailed weights."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = {"fc1.weight": (1024, 1024), "fc2.weight": (256, 1024), "fc3.weight": (10, 256)}
    save_file({k: (rng.standard_t(3, size=s) / np.sqrt(s[1])).astype(np.float32) for k, s in shapes.items()},
              str(path))


def cold_start(tree: Path | None, path: Path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "zooscope", "analyze", str(path)], check=True, capture_output=True,
                       env=_env(tree), cwd=tree or ROOT)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-models", type=int, default=10000)
    parser.add_argument("--ww-models", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of the in-process, local-workers, WeightWatcher and before/after rows, taking "
                             "turns; medians are compared")
    parser.add_argument("--resnet", type=int, default=50, help="ResNet-18-shaped models (0: skip the row)")
    parser.add_argument("--sweep", type=int, default=1000, help="MLPs of the sweep row (0: skip the row)")
    parser.add_argument("--baseline", type=Path, help="a zooscope checkout to compare with (before)")
    parser.add_argument("--baseline-models", type=int, default=1000,
                        help="small CNNs both sides are timed on for the before/after row (the baseline is slow)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "zooscope-zoo-throughput")
    args = parser.parse_args(argv)

    cnn = args.out / f"small-cnn-{args.n_models}"
    if not (cnn / "manifest.csv").exists():
        shutil.rmtree(cnn, ignore_errors=True)
        write_zoo("small-cnn", args.n_models, cnn, dtype="fp32")
    rows = [("zoo", "run", "models", "ms/model", "ratio", "peak RSS MB", "note")]

    inproc_ms, dist_ms, ww_ms, equal, peaks = [], [], [], [], {"in": 0.0, "dist": 0.0}
    subset = sorted(cnn.glob("*.safetensors"))[: args.ww_models]
    for _ in range(args.rounds):  # the three runs take turns, so that a drifting machine slows each alike
        inproc = run_scan(None, cnn)
        inproc_ms.append(1e3 * inproc["seconds"] / args.n_models)
        peaks["in"] = max(peaks["in"], inproc["peak_mb"])
        if args.workers > 1:
            dist = run_scan(None, cnn, "local", args.workers)
            dist_ms.append(1e3 * dist["seconds"] / args.n_models)
            peaks["dist"] = max(peaks["dist"], dist["peak_mb"])
            equal.append(same_stores(inproc["store"], dist["store"]))
        ww_ms.append(1e3 * ww_loop(subset, "small-cnn") / len(subset))
    ms = statistics.median(inproc_ms)
    rows.append(("small CNN", "in-process (after)", args.n_models, _spread(inproc_ms), "1.00", f"{peaks['in']:.0f}",
                 ""))
    if dist_ms:
        dms = statistics.median(dist_ms)
        rows.append(("small CNN", f"local --workers {args.workers}", args.n_models, _spread(dist_ms),
                     f"{ms / dms:.2f}x throughput", f"{peaks['dist']:.0f}", f"bitwise equal: {all(equal)}"))
    rows.append(("small CNN", "WeightWatcher 0.7.7 loop", len(subset), _spread(ww_ms),
                 f"zooscope {statistics.median(ww_ms) / ms:.1f}x faster", "",
                 f"first {len(subset)} files of the same zoo"))
    if args.baseline is not None:
        sub = args.out / f"small-cnn-{args.n_models}-first{args.baseline_models}"
        if not sub.exists():
            sub.mkdir(parents=True)
            for p in sorted(cnn.glob("*.safetensors"))[: args.baseline_models]:
                os.link(p, sub / p.name)
        runs = [(run_scan(None, sub), run_scan(args.baseline, sub)) for _ in range(args.rounds)]  # taking turns
        a, b = (statistics.median(1e3 * r[i]["seconds"] / args.baseline_models for r in runs) for i in (0, 1))
        rows.append(("small CNN", "before -> after (in-process)", args.baseline_models, f"{b:.2f} -> {a:.2f}",
                     f"{b / a:.2f}x", f"{runs[-1][1]['peak_mb']:.0f} -> {runs[-1][0]['peak_mb']:.0f}",
                     f"medians of {args.rounds}" if args.rounds > 1 else ""))
    if args.resnet:
        rn = args.out / f"resnet18-{args.resnet}"
        if not (rn / "manifest.csv").exists():
            write_zoo("resnet18", args.resnet, rn, dtype="fp16")
        after = run_scan(None, rn)
        a = 1e3 * after["seconds"] / args.resnet
        if args.baseline is not None:
            before = run_scan(args.baseline, rn)
            b = 1e3 * before["seconds"] / args.resnet
            rows.append(("ResNet-18 fp16", "before -> after (in-process)", args.resnet, f"{b:.0f} -> {a:.0f}",
                         f"{b / a:.2f}x", f"{before['peak_mb']:.0f} -> {after['peak_mb']:.0f}", ""))
        else:
            rows.append(("ResNet-18 fp16", "in-process", args.resnet, f"{a:.0f}", "", f"{after['peak_mb']:.0f}", ""))
    if args.sweep:
        sw = args.out / f"sweep-{args.sweep}"
        if not (sw / "manifest.csv").exists():
            subprocess.run([sys.executable, "-m", "zooscope", "sweep", "--out", str(sw), "--widths", "30,100",
                            "--n-seeds", str(args.sweep // 2), "--epochs", "2", "--checkpoints", "3", "--quiet",
                            "--threads", "1", "--overwrite"], check=True)
        after = run_scan(None, sw / "manifest.csv")
        n = after["n_ok"]
        a = 1e3 * after["seconds"] / n
        if args.baseline is not None:
            before = run_scan(args.baseline, sw / "manifest.csv")
            b = 1e3 * before["seconds"] / n
            rows.append(("MLP sweep + drift", "before -> after (in-process)", n, f"{b:.1f} -> {a:.1f}",
                         f"{b / a:.2f}x", f"{before['peak_mb']:.0f} -> {after['peak_mb']:.0f}",
                         f"{args.sweep} networks x 3 checkpoints"))
        else:
            rows.append(("MLP sweep + drift", "in-process", n, f"{a:.1f}", "", f"{after['peak_mb']:.0f}",
                         f"{args.sweep} networks x 3 checkpoints"))
    small = args.out / "cold-5mb.safetensors"
    if not small.exists():
        _write_5mb(small)
    cold = cold_start(None, small)
    note = f"{small.stat().st_size / 1e6:.1f} MB MLP checkpoint"
    if args.baseline is not None:
        cold_b = cold_start(args.baseline, small)
        rows.append(("cold start", "zooscope analyze FILE, fresh process", 1, f"{1e3 * cold_b:.0f} -> "
                     f"{1e3 * cold:.0f}", f"{cold_b / cold:.2f}x", "", note))
    else:
        rows.append(("cold start", "zooscope analyze FILE, fresh process", 1, f"{1e3 * cold:.0f}", "", "", note))
    table = "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows[:1] + [("---",) * 7] + rows[1:])
    record("Zoo throughput: batch engine (bench/zoo_throughput.py)", table,
           notes=f"at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
