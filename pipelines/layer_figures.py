"""WeightWatcher's per-layer ESD figures (``analyze(plot=True, savefig=DIR)``) written as PNG files."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from zooscope.pipelines.plots import eigenvalue_gaps_plot, esd_linear_plot, esd_plot, level_stats_plot


def save_layer_figures(frame: pd.DataFrame, esds: Sequence[np.ndarray], savedir: str | os.PathLike, *,
                       deltas: bool = False) -> list[Path]:
    """Write ``ww.layer{plot_id}.esd.png`` (log-log ESD with the power-law fit and xmin) and ``...esd2.png``
    (lin-lin ESD with xmin and, with ``mp_fit``, the MP bulk) per row of a WeightWatcher-style ``frame``, and
    with ``deltas`` ``...deltaEs.png`` (log10 gaps between consecutive eigenvalues, xmin's index marked) and
    ``...level-stats.png`` (their histogram);
    ``plot_id`` is ``layer_id`` (``layer_id:slice_id`` for slices), as WeightWatcher names them.
    esds: one eigenvalue array per row. Returns the files written; ``savedir`` is created if missing."""
    out = Path(savedir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (_, row), evals in zip(frame.iterrows(), esds):
        plot_id = f"{row['layer_id']}" + (f":{row['slice_id']}" if "slice_id" in row else "")
        title = f"{row['name']} (layer {plot_id})"
        bulk = (row["bulk_min"], row["bulk_max"]) if "bulk_max" in row else None
        figures = {
            "esd": esd_plot(evals, alpha=float(row["alpha"]), xmin=float(row["xmin"]), xmax=float(row["xmax"]),
                            title=title),
            "esd2": esd_linear_plot(evals, xmin=float(row["xmin"]), title=title, bulk=bulk),
        }
        if deltas:
            figures["deltaEs"] = eigenvalue_gaps_plot(evals, xmin=float(row["xmin"]), title=title)
            figures["level-stats"] = level_stats_plot(evals, title=title)
        for kind, fig in figures.items():
            path = out / f"ww.layer{plot_id}.{kind}.png"
            fig.savefig(path, dpi=80)
            written.append(path)
    return written
