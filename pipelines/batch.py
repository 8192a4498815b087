"""Analyse many models (or shards of models) at once, by shape: the body of one engine task.

Every layer matrix of every model in the batch is bucketed by its shape (N, M); each bucket goes to
``kernels.esd.eigenvalues`` as one ``(B, N, M)`` stack, all ESDs of the batch go to one ``powerlaw.fit_columns`` call,
and weight statistics and norm metrics are computed for groups of same-shaped layers at once. Per-layer values equal
those of analysing each model alone: the eigenvalues bitwise when the bucket takes the same eigenvalue route (every
route solves each matrix of a stack on its own), the vectorised statistics to rounding (≤ 1e-12 relative).

Weights are held only until their bucket is solved: once the layers read exceed ``memory_bytes`` (fp64 matrices
plus tensors), the pending buckets are solved and their weights dropped, so a task's memory is bounded by that
budget whatever the size of its models or shards. A part (model or shard) that cannot be read or parsed is
recorded with its ``CheckpointError``, and its rows are left out; the other parts go on.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import fields
from typing import Any, Sequence

import numpy as np
import pandas as pd

from zooscope.kernels import esd as esd_kernels
from zooscope.kernels.backends import BackendUnavailable
from zooscope.kernels import powerlaw, spectral, weightstats
from zooscope.pipelines import composite
from zooscope.pipelines.derived import open_derived, with_channels
from zooscope.pipelines.layers import LayerError, LayerInfo, check_weights, layer_matrices, plan_layers
from zooscope.pipelines.readers import Checkpoint, CheckpointError
from zooscope.pipelines.result import BatchResult, ModelResult, add_strength_correlation

#: Bytes of weights (tensors plus their fp64 matrices) held before the pending buckets are solved (64 MiB: about
#: a thousand 5k-parameter models, whose buckets are then stacks of thousands of matrices).
MEMORY_BYTES = 64 * 1024**2
#: Errors that say nothing about the file being read (the machine, the backend): they fail the whole task, which
#: is retried (and the models are retried by the next scan); any other error while reading a part is that part's.
TRANSIENT_ERRORS = (MemoryError, BackendUnavailable)

#: Fit fields that become layer columns (all of ``PowerLawFit`` but its status), in their order.
_FIT_COLUMNS = tuple(f.name for f in fields(powerlaw.PowerLawFit) if f.name != "status")


def analyze_batch(sources: Sequence[tuple[Any, ...]], options: Any, *,
                  memory_bytes: int = MEMORY_BYTES) -> BatchResult:
    """Analyse every ``(source, keys)`` or ``(source, keys, base, peft)`` of ``sources`` together (``keys=None``:
    all tensors; else one shard).

    ``source`` is anything ``readers.open_checkpoint`` takes (a path, an ``nn.Module``, a state dict); with
    ``base``/``peft`` the part is read through ``derived.open_derived(source, base, peft)`` (``W − W_base``, a LoRA
    update, or a LoRA adapter merged into ``base``). ``options`` an ``analyze.AnalysisOptions``. Parts that fail
    to read (incl. a missing base or a shape mismatch) get their ``CheckpointError`` in ``BatchResult.errors`` and
    no rows.
    """
    batch = _Batch(options, memory_bytes)
    for part, (source, keys, *derived) in enumerate(sources):
        try:
            with open_derived(source, *derived) as ckpt:
                batch.add(part, ckpt, keys)
        except CheckpointError as err:
            batch.fail(part, err)
        except TRANSIENT_ERRORS:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. RecursionError from a parser: that file is bad, not the task
            batch.fail(part, CheckpointError(source if isinstance(source, str) else None, None,
                                             f"cannot be parsed: {type(err).__name__}: {err}"))
    return batch.finish(len(sources))


def analysed_layers(ckpt: Checkpoint, options: Any, keys: Sequence[str] | None = None) -> list[LayerInfo]:
    """The layers of ``ckpt`` (already ``with_channels``; only ``keys`` when given) that ``options`` analyse."""
    return [info for info in plan_layers(ckpt, min_evals=options.min_evals, max_evals=options.max_evals,
                                         max_N=options.max_N, pool=options.pool,
                                         only=set(keys) if keys is not None else None,
                                         conv2d_fft=options.conv2d_fft, fft=options.fft)
            if info.skip_reason is None and (not options.layers or info.name in options.layers)]


def analyze_one(ckpt: Checkpoint, options: Any, keys: Sequence[str] | None = None) -> ModelResult:
    """Analyse one open checkpoint (``keys``: one shard); a ``CheckpointError`` propagates."""
    batch = _Batch(options, MEMORY_BYTES, alone=True)
    batch.add(0, ckpt, keys)
    return batch.finish(1).part(0)


class _Columns:
    """Layer-table columns filled in blocks of rows, assembled into a DataFrame once."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def put(self, name: str, rows: np.ndarray | list[int], values: Any) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if not rows.size:  # a column no row has does not exist (as in a frame built from row dicts)
            return
        values = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if values.ndim == 0:
            values = np.full(rows.size, values.item(), dtype=values.dtype if values.dtype.kind != "U" else object)
        elif values.dtype.kind == "U":
            values = values.astype(object)
        self.blocks.setdefault(name, []).append((rows, values))

    def put_dicts(self, rows: list[int], dicts: list[dict[str, Any]]) -> None:
        """Row-wise results (optional metric groups computed one layer at a time)."""
        for name in dict.fromkeys(k for d in dicts for k in d):
            have = [(r, d[name]) for r, d in zip(rows, dicts) if name in d]
            self.put(name, [r for r, _ in have], np.array([v for _, v in have],
                                                          dtype=object if isinstance(have[0][1], str) else None))

    def frame(self, keep: np.ndarray) -> pd.DataFrame:
        """The rows ``keep`` (sorted row numbers) as a DataFrame: a column missing on some rows is float64 NaN
        (numbers) or NaN in an object column (strings), as pandas builds it from row dicts."""
        n_all = int(keep.max()) + 1 if keep.size else 0
        out: dict[str, np.ndarray] = {}
        for name, blocks in self.blocks.items():
            rows = np.concatenate([b[0] for b in blocks])
            values = np.concatenate([b[1] for b in blocks]) if len(blocks) > 1 else blocks[0][1]
            present = np.zeros(n_all, bool)
            inside = rows < n_all
            present[rows[inside]] = True
            if present[keep].all():
                column = np.empty(n_all, dtype=values.dtype)
            elif values.dtype.kind in "biuf":
                column = np.full(n_all, np.nan)
            else:
                column = np.full(n_all, np.nan, dtype=object)
            column[rows[inside]] = values[inside]
            out[name] = column[keep]
        return pd.DataFrame(out, index=pd.RangeIndex(keep.size))


class _Batch:
    """Rows of a batch in layer order; weights pending until their shape bucket is solved."""

    def __init__(self, options: Any, memory_bytes: int, *, alone: bool = False) -> None:
        self.options = options
        self.memory_bytes = memory_bytes
        self.alone = alone  # one model analysed on its own, not a task of a scan
        self.columns = _Columns()
        self.part_of_row: list[int] = []
        self.esd: list[np.ndarray] = []
        self.hist: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (counts, edges)
        self.strengths: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.ok_rows: list[int] = []
        self.status: list[str] = []
        self.errors: dict[int, CheckpointError] = {}
        self.n_params: dict[int, int] = {}
        self.plans: dict[tuple, tuple[int, list[LayerInfo]]] = {}  # checkpoint layout -> (n_params, layers)
        self.source_of_part: dict[int, str] = {}
        self.row_errors: dict[int, str] = {}  # rows made errors after their eigenvalues (inverse of a singular layer)
        self.layers: list[tuple[int, LayerInfo, str]] = []  # per layer read: (rows, info, error message or "")
        self.pending: list[tuple[list[int], LayerInfo, np.ndarray, list[np.ndarray] | None, tuple | None]] = []
        self.pending_bytes = 0
        self.timings = {"read": 0.0, "esd": 0.0, "fit": 0.0, "stats": 0.0}

    # -- collecting ------------------------------------------------------------------------------------------

    def add(self, part: int, ckpt: Checkpoint, keys: Sequence[str] | None) -> None:
        """Read the layers of one part and queue them (solving queued buckets when over the memory budget)."""
        options = self.options
        ckpt = with_channels(ckpt, options.channels)
        self.source_of_part[part] = ckpt.path
        self.n_params[part], infos = self._plan(ckpt, keys)
        if options.intra or options.stacked:
            self._add_composite(part, ckpt, infos)
            return
        for info in infos:
            tensor = self._read(ckpt, info)
            try:
                stacks, error = layer_matrices(tensor, info, pool=options.pool, conv2d_norm=options.conv2d_norm,
                                               fft=options.fft, source=ckpt.path), None
            except LayerError as err:
                stacks, error = None, err
            self._queue(part, info, tensor, stacks, error, 1 if options.pool else info.n_slices)

    def _plan(self, ckpt: Checkpoint, keys: Sequence[str] | None) -> tuple[int, list[LayerInfo]]:
        """The parameter count and analysed layers of a part, planned once per distinct checkpoint layout (tensor
        names, shapes, dtypes, module classes): the same-shaped models of a zoo share one plan."""
        names = ckpt.keys()
        shapes = tuple(map(ckpt.shape, names))
        layout = (type(ckpt), ckpt.format, tuple(names), shapes, tuple(map(ckpt.dtype, names)),
                  tuple(sorted(ckpt.module_types().items())), None if keys is None else tuple(keys))
        if layout not in self.plans:
            wanted = set(keys) if keys is not None else None
            n_params = sum(math.prod(shape) for k, shape in zip(names, shapes) if wanted is None or k in wanted)
            self.plans[layout] = n_params, analysed_layers(ckpt, self.options, keys)
        return self.plans[layout]

    def _read(self, ckpt: Checkpoint, info: LayerInfo) -> np.ndarray:
        t0 = time.perf_counter()
        tensor = ckpt.read(info.key)
        self.timings["read"] += time.perf_counter() - t0
        return tensor

    def _queue(self, part: int, info: LayerInfo, tensor: np.ndarray, stacks: list[np.ndarray] | None,
               error: LayerError | None, n_rows: int, spectrum: tuple[bool, int | None] | None = None) -> None:
        """Add the rows of one layer (``n_rows``: 1, or one per slice) and queue its matrix ``stacks`` (None with an
        ``error``). ``spectrum`` (composite rows): ``(singular, keep)``: the ESD is the singular values instead
        of the eigenvalues, and/or only the ``keep`` largest."""
        rows = list(range(len(self.part_of_row), len(self.part_of_row) + n_rows))
        self.part_of_row += [part] * n_rows
        self.esd += [_EMPTY] * n_rows
        self.status += ["ok" if error is None else "error"] * n_rows
        self.layers.append((n_rows, info, "" if error is None else str(error)))
        self.pending.append((rows, info, tensor, stacks, spectrum))
        self.pending_bytes += tensor.nbytes + sum(s.nbytes for s in stacks or ())
        if self.pending_bytes >= self.memory_bytes:
            self._solve_pending()

    def _add_composite(self, part: int, ckpt: Checkpoint, infos: list[LayerInfo]) -> None:
        """Queue the composite rows of one part (``pipelines.composite``): with ``intra`` one per pair of
        consecutive layers that chain, with ``stacked`` one for all layers. A layer with NaN/Inf weights makes
        the rows it is part of error rows."""
        options = self.options
        prev: tuple[LayerInfo, np.ndarray, LayerError | None] | None = None
        blocks, errors = [], []
        for info in infos:
            tensor = self._read(ckpt, info)
            try:
                check_weights(tensor, info, ckpt.path)
                error = None
            except LayerError as err:
                error = err
            if options.stacked:
                blocks.append(composite.stacked_block(tensor, info))
                errors.append(error)
                continue
            first = composite.first_matrix(tensor, info, ww_layout=options.ww_quirks)
            if prev is not None:
                self._queue_intra(part, prev, (info, first, error))
            prev = (info, first, error)
        if options.stacked and blocks:
            names = [info.name for info in infos]
            error = next((e for e in errors if e is not None), None)
            if error is None:
                try:
                    X = composite.stacked_matrix(blocks, names, ckpt.path)
                except LayerError as err:
                    error = err
            if error is not None:
                X = np.empty(composite.stacked_shape(blocks))
            keep = infos[0].num_evals if options.ww_quirks and infos[0].num_evals < min(X.shape) else None
            stacked = composite.composite_info(0, composite.STACKED_NAME, "stacked", X, 1)
            self._queue(part, stacked, X, None if error else [X[None]], error, 1,
                        None if keep is None else (False, keep))

    def _queue_intra(self, part: int, prev: tuple, cur: tuple) -> None:
        """Queue the intra row of two consecutive layers ``(info, first_matrix, error)``, if they chain."""
        options = self.options
        (a_info, A, a_error), (b_info, B, b_error) = prev, cur
        seed = (options.seed, a_info.layer_id, b_info.layer_id) if options.sparsify else None
        X = composite.intra_matrix(A, B, mask_seed=seed, ww_align=options.ww_quirks)
        if X is None:
            return
        if len(b_info.shape) > 2 and options.conv2d_norm:  # WeightWatcher's Conv2D rescale of the (second) layer
            X = X * np.sqrt(0.5)
        info = composite.composite_info(b_info.layer_id, a_info.name + composite.INTRA_SEPARATOR + b_info.name,
                                        b_info.layer_type, X, b_info.rf)
        error = a_error or b_error
        tall = np.ascontiguousarray(X if X.shape[0] >= X.shape[1] else X.T)
        self._queue(part, info, X, None if error else [tall[None]], error, 1, (True, b_info.num_evals))

    def fail(self, part: int, err: CheckpointError) -> None:
        """Record a part that could not be read; its queued layers are dropped."""
        self.errors[part] = err
        self.pending = [p for p in self.pending if self.part_of_row[p[0][0]] != part]

    # -- solving ---------------------------------------------------------------------------------------------

    def _solve_pending(self) -> None:
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        if self.options.weightstats:
            self._weight_stats(pending)
        self._eigenvalues(pending)

    def _weight_stats(self, pending) -> None:
        """Moments, histograms and node strengths for groups of same-shaped tensors of one layer type."""
        t0 = time.perf_counter()
        bins = self.options.hist_bins
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, info, tensor, _, _) in enumerate(pending):
            groups[(tensor.shape, info.layer_type)].append(i)
        for (_, layer_type), members in groups.items():
            tensors = [pending[i][2] for i in members]
            try:
                results = [(members, weightstats.layer_stats_many(
                    np.stack(tensors) if len(tensors) > 1 else tensors[0][None], bins, layer_type=layer_type))]
            except ValueError:  # some tensor has non-finite weights: its row carries the error, no statistics
                results = []
                for i, tensor in zip(members, tensors):
                    try:
                        results.append(([i], weightstats.layer_stats_many(tensor[None], bins, layer_type=layer_type)))
                    except ValueError:
                        for row in pending[i][0]:
                            self.hist[row] = (np.full(bins, np.nan), np.full(bins + 1, np.nan))
            for group, (stats, counts, edges, strengths) in results:
                rows = [r for i in group for r in pending[i][0]]
                take = np.repeat(np.arange(len(group)), [len(pending[i][0]) for i in group])
                for name, values in stats.items():
                    self.columns.put(name, rows, values[take])
                for row, g in zip(rows, take):
                    self.hist[row] = (counts[g], edges[g])
                    if strengths is not None:
                        self.strengths[row] = (strengths[0][g], strengths[1][g])
        self.timings["stats"] += time.perf_counter() - t0

    def _eigenvalues(self, pending) -> None:
        """One eigenvalue call per (N, M) bucket of every stack pending, then the per-row ESD columns."""
        options = self.options
        info_of = {row: info for rows, info, _, _, _ in pending for row in rows}
        buckets: dict[tuple[int, int], list[tuple[int, np.ndarray, int, tuple | None]]] = defaultdict(list)
        for rows, info, _, stacks, spectrum in pending:
            for k, (row, stack) in enumerate(zip(rows, stacks or ())):  # k: the slice, in per-slice mode
                buckets[stack.shape[1:]].append((row, stack, k, spectrum))
        for (n, m), members in buckets.items():
            t0 = time.perf_counter()
            stacks = [s for _, s, _, _ in members]
            big = np.concatenate(stacks) if len(stacks) > 1 else stacks[0]
            backend = esd_kernels.resolve_backend(big.shape[0], n, m, options.precision, options.esd_table) \
                if options.esd_backend == "auto" else options.esd_backend
            evals, routes = esd_kernels.eigenvalues_with_routes(big, backend=backend, precision=options.precision)
            del big
            self.timings["esd"] += time.perf_counter() - t0
            depths = np.array([s.shape[0] for s in stacks])
            starts = np.cumsum(depths) - depths
            rerouted: dict[int, str] = {}  # stack -> the route of its first matrix that a fallback re-solved
            if routes.count(backend) != len(routes):
                for i, route in enumerate(routes):
                    if route != backend:
                        rerouted.setdefault(int(np.searchsorted(starts, i, side="right")) - 1, route)
            # rows with the same number of slices and spectrum (and, for conv2d_fft, the same ESD length and N)
            by_depth: dict[tuple, list[int]] = defaultdict(list)
            for j, (row, stack, _, spectrum) in enumerate(members):
                kept = info_of[row].kept
                by_depth[stack.shape[0], spectrum, None if kept is None else (kept, info_of[row].N)].append(j)
            for (depth, spectrum, fft_layer), js in by_depth.items():
                per_slice = evals[(starts[js][:, None] + np.arange(depth)).ravel()].reshape(len(js), depth, -1)
                if spectrum is not None:
                    per_slice = _composite_spectrum(per_slice, *spectrum)
                rows = [members[j][0] for j in js]
                stats_n = n
                if fft_layer is not None:  # the largest eigenvalues of all FFT matrices, as one matrix of side N
                    kept, stats_n = fft_layer
                    per_slice = _composite_spectrum(per_slice.reshape(len(js), 1, -1), False, kept)
                stats = esd_kernels.singular_value_stats_rows(per_slice, stats_n, ww_sv_min=options.ww_quirks,
                                                              weak_rank_tolerance=options.tolerance)
                if options.inverse:
                    per_slice = esd_kernels.inverse_eigenvalues(per_slice, ww_alternating=options.ww_quirks)
                    stats["weak_rank_loss"] = np.count_nonzero(
                        per_slice.reshape(len(js), -1) < options.tolerance, axis=1).astype(np.int64)
                for name, values in stats.items():
                    self.columns.put(name, rows, values)
                self.columns.put("esd_backend", rows, np.array([rerouted.get(j, backend) for j in js], dtype=object))
                self.columns.put("num_evals", rows, np.int64(per_slice.shape[1] * per_slice.shape[2]))
                sorted_esd = np.sort(per_slice.reshape(len(js), -1), axis=1)
                singular = stats["rank_loss"] > 0 if options.inverse else np.zeros(len(js), bool)
                for row, esd, bad, lost in zip(rows, sorted_esd, singular, stats["rank_loss"]):
                    if bad:
                        self._singular_inverse(row, info_of[row], int(lost), esd.size)
                    else:
                        self.esd[row] = esd
                        self.ok_rows.append(row)
                if options.randomize:  # needs the matrices: done while they are in memory
                    kept = [(row, j) for row, j, bad in zip(rows, js, singular) if not bad]
                    self.columns.put_dicts([row for row, _ in kept], [
                        _randomize(members[j][1], self.esd[row], info_of[row], 0 if options.pool else members[j][2],
                                   backend, options) for row, j in kept])

    def _singular_inverse(self, row: int, info: LayerInfo, lost: int, size: int) -> None:
        """Make ``row`` an error row: with ``inverse=True`` a layer with rank loss has no inverse ESD."""
        err = LayerError(self.source_of_part[self.part_of_row[row]], info.key,
                         f"inverse=True: layer '{info.name}' is singular ({lost} of {size} singular values at "
                         "rounding level, below sv_max·N·eps), so its inverse ESD is not defined")
        self.status[row] = "error"
        self.row_errors[row] = str(err)

    # -- finishing -------------------------------------------------------------------------------------------

    def _fit_backend(self, ok: np.ndarray) -> str:
        """The power-law backend of ``options.fit_backend``: ``auto`` is Numba in a scan (whatever its batches, so a
        model's numbers do not depend on the models it is batched with) and, for one model alone, the faster of
        numpy and Numba for its ESDs in a fresh process."""
        backend = self.options.fit_backend
        if backend != "auto":
            return backend
        if not self.alone:
            return "numba"
        return powerlaw.choose_backend([self.esd[r].size for r in ok.tolist()], **self.options.fit_options())

    def finish(self, n_parts: int) -> BatchResult:
        """Solve what is pending, fit every ESD at once, add the norm metrics and build the batch's tables."""
        self._solve_pending()
        self._put_identity()
        options = self.options
        part_of_row = np.asarray(self.part_of_row, dtype=np.int64)
        ok = np.array(sorted(r for r in self.ok_rows if int(part_of_row[r]) not in self.errors), dtype=np.int64)
        status = np.array(self.status, dtype=object)
        fit_backend = self._fit_backend(ok)
        t0 = time.perf_counter()
        if options.ww_fails_every_fit:
            fits = powerlaw.fit_table([powerlaw.PowerLawFit()] * ok.size,
                                      powerlaw.fit_fields(**options.fit_options()))
        else:
            fits = powerlaw.fit_columns([self.esd[r] for r in ok], backend=fit_backend, **options.fit_options())
        self.timings["fit"] += time.perf_counter() - t0
        for name, values in fits.items():  # ints stay ints (num_pl_spikes, n_tail) unless a NaN joins them
            if name != "status":
                self.columns.put(name, ok, values)
        self.columns.put("fit_backend", ok, np.array(fit_backend, dtype=object))
        status[ok[fits["status"] != "success"]] = "failed"
        alpha = fits["alpha"].astype(np.float64)
        self._norm_metrics(ok, alpha)
        if options.mp_fit or options.detX:
            sizes = {name: dict(zip(*self._gather(name, ok))) for name in ("N", "M")}
            rows = ok.tolist()
            if options.mp_fit:
                self.columns.put_dicts(rows, [spectral.mp_fit(self.esd[r], n=sizes["N"][r], m=sizes["M"][r])
                                              for r in rows])
            if options.detX:
                self.columns.put_dicts(rows, [spectral.detx(self.esd[r]) for r in rows])
        self.columns.put("status", np.arange(status.size), status)
        keep = np.flatnonzero(~np.isin(part_of_row, list(self.errors)))
        layers = self.columns.frame(keep)
        layers = layers[[c for c in _order(layers.columns)]]
        bins = options.hist_bins if options.weightstats else 0
        counts = np.stack([self.hist.get(r, (np.full(bins, np.nan), None))[0] for r in keep]) if bins and keep.size \
            else np.zeros((keep.size, 0))
        edges = np.stack([self.hist.get(r, (None, np.full(bins + 1, np.nan)))[1] for r in keep]) \
            if bins and keep.size else np.zeros((keep.size, 1))
        result = ModelResult(layers=layers, esd=[self.esd[r] for r in keep], hist_counts=counts, hist_edges=edges,
                             n_params=sum(v for p, v in self.n_params.items() if p not in self.errors),
                             timings=self.timings,
                             strengths=[self.strengths.get(r) if status[r] != "error" else None for r in keep]
                             if options.weightstats else [])
        parts = part_of_row[keep]
        add_strength_correlation(result, parts)
        n_params = np.array([self.n_params.get(p, 0) if p not in self.errors else 0 for p in range(n_parts)])
        return BatchResult(result=result, part_of_row=parts,
                           errors=[self.errors.get(p) for p in range(n_parts)], n_params=n_params)

    def _put_identity(self) -> None:
        """The identity columns of every row (``_IDENTITY`` and ``error``), one block each; rows are numbered in
        the order the layers were read, so the layers' rows are ``0 .. n_rows - 1``."""
        if not self.layers:
            return
        counts = np.array([n for n, _, _ in self.layers])
        rows = np.arange(int(counts.sum()))
        for name in _IDENTITY:
            values = [getattr(info, name) for _, info, _ in self.layers]
            self.columns.put(name, rows, np.repeat(np.array(values, dtype=object if name in _TEXT else None), counts))
        self.columns.put("Q", rows, np.repeat([info.N / info.M for _, info, _ in self.layers], counts))
        self.columns.put("rf", rows, np.repeat([info.rf for _, info, _ in self.layers], counts))
        if not self.options.pool:
            self.columns.put("slice_id", rows, rows - np.repeat(np.cumsum(counts) - counts, counts))
        errors = np.repeat(np.array([e for _, _, e in self.layers], dtype=object), counts)
        for row, message in self.row_errors.items():
            errors[row] = message
        self.columns.put("error", rows, errors)

    def _gather(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks = self.columns.blocks[name]
        b_rows = np.concatenate([b[0] for b in blocks])
        keep = np.isin(b_rows, rows)
        return b_rows[keep], np.concatenate([b[1] for b in blocks])[keep]

    def _norm_metrics(self, ok: np.ndarray, alpha: np.ndarray) -> None:
        """``spectral.norm_metrics`` of every fitted row, for groups of equally long ESDs at once."""
        if not ok.size:
            return
        n_of = dict(zip(*self._gather("N", ok)))
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(ok):
            by_length[self.esd[r].size].append(i)
        for idx in by_length.values():
            rows = ok[idx]
            lam = np.stack([self.esd[r] for r in rows])
            n = np.array([n_of[r] for r in rows])
            for name, values in spectral.norm_metrics_rows(lam, alpha[idx], n=n).items():
                self.columns.put(name, rows, values)


_EMPTY = np.zeros(0)


#: ``LayerInfo`` fields that are identity columns of every row (with ``Q = N/M``, ``rf`` per slice too, as
#: WeightWatcher reports it, ``slice_id`` per slice and ``error``); ``_TEXT``: those that are strings.
_IDENTITY = ("layer_id", "name", "layer_type", "N", "M")
_TEXT = ("name", "layer_type")


def _composite_spectrum(evals: np.ndarray, singular: bool, keep: int | None) -> np.ndarray:
    """A composite row's ESD from its eigenvalues ``(R, B, M)``: their square roots (the singular values) when
    ``singular``, only the ``keep`` largest when given (sorted ascending along the last axis; a ``conv2d_fft``
    layer's FFT matrices are pooled into one slice first)."""
    values = np.sqrt(np.maximum(evals, 0.0)) if singular else evals
    return np.sort(values, axis=-1)[..., -keep:] if keep is not None else values


#: Layer columns in the order the table shows them; other columns (optional metric groups) follow in their order.
_LEADING = ("layer_id", "name", "layer_type", "N", "M", "Q", "rf", "slice_id", *weightstats.MOMENT_KEYS,
            "w_count", "w_nonfinite", "ns_mean", "ns_std", "status", "error", "esd_backend", "num_evals", "sv_max",
            "sv_min", "rank_loss", "weak_rank_loss")
_TRAILING = (*_FIT_COLUMNS, "fit_backend", "norm", "log_norm", "lambda_max", "spectral_norm", "log_spectral_norm",
             "alpha_weighted", "log_alpha_norm", "stable_rank", "matrix_rank", "entropy", *spectral.MP_COLUMNS,
             "detX_num", "detX_val", "detX_val_unrescaled", "ns_corr_prev")


def _order(columns: Sequence[str]) -> list[str]:
    present = set(columns)
    known = set(_LEADING) | set(_TRAILING)
    return [c for c in _LEADING if c in present] + [c for c in columns if c not in known] + \
        [c for c in _TRAILING if c in present]


def _randomize(stack: np.ndarray, evals: np.ndarray, info: LayerInfo, slice_id: int, backend: str,
               options: Any) -> dict[str, float]:
    """WeightWatcher's ``randomize`` columns for one layer row (``slice_id`` 0 when pooled), with draws seeded by
    (seed, layer, slice)."""
    rng = np.random.default_rng([options.seed, info.layer_id, slice_id])
    rand_evals = spectral.randomized_eigenvalues(stack, rng=rng, backend=backend)
    rand_single = spectral.randomized_eigenvalues(stack, rng=rng, backend=backend, replicas=1)
    if options.inverse:  # WeightWatcher inverts the randomized ESD once (no alternation)
        with np.errstate(divide="ignore"):
            rand_evals, rand_single = np.sort(1.0 / rand_evals), np.sort(1.0 / rand_single)
    return spectral.randomize_metrics(evals, rand_evals, rand_single, n=info.N, m=info.M)
