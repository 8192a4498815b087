"""WeightWatcher's per-layer ESD figures (``analyze(plot=True, savefig=DIR)``) written as PNG files."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from zooscope.pipelines.plots import (eigenvalue_gaps_plot, esd_linear_plot, esd_plot, level_stats_plot,
                                      vector_histograms_plot, vector_metrics_plot)
from zooscope.pipelines.vectors import LayerVectors


def save_layer_figures(frame: pd.DataFrame, esds: Sequence[np.ndarray], savedir: str | os.PathLike, *,
                       deltas: bool = False, vectors: Sequence[LayerVectors] | None = None) -> list[Path]:
    """Write ``ww.layer{plot_id}.esd.png`` (log-log ESD with the power-law fit and xmin) and ``...esd2.png``
    (lin-lin ESD with xmin and, with ``mp_fit``, the MP bulk) per row of a WeightWatcher-style ``frame``, and
    with ``deltas`` ``...deltaEs.png`` (log10 gaps between consecutive eigenvalues, xmin's index marked) and
    ``...level-stats.png`` (their histogram), and with ``vectors`` (one ``LayerVectors`` per row)
    ``...vector_metrics.png`` (each eigenvector metric and the eigenvalue, ordered by eigenvalue, xmin marked) and
    ``...vector_histograms.png`` (each metric's histograms over the bulk and the tail eigenvectors);
    ``plot_id`` is ``layer_id`` (``layer_id:slice_id`` for slices), as WeightWatcher names them.
    esds: one eigenvalue array per row. Returns the files written; ``savedir`` is created if missing."""
    out = Path(savedir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, ((_, row), evals) in enumerate(zip(frame.iterrows(), esds)):
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
        if vectors is not None:
            n_bulk = vectors[i].bulk_size(evals, float(row["xmin"]))
            figures["vector_metrics"] = vector_metrics_plot(vectors[i].metrics, vectors[i].evals, n_bulk, title=title)
            figures["vector_histograms"] = vector_histograms_plot(vectors[i].metrics, n_bulk, title=title)
        for kind, fig in figures.items():
            path = out / f"ww.layer{plot_id}.{kind}.png"
            fig.savefig(path, dpi=80)
            written.append(path)
    return written
