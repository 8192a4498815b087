"""Cold start of ``zooscope analyze FILE``: wall time of fresh processes and where their import time goes.

    python bench/cold_start.py [--repeats 9] [--file PATH] [--baseline CHECKOUT] [--record]

FILE defaults to the ~5 MB MLP checkpoint of ``zoo_throughput.py`` (written to a temporary folder). Each repeat is
a new ``python -m zooscope analyze FILE`` process (stdout discarded), run in this checkout and, with
``--baseline``, alternately in another one; the table gives the median, min and max wall time of each, then one
``python -X importtime`` run's import time (this checkout) summed by top-level package (self times, so nothing is
counted twice). The load average before and after is printed: on a shared machine, compare medians taken at
similar loads. ``--record`` appends the table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _results import importable_tree, record
from zoo_throughput import _write_5mb

ROOT = Path(__file__).resolve().parent.parent


def wall_times(path: Path, repeats: int, trees: list[Path]) -> dict[Path, list[float]]:
    """Seconds of each fresh ``zooscope analyze`` run per checkout, the checkouts taking turns."""
    out: dict[Path, list[float]] = {tree: [] for tree in trees}
    for _ in range(repeats):
        for tree in trees:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "zooscope", "analyze", str(path)], check=True, capture_output=True,
                           cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
            out[tree].append(time.perf_counter() - t)
    return out


def import_seconds(path: Path) -> Counter:
    """Seconds of import (self time) per top-level package in one fresh ``zooscope analyze`` run."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "zooscope", "analyze", str(path)], check=True,
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    by_package: Counter = Counter()
    for line in run.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        by_package[name.strip().split(".")[0]] += int(self_us) / 1e6
    return by_package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--file", type=Path, help="checkpoint to analyse (default: a 5.3 MB MLP, written here)")
    parser.add_argument("--baseline", type=Path, help="another zooscope checkout to time alternately (before)")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if path is None:
            path = Path(tmp) / "cold-5mb.safetensors"
            _write_5mb(path)
        trees = [ROOT, *([importable_tree(args.baseline.resolve())] if args.baseline else [])]
        wall_times(path, 1, trees)  # the first run after a change may compile Numba kernels into the on-disk cache
        load_before = os.getloadavg()
        times = wall_times(path, args.repeats, trees)
        load_after = os.getloadavg()
        imports = import_seconds(path)
        megabytes = path.stat().st_size / 1e6
    rows = ["| checkout | file | MB | runs | median s | min s | max s |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {tree} | {path.name} | {megabytes:.1f} | {len(t)} | {statistics.median(t):.2f} | {min(t):.2f} | "
             f"{max(t):.2f} |" for tree, t in times.items()]
    rows += ["", "| imports of this checkout (one -X importtime run) | s |", "|---|---|"]
    top = imports.most_common(8)
    rows += [f"| {name} | {seconds:.3f} |" for name, seconds in top]
    rows += [f"| other | {sum(imports.values()) - sum(s for _, s in top):.3f} |",
             f"| all imports | {sum(imports.values()):.3f} |"]
    notes = (f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, after "
             f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}")
    if args.record:
        record("Cold start of zooscope analyze (bench/cold_start.py)", "\n".join(rows), notes=notes)
    else:
        print("\n".join(rows))
        print(notes)


if __name__ == "__main__":
    main()
