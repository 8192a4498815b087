"""The result of analysing one model (or one shard of it): what a task returns and the store appends."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from zooscope.kernels.weightstats import strength_correlation_rows


@dataclass
class ModelResult:
    """Per-layer results of one model or shard.

    layers: one row per analysed layer matrix (zooscope column names, see ``pipelines.analyze``), in layer order,
        with an integer ``layer_id`` column giving the position of the layer in the checkpoint.
    esd: one fp64 eigenvalue array per row of ``layers`` (ascending; empty for a layer that failed).
    hist_counts: ``(rows, bins)`` float64 weight-histogram counts per layer (``bins`` may be 0).
    hist_edges: ``(rows, bins + 1)`` float64 bin edges per layer.
    n_params: number of weights read (all tensors of the model or shard, biases included).
    timings: seconds spent per phase (``read``, ``esd``, ``fit``, ``stats``...), summed over layers.
    strengths: per row, the layer's ``(in_strength (n_out,), out_strength (n_in,))`` node-strength vectors, or
        None; used to correlate consecutive layers (``add_strength_correlation``), not stored.
    """

    layers: pd.DataFrame
    esd: list[np.ndarray]
    hist_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    hist_edges: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))
    n_params: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    strengths: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.esd) != len(self.layers):
            raise ValueError(f"{len(self.esd)} ESDs for {len(self.layers)} layer rows")
        if self.hist_counts.shape[0] not in (0, len(self.layers)):
            raise ValueError(f"{self.hist_counts.shape[0]} histograms for {len(self.layers)} layer rows")
        if self.strengths and len(self.strengths) != len(self.layers):
            raise ValueError(f"{len(self.strengths)} node strengths for {len(self.layers)} layer rows")


def add_strength_correlation(result: ModelResult, parts: np.ndarray | None = None) -> None:
    """Set ``ns_corr_prev`` on each row: Pearson correlation (paper 000) between the previous layer's in-strength
    of its output units and this layer's out-strength of its input units, i.e. over the hidden units between two
    consecutive layers. NaN for the first layer, or when the two layers do not chain (sizes differ).
    Needs ``result.strengths``; rows of one layer (per-slice mode) share the value. ``parts`` (rows,): the model
    (or shard) of each row when ``result`` holds several; rows of different parts never chain.
    """
    if not result.strengths or not len(result.layers):
        return
    values = np.full(len(result.layers), np.nan)
    previous: tuple[int, int, np.ndarray] | None = None  # (part, layer_id, in-strength of its outputs)
    parts = np.zeros(len(result.layers), np.int64) if parts is None else parts
    same_as_previous = np.zeros(len(result.layers), bool)  # another slice of the layer of the row before
    chained: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}  # by hidden size: (row, in, out)
    for row, (part, layer_id, pair) in enumerate(zip(parts, result.layers["layer_id"], result.strengths)):
        if previous is not None and previous[0] != part:
            previous = None
        if pair is None:
            previous = None
            continue
        in_strength, out_strength = pair
        if previous is not None and previous[1] == layer_id:
            same_as_previous[row] = True
            continue
        if previous is not None and previous[2].size == out_strength.size:
            chained.setdefault(out_strength.size, []).append((row, previous[2], out_strength))
        previous = (part, layer_id, in_strength)
    for group in chained.values():
        rows = [row for row, _, _ in group]
        values[rows] = strength_correlation_rows(np.stack([a for _, a, _ in group]), np.stack([b for _, _, b in group]))
    for row in np.flatnonzero(same_as_previous):  # in row order: a run of slices copies its first row's value
        values[row] = values[row - 1]
    result.layers["ns_corr_prev"] = values


@dataclass
class BatchResult:
    """The results of many models or shards analysed in one task (``pipelines.batch.analyze_batch``).

    result: the layer rows of every part that could be read, in part order then layer order.
    part_of_row: ``(rows,)`` int, the part (index into the task's sources) of each row of ``result``.
    errors: per part, its ``CheckpointError`` when it could not be read, else None.
    n_params: ``(parts,)`` int, weights read per part (0 for a failed part).
    summaries: the parts' model-summary columns (``summary.summary_columns``, each ``(parts,)``), when the task
        computed them (a batch of whole models; a shard's model is summarised once its shards are merged).
    """

    result: ModelResult
    part_of_row: np.ndarray
    errors: list
    n_params: np.ndarray
    summaries: dict[str, np.ndarray] | None = None

    def rows_of(self, part: int) -> np.ndarray:
        """Row numbers (into ``result``) of one part."""
        lo, hi = np.searchsorted(self.part_of_row, [part, part + 1])
        return np.arange(lo, hi)

    def part(self, part: int) -> ModelResult:
        """One part's rows as their own ``ModelResult`` (its error is raised instead when it failed)."""
        if self.errors[part] is not None:
            raise self.errors[part]
        r = self.result
        rows = self.rows_of(part)
        return ModelResult(
            layers=r.layers.iloc[rows].reset_index(drop=True), esd=[r.esd[i] for i in rows],
            hist_counts=r.hist_counts[rows], hist_edges=r.hist_edges[rows], n_params=int(self.n_params[part]),
            timings=dict(r.timings), strengths=[r.strengths[i] for i in rows] if r.strengths else [],
        )


def merge_results(parts: list[ModelResult]) -> ModelResult:
    """Join the results of a model's shards into one, rows ordered by ``layer_id`` (stable)."""
    if not parts:
        raise ValueError("no shard results to merge")
    layers = pd.concat([p.layers for p in parts], ignore_index=True)
    esd = [e for p in parts for e in p.esd]
    bins = max((p.hist_counts.shape[1] for p in parts if len(p.layers)), default=0)
    counts = [p.hist_counts if len(p.layers) else np.zeros((0, bins)) for p in parts]
    edges = [p.hist_edges if len(p.layers) else np.zeros((0, bins + 1)) for p in parts]
    hist_counts = np.concatenate(counts) if bins else np.zeros((len(layers), 0))
    hist_edges = np.concatenate(edges) if bins else np.zeros((len(layers), 1))
    order = np.argsort(layers["layer_id"].to_numpy(), kind="stable") if len(layers) else np.arange(0)
    timings: dict[str, float] = {}
    for p in parts:
        for k, v in p.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    strengths = [s for p in parts for s in (p.strengths or [None] * len(p.layers))]
    merged = ModelResult(
        layers=layers.iloc[order].reset_index(drop=True),
        esd=[esd[i] for i in order],
        hist_counts=hist_counts[order] if bins else hist_counts,
        hist_edges=hist_edges[order] if bins else hist_edges,
        n_params=sum(p.n_params for p in parts),
        timings=timings,
        strengths=[strengths[i] for i in order] if any(s is not None for s in strengths) else [],
    )
    add_strength_correlation(merged)
    return merged
