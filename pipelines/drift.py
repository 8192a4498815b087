"""Distance from initialization for checkpoints: pair them with their initial checkpoint, build per-layer tables.

I/O lives here (tensors are read one at a time through ``pipelines.readers``); the math is ``kernels.drift``.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from zooscope.kernels import drift as drift_kernels
from zooscope.pipelines.layers import FLOAT_DTYPES, layer_name
from zooscope.pipelines.readers import Checkpoint, CheckpointError, open_checkpoint

#: Most (w_i, w_f) pairs a fit sees, per layer and for the whole network; beyond it a seeded, layer-stratified
#: random subsample is fitted (RMSD and ``n_weights`` always use every weight).
MAX_PAIRS = 2_000_000
#: ``drift_tables`` computes the statistics of the layers it holds once they reach this many weight pairs.
BATCH_PAIRS = 1 << 23

DRIFT_COLUMNS = ["model_id", "init_model_id", "step", "layer", "n_weights", "rmsd", "a0", "a1", "b0", "b1",
                 "b2", "sigma_at_0", "c_opt", "c_opt_resolution"]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def pair_checkpoints(manifest: pd.DataFrame) -> list[tuple[str, str, float]]:
    """``(model_id, init_model_id, step)`` for every manifest row whose ``init`` names another checkpoint.

    ``init`` may hold a ``model_id`` or a ``path`` of the manifest (paths compared after ``os.path.normpath``);
    the step is ``step`` or, where that is missing, ``epoch``. Rows with an empty ``init`` and rows that are their
    own init (the step-0 checkpoint) are left out. Sorted by (init_model_id, step, model_id).
    """
    missing = {"model_id", "init"} - set(manifest.columns)
    if missing:
        raise ValueError(f"manifest lacks column(s) {sorted(missing)} needed to pair checkpoints with their init")
    if "step" not in manifest.columns and "epoch" not in manifest.columns:
        raise ValueError("manifest needs a 'step' or 'epoch' column to pair checkpoints with their init")
    ids = set(manifest["model_id"].astype(str))
    by_path = ({os.path.normpath(str(p)): str(m) for p, m in zip(manifest["path"], manifest["model_id"])}
               if "path" in manifest.columns else {})
    pairs = []
    for _, row in manifest.iterrows():
        init = row["init"]
        if _blank(init):
            continue
        init = str(init)
        init_id = init if init in ids else by_path.get(os.path.normpath(init))
        if init_id is None:
            raise ValueError(f"init {init!r} of model {row['model_id']!r} is neither a model_id nor a path "
                             "of the manifest")
        if init_id == str(row["model_id"]):
            continue
        step = row["step"] if "step" in manifest.columns and not _blank(row["step"]) else row.get("epoch")
        if _blank(step):
            raise ValueError(f"model {row['model_id']!r} has an init but no step/epoch")
        pairs.append((str(row["model_id"]), init_id, float(step)))
    return sorted(pairs, key=lambda p: (p[1], p[2], p[0]))


def as_checkpoint(source: Any) -> contextlib.AbstractContextManager[Checkpoint]:
    """A context manager giving an open ``Checkpoint``: ``source`` itself when already open (left open on exit),
    else ``readers.open_checkpoint(source)`` (closed on exit)."""
    return contextlib.nullcontext(source) if isinstance(source, Checkpoint) else open_checkpoint(source)


@dataclass(frozen=True)
class DriftPair:
    """A checkpoint and its initial checkpoint (paths or sources for ``readers.open_checkpoint``, or open
    ``Checkpoint`` objects), with the ids and step its drift rows carry."""

    init: Any
    ckpt: Any
    model_id: str
    init_model_id: str
    step: float


def drift_table(init_ckpt: Any, ckpt: Any, *, model_id: str, init_model_id: str, step: float,
                max_pairs: int = MAX_PAIRS, seed: int = 0) -> pd.DataFrame:
    """Distance-from-init statistics of ``ckpt`` against ``init_ckpt``: one row per layer plus ``layer="all"``.

    Layers are the floating-point tensors with ≥ 2 axes of ``ckpt`` (biases and norms are left out), in
    checkpoint order, named by ``layers.layer_name`` (the key without ``.weight``, as in the layer table);
    ``init_ckpt`` must hold the same keys and shapes. Both are paths or in-memory sources for
    ``readers.open_checkpoint``, or open ``Checkpoint`` objects. Columns ``DRIFT_COLUMNS`` (``kernels.drift``
    units). Only one layer's pair of tensors is read at a time: the ``all`` RMSD is accumulated exactly and its
    fits use a sample of ``max_pairs`` pairs drawn per layer in proportion to its size (seeded); a layer's own
    fits also use at most ``max_pairs`` pairs. ``drift_tables`` of one pair.
    """
    table = drift_tables([DriftPair(init_ckpt, ckpt, model_id, init_model_id, step)], max_pairs=max_pairs,
                         seed=seed)[0]
    assert table is not None  # unreadable pairs raise unless skipped
    return table


def drift_tables(pairs: Sequence[DriftPair], *, max_pairs: int = MAX_PAIRS, seed: int = 0,
                 skip_unreadable: bool = False, batch_pairs: int = BATCH_PAIRS) -> list[pd.DataFrame | None]:
    """``drift_table`` of every pair, the statistics of many same-sized layers computed at once.

    Pairs are read one after the other (a layer's weights and its share of the ``all`` sample are kept);
    whenever ``batch_pairs`` weight pairs are held, and at the end, the layers of each size go through one
    ``kernels.drift.drift_stats_many`` call (a sweep's checkpoints share their shapes). Tables equal
    ``drift_table``'s row for row. ``skip_unreadable``: a pair whose checkpoints cannot be read
    (``CheckpointError``) gets None instead of raising.
    """
    rows: list[list[dict[str, Any]] | None] = [None] * len(pairs)
    queue: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []
    held = 0
    for i, pair in enumerate(pairs):
        try:
            layers = _read_pair(pair, max_pairs, seed)
        except CheckpointError:
            if not skip_unreadable:
                raise
            continue
        rows[i] = [row for row, _, _ in layers]
        queue += layers
        held += sum(xi.size for _, xi, _ in layers)
        if held >= batch_pairs:
            _fill_stats(queue, seed)
            queue, held = [], 0
    _fill_stats(queue, seed)
    return [None if r is None else _table(r, p) for r, p in zip(rows, pairs)]


def _read_pair(pair: DriftPair, max_pairs: int, seed: int
               ) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """``(row, w_i, w_f)`` per layer and for ``all``: the row holds ``layer``, ``n_weights`` and the exact
    ``rmsd``; w_i, w_f (fp64, subsampled to ``max_pairs``) are what its fits see."""
    rng = np.random.default_rng(seed)
    out: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []
    with as_checkpoint(pair.init) as c0, as_checkpoint(pair.ckpt) as ct:
        init_keys = set(c0.keys())
        # dtype and shape come from the headers: non-float tensors are never read, and ``total`` counts only
        # the weights that enter the fits
        keys = [k for k in ct.keys() if len(ct.shape(k)) >= 2 and ct.dtype(k) in FLOAT_DTYPES]
        total = sum(math.prod(ct.shape(k)) for k in keys)
        sq_sum, count, sample_i, sample_f = 0.0, 0, [], []
        for key in keys:
            if key not in init_keys:
                raise CheckpointError(c0.path, key, "missing from the initial checkpoint")
            wt = ct.read(key)
            w0 = c0.read(key)
            if w0.shape != wt.shape:
                raise CheckpointError(c0.path, key, f"shape {w0.shape} at init but {wt.shape} in {ct.path}")
            w0 = w0.astype(np.float64, copy=False).ravel()
            wt = wt.astype(np.float64, copy=False).ravel()
            d = wt - w0
            layer_sq = float(np.dot(d, d))  # the layer's RMSD and its share of the whole network's
            sq_sum += layer_sq
            count += d.size
            del d
            xi, xf = _subsample(w0, wt, max_pairs, rng)
            out.append(({"layer": layer_name(key), "n_weights": w0.size,
                         "rmsd": float(np.sqrt(layer_sq / w0.size)) if w0.size else float("nan")}, xi, xf))
            k = w0.size if total <= max_pairs else int(round(max_pairs * w0.size / total))
            if k:
                idx = np.arange(w0.size) if k >= w0.size else rng.choice(w0.size, k, replace=False)
                sample_i.append(w0[idx])
                sample_f.append(wt[idx])
            del w0, wt
    if out:
        out.append(({"layer": "all", "n_weights": count, "rmsd": float(np.sqrt(sq_sum / count))},
                    np.concatenate(sample_i), np.concatenate(sample_f)))
    return out


def _fill_stats(queue: list[tuple[dict[str, Any], np.ndarray, np.ndarray]], seed: int) -> None:
    """Put the ``kernels.drift`` statistics (all but the row's own rmsd) into each row of ``queue``, one
    ``drift_stats_many`` call per layer size."""
    by_size: dict[int, list[int]] = {}
    for j, (_, xi, _) in enumerate(queue):
        by_size.setdefault(xi.size, []).append(j)
    for members in by_size.values():
        stats = drift_kernels.drift_stats_many(np.stack([queue[j][1] for j in members]),
                                               np.stack([queue[j][2] for j in members]), seed=seed,
                                               with_rmsd=False)
        for row, j in enumerate(members):
            queue[j][0].update({key: float(stats[key][row]) for key in drift_kernels.STATS if key != "rmsd"})


def _table(rows: list[dict[str, Any]], pair: DriftPair) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=[c for c in DRIFT_COLUMNS if c not in ("model_id", "init_model_id", "step")])
    table.insert(0, "step", float(pair.step))
    table.insert(0, "init_model_id", str(pair.init_model_id))
    table.insert(0, "model_id", str(pair.model_id))
    return table[DRIFT_COLUMNS]


def _subsample(wi: np.ndarray, wf: np.ndarray, cap: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    if wi.size <= cap:
        return wi, wf
    idx = rng.choice(wi.size, cap, replace=False)
    return wi[idx], wf[idx]


def drift_from_manifest(manifest: pd.DataFrame, *, max_pairs: int = MAX_PAIRS, seed: int = 0) -> pd.DataFrame:
    """``drift_table`` for every pair of ``pair_checkpoints(manifest)`` (paths from the ``path`` column), stacked."""
    if "path" not in manifest.columns:
        raise ValueError("manifest needs a 'path' column to read checkpoints")
    path_of = dict(zip(manifest["model_id"].astype(str), manifest["path"].astype(str)))
    tables = drift_tables([DriftPair(path_of[init], path_of[mid], mid, init, step)
                           for mid, init, step in pair_checkpoints(manifest)], max_pairs=max_pairs, seed=seed)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=DRIFT_COLUMNS)


def time_to_loss(series: pd.DataFrame, theta: float, *, loss: str = "train_loss") -> pd.DataFrame:
    """Paper 001 Fig. 6: per training run, the first step at which ``loss`` ≤ ``theta`` and the RMSD there.

    ``series`` has one row per checkpoint with ``init_model_id``, ``step``, ``rmsd`` and ``loss`` (e.g. the
    ``layer == "all"`` drift rows merged with the manifest), plus any run-level columns such as ``width`` and
    ``seed`` (kept). Returns one row per ``init_model_id`` with ``t_theta`` and ``rmsd_theta`` (NaN when the run
    never reaches ``theta``).
    """
    need = {"init_model_id", "step", "rmsd", loss} - set(series.columns)
    if need:
        raise ValueError(f"time_to_loss needs column(s) {sorted(need)}")
    out = []
    for init, run in series.sort_values("step").groupby("init_model_id", sort=True):
        hit = run[run[loss] <= theta]
        first = hit.iloc[0] if len(hit) else None
        row = {c: run[c].iloc[0] for c in run.columns
               if c not in ("model_id", "step", "rmsd", loss) and run[c].nunique(dropna=False) == 1}
        row.update(init_model_id=init, t_theta=float(first["step"]) if first is not None else np.nan,
                   rmsd_theta=float(first["rmsd"]) if first is not None else np.nan)
        out.append(row)
    return pd.DataFrame(out)
