"""WeightWatcher 0.7.7's ``vectors=True``: the localization metrics of every eigenvector of each analysed layer
(``apply_analyze_eigenvectors``) and the bulk/tail columns it adds to each row from them.

A layer's eigenvectors are those of the Gram matrix of each of its matrices (``kernels.vectors``), pooled over
its slices and ordered by eigenvalue; the *bulk* is the eigenvectors whose eigenvalue is below the row's power-law
``xmin``, the *tail* the others. The matrices are read again (the batch engine keeps eigenvalues only).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from zooscope.kernels import vectors as kv
from zooscope.pipelines.batch import analysed_layers
from zooscope.pipelines.derived import with_channels
from zooscope.pipelines.layers import layer_matrices
from zooscope.pipelines.readers import Checkpoint

#: WeightWatcher's names of the metrics (``kernels.vectors.eigenvector_metrics``), in its order.
METRICS = ("vec_entropy", "loc_ratio", "part_ratio")
#: The columns ``vectors=True`` adds: ``{bulk,tail}_{mean,var}_{metric}`` (``var``: population variance).
COLUMNS = tuple(f"{part}_{stat}_{name}" for name in METRICS for part in ("bulk", "tail") for stat in ("mean", "var"))
#: fp64 elements of Gram matrices and eigenvectors held at once (slices of a large Conv2D layer go in chunks).
_CHUNK_ELEMENTS = 4 * 1024**2


@dataclass(frozen=True)
class LayerVectors:
    """One row's eigenvectors, ascending by eigenvalue: ``evals`` ``(n,)`` and ``metrics[name]`` ``(n,)``."""

    evals: np.ndarray
    metrics: dict[str, np.ndarray]

    def bulk_size(self, esd: np.ndarray, xmin: float) -> int:
        """How many eigenvectors are in the bulk: the row's sorted ``esd`` values below ``xmin`` (none when the
        fit failed: ``xmin`` NaN or WeightWatcher's −1). Counted on the ESD, whose values ``xmin`` is one of, so
        the eigenvector of ``xmin`` itself is always in the tail."""
        if esd.size != self.evals.size:
            raise ValueError(f"{self.evals.size} eigenvectors but {esd.size} eigenvalues in the row's ESD")
        return int(np.searchsorted(esd, xmin, side="left")) if np.isfinite(xmin) and xmin >= 0 else 0


def layer_vectors(ckpt: Checkpoint, options: Any, rows: Sequence[tuple[str, int | None]]) -> list[LayerVectors]:
    """The eigenvectors' metrics of each row ``(layer name, slice_id or None)`` of ``analyze_checkpoint(ckpt,
    options)``, read again from ``ckpt``: the layer's matrices as analysed (rescaled, FFT'd, per slice...)."""
    wanted = set(rows)
    found: dict[tuple[str, int | None], LayerVectors] = {}
    ckpt = with_channels(ckpt, options.channels)
    for info in analysed_layers(ckpt, options):
        keys = [(info.name, None)] if options.pool else [(info.name, s) for s in range(info.n_slices)]
        if not wanted.intersection(keys):
            continue
        stacks = layer_matrices(ckpt.read(info.key), info, pool=options.pool, conv2d_norm=options.conv2d_norm,
                                fft=options.fft, source=ckpt.path)
        for key, stack in zip(keys, stacks):
            found[key] = _stack_vectors(stack)
    return [found[row] for row in rows]


def _stack_vectors(stack: np.ndarray) -> LayerVectors:
    """The metrics of the eigenvectors of every matrix of a ``(B, N, M)`` stack, pooled and sorted by eigenvalue."""
    B, _, M = stack.shape
    step = max(1, _CHUNK_ELEMENTS // (2 * M * M))
    evals, metrics = [], {name: [] for name in METRICS}
    for start in range(0, B, step):
        values, V = kv.gram_eigenvectors(stack[start:start + step])
        evals.append(values.ravel())
        for name, value in kv.eigenvector_metrics(V).items():
            metrics[name].append(value.ravel())
    order = np.argsort(np.concatenate(evals), kind="stable")
    return LayerVectors(np.concatenate(evals)[order], {k: np.concatenate(v)[order] for k, v in metrics.items()})


def vector_columns(vectors: Sequence[LayerVectors], esds: Sequence[np.ndarray], xmins: Sequence[float]) -> pd.DataFrame:
    """WeightWatcher's ``COLUMNS`` per row: mean and population variance of each metric over the bulk and over the
    tail eigenvectors (NaN for an empty part, e.g. the bulk of a failed fit)."""
    out = {name: np.full(len(vectors), np.nan) for name in COLUMNS}
    for i, (vec, esd, xmin) in enumerate(zip(vectors, esds, xmins)):
        n_bulk = vec.bulk_size(esd, float(xmin))
        for name in METRICS:
            for part, values in (("bulk", vec.metrics[name][:n_bulk]), ("tail", vec.metrics[name][n_bulk:])):
                if values.size:
                    out[f"{part}_mean_{name}"][i] = values.mean()
                    out[f"{part}_var_{name}"][i] = values.var()
    return pd.DataFrame(out)
