"""The zooscope store: a Zarr v3 group of append-only tables, committed by counters written last.

Layout (one directory, or any zarr ``StoreLike``)::

    models/<column>   1-D, one row per model          (dimension ``model``)
    layers/<column>   1-D, one row per layer matrix   (dimension ``layer``), plus model_row, esd_start, esd_count
    drift/<column>    1-D, one row per drift record   (dimension ``drift``)
    esd/values        1-D fp64, every eigenvalue; layer i owns values[esd_start[i] : esd_start[i] + esd_count[i]]
    hist/counts       (layers x bins) fp64, hist/edges (layers x bins+1) fp64, once any layer has a histogram
    attrs             schema_version, zooscope_version, params, counters {n_models, n_layers, n_esd, n_hist,
                      n_drift}, columns {table: {column: array name}}

Columns are numeric (float64 / int64 / bool) or variable-length strings (UTF-8: lone surrogates of undecodable
names are stored as backslash escapes, ``readers.safe_text``). A missing value reads back as NaN ("" in a text
column): an int or bool column missing from some rows is stored as float. A column whose values no longer fit its
kind (an int column that receives NaN, a number column that receives text) is rewritten once as a wider kind under
the array name ``<column>~<kind>`` (numbered if a column of that name exists); the committed column map names the
array, and ``to_xarray`` restores the column names. Column names are checked by ``check_column_names``.

Commit protocol: appended rows are buffered and flushed in batches; a flush writes every data array first (creating
new arrays as needed) and then advances the counters and the column map in one atomic write of the root
``zarr.json`` (``Group.update_attributes``; zarr's ``attrs.update`` would write it once per key). Readers see only
rows below the counters, so a crash at any point leaves the committed store intact; opening for writing truncates
whatever lies beyond the counters and deletes arrays the column map does not name. A store is created as its groups
first and then its attrs, in one write; a creation killed before that write is finished by the next writer. Exactly
one writer: ``mode="a"`` takes the lock of ``engine.lock`` (local directories; other stores are trusted to have one
writer). Data and commit are ordered for process crashes (every chunk and the attrs are replaced atomically by
zarr's local store); nothing is fsynced, so a power loss may need ``zooscope check`` and a rescan.

Reading: ``open_store(path)`` (``zooscope.open``) gives DataFrames; ``xarray.open_zarr(path, group="layers",
consolidated=False)`` opens a table directly (rows beyond ``attrs["counters"]`` are uncommitted while a writer
runs; ``ZooStore.to_xarray`` cuts them off).
"""
from __future__ import annotations

import asyncio
import copy
import datetime as _dt
import importlib.metadata
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import zarr
from zarr.core.sync import _get_loop as _zarr_loop
from zarr.core.sync import sync as _zarr_sync

from zooscope.engine.lock import LOCK_NAME, StoreLockedError, WriterLock
from zooscope.pipelines.readers import safe_text
from zooscope.pipelines.result import ModelResult

__all__ = ["ZooStore", "StoreView", "StoreLockedError", "StoreWriteError", "open_store", "check_column_names",
           "SCHEMA_VERSION"]


class StoreWriteError(RuntimeError):
    """The store cannot be written (disk full, read-only, permission denied); what was committed is intact."""


def _zooscope_version() -> str:
    """The installed zooscope version (read from package metadata: the engine never imports the facade)."""
    try:
        return importlib.metadata.version("zooscope")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


SCHEMA_VERSION = 1
TABLES = ("models", "layers", "drift")
GROUPS = ("models", "layers", "esd", "hist", "drift")
COUNTER_OF = {"models": "n_models", "layers": "n_layers", "drift": "n_drift"}
COUNTERS = ("n_models", "n_layers", "n_esd", "n_hist", "n_drift")
DIMS = {"models": "model", "layers": "layer", "drift": "drift"}
INDEX_NAMES = {"models": "model_row", "layers": "layer_row", "drift": "drift_row"}
#: the leading model columns, in this order (the user's metadata and summary metrics follow)
MODEL_COLUMNS = ("model_id", "path", "content_hash", "version", "status", "error", "n_layers", "n_params",
                 "seconds", "scanned_at")
ROW_CHUNK = 4096
ESD_CHUNK = 1 << 18  # 2 MiB of fp64: a flush rewrites at most one partial chunk per array
HIST_CHUNK = 1024
#: the temporary file zarr's LocalStore writes ``zarr.json`` through (then renames): a writer killed while creating
#: the store leaves one behind, next to the lock, in a directory that is not a store yet
_ZARR_TMP = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
#: any temporary file of zarr's LocalStore (a chunk or metadata document being written); removed on recovery
_PARTIAL = re.compile(r"[^/]*\.[0-9a-f]{32}\.partial")
#: columns every table read shows, even when no row has them yet (e.g. every model failed)
BASE_COLUMNS = {"models": MODEL_COLUMNS,
                "layers": ("model_id", "model_row", "layer_id", "name", "layer_type", "N", "M", "status", "error",
                           "esd_start", "esd_count"),
                "drift": ()}
_RESERVED_NAMES = ("zarr.json", "c")

#: parameters older stores recorded that are no longer analysis parameters (backends change speed, not results)
_LEGACY_PARAMS = ("esd_backend", "fit_backend")

_KINDS = ("bool", "int", "float", "str")  # promotion order
_DTYPE = {"bool": np.dtype(bool), "int": np.dtype(np.int64), "float": np.dtype(np.float64), "str": np.dtype(object)}
_FILL = {"bool": False, "int": -1, "float": np.nan, "str": ""}


# ---------------------------------------------------------------------------------------------------------------
# columns: pandas pieces -> one numpy array per column in a storage kind


def check_column_names(names: Iterable[Any], what: str = "column") -> None:
    """Raise ``ValueError`` for a name that cannot be a store column (an array name in a directory): empty, not a
    string, with ``/``, ``\\``, NUL, ``~`` (the store's widened-column marker), a leading ``.`` or ``__``, or
    ``zarr.json``/``c``. Call it on a manifest's columns before any analysis."""
    for name in names:
        bad = None
        if not isinstance(name, str) or not name.strip():
            bad = "empty or not a string"
        elif any(ch in name for ch in "/\\\0~"):
            bad = "contains '/', '\\', '~' or NUL"
        elif name.startswith((".", "__")) or name in _RESERVED_NAMES:
            bad = "starts with '.' or '__', or is a name the store's files use"
        if bad:
            raise ValueError(f"Invalid {what} name {safe_text(repr(name))}: {bad}; use letters, digits, '_', '-'")


def _normalize(s: pd.Series) -> tuple[str | None, np.ndarray | None]:
    """The storage kind of one column piece and its values in that kind; (None, None) when all are missing."""
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        if not s.isna().any():
            return "bool", s.to_numpy(dtype=bool)
        return "float", s.astype("float64").to_numpy(na_value=np.nan)
    if pd.api.types.is_integer_dtype(dt):
        if s.isna().any():
            return "float", s.to_numpy(dtype=np.float64, na_value=np.nan)
        return "int", s.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(dt):
        return "float", s.to_numpy(dtype=np.float64, na_value=np.nan)
    missing = s.isna().to_numpy()
    if missing.all():
        return None, None
    if pd.api.types.is_datetime64_any_dtype(dt):
        return "str", np.array(["" if m else v.isoformat() for v, m in zip(s, missing)], dtype=object)
    inferred = pd.api.types.infer_dtype(s, skipna=True)
    if inferred in ("integer", "boolean") and not missing.any():
        kind = "int" if inferred == "integer" else "bool"
        return kind, s.to_numpy(dtype=_DTYPE[kind])
    if inferred in ("integer", "boolean", "floating", "mixed-integer-float", "decimal"):
        return "float", np.array([np.nan if m else float(v) for v, m in zip(s, missing)], dtype=np.float64)
    if inferred == "string":
        values = s.to_numpy(dtype=object, na_value="")
        if "".join(values).isascii():  # one check for the whole column: ASCII needs no escaping
            return "str", values
        return "str", np.array([safe_text(v) for v in values], dtype=object)
    return "str", np.array(["" if m else safe_text(str(v)) for v, m in zip(s, missing)], dtype=object)


def _convert(values: np.ndarray, kind: str, to: str) -> np.ndarray:
    """Values of storage kind ``kind`` as kind ``to`` (``to`` is never narrower)."""
    if kind == to:
        return values
    if to == "str":
        if kind == "float":
            return np.array(["" if np.isnan(v) else repr(float(v)) for v in values], dtype=object)
        return np.array([str(v) for v in values.tolist()], dtype=object)
    return values.astype(_DTYPE[to])


def _kind_of(dtype: np.dtype) -> str:
    return {"b": "bool", "i": "int", "u": "int", "f": "float"}.get(np.dtype(dtype).kind, "str")


def _wider(a: str, b: str) -> str:
    return a if _KINDS.index(a) >= _KINDS.index(b) else b


def _assemble(groups: list[tuple[np.ndarray, pd.DataFrame]], n: int, kinds: dict[str, str],
              committed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """The columns of a batch of ``n`` rows made of frames placed at row positions ``pos`` (``groups``).

    kinds: the stored kind of each existing column; every existing column is in the result (absent rows filled),
    followed by new columns in order of first appearance. An int or bool column with absent rows (in this batch,
    or among the ``committed`` rows before it for a new column) becomes float, so that missing reads back as NaN,
    never as -1 or False. Returns column -> (kind, values of length n).
    """
    pieces: dict[str, list[tuple[np.ndarray, str, np.ndarray]]] = {}
    order = list(kinds)
    for pos, frame in groups:
        if not frame.columns.is_unique:
            raise ValueError(f"duplicate column names: {sorted(frame.columns[frame.columns.duplicated()])}")
        for col in frame.columns:
            kind, values = _normalize(frame[col])
            if col not in pieces and col not in kinds:
                order.append(col)
            if kind is not None:
                pieces.setdefault(col, []).append((pos, kind, values))
    out = {}
    for col in order:
        kind = kinds.get(col, "bool" if col in pieces else "float")
        for _, k, _ in pieces.get(col, ()):
            kind = _wider(kind, k)
        covered = sum(len(pos) for pos, _, _ in pieces.get(col, ()))
        if kind in ("bool", "int") and (covered < n or (col not in kinds and committed)):
            kind = "float"
        values = np.full(n, _FILL[kind], dtype=_DTYPE[kind])
        for pos, k, v in pieces.get(col, ()):
            values[pos] = _convert(v, k, kind)
        out[safe_text(str(col))] = (kind, values)
    return out


def _group_frames(frames: list[pd.DataFrame]) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """Concatenate frames of identical columns and dtypes (losslessly), remembering each row's batch position."""
    starts = np.cumsum([0] + [len(f) for f in frames])
    by_sig: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        by_sig.setdefault((tuple(f.columns), tuple(f.dtypes)), []).append(i)
    groups = []
    for members in by_sig.values():
        pos = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
        frame = frames[members[0]] if len(members) == 1 else pd.concat([frames[i] for i in members],
                                                                        ignore_index=True)
        groups.append((pos, frame))
    return groups


def _group_rows(rows: list[dict[str, Any]]) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """Rows (dicts) as frames of rows sharing keys and value types, with each row's batch position."""
    by_sig: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        by_sig.setdefault(tuple((k, type(v)) for k, v in row.items()), []).append(i)
    return [(np.array(members), pd.DataFrame.from_records([rows[i] for i in members], columns=list(rows[members[0]])))
            for members in by_sig.values()]


Write = tuple[zarr.Array, slice, np.ndarray]  # rows ``slice`` of an array get ``values``
ArraySpec = tuple[str, str, str, int, tuple[int, ...], tuple[str, ...]]  # group, name, kind, rows, chunks, dims


def _gather(coros: list) -> list:
    """Run zarr coroutines concurrently on zarr's event loop: one round trip instead of one per array. All of them
    finish before the first exception, if any, is raised (a failed write leaves no write running)."""
    async def _all() -> list:
        return list(await asyncio.gather(*coros, return_exceptions=True))

    results = _zarr_sync(_all()) if coros else []
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    return results


def _quiet_write_failures() -> None:
    """After a failed write, zarr's own concurrent chunk writes still fail one by one on its event loop: report
    none of those (the StoreWriteError said it), so that a full disk gives one line, not tracebacks at exit."""
    loop = _zarr_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if isinstance(context.get("exception"), OSError) or "destroyed but it is pending" in context.get("message", ""):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _resize_all(arrays: list[tuple[zarr.Array, int]]) -> None:
    """Give each array ``rows`` rows (metadata writes, concurrently); chunks beyond are deleted."""
    _gather([arr.async_array.resize((rows,) + arr.shape[1:]) for arr, rows in arrays])


def _write_all(writes: list[Write]) -> None:
    """Grow arrays that are too short (geometrically, in whole chunks), then write every region concurrently.

    One region per array: concurrent partial writes to one chunk would lose data (zarr-python #3514, #3682).
    """
    writes = [w for w in writes if w[1].stop > w[1].start]
    ends = {id(arr): (arr, sel.stop) for arr, sel, _ in writes}
    if len(ends) != len(writes):
        raise RuntimeError("internal error: two writes to one array in a flush")
    _resize_all([(arr, _round_up(max(end, 2 * arr.shape[0]), arr.chunks[0]))
                 for arr, end in ends.values() if arr.shape[0] < end])
    _gather([arr.async_array.setitem(sel, values) for arr, sel, values in writes])


def _json_safe(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(params), default=str))


def _round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


# ---------------------------------------------------------------------------------------------------------------


class ZooStore:
    """A zooscope store opened for reading (``mode="r"``) or appending (``mode="a"``, single writer).

    Use ``ZooStore.open(path, mode)`` as a context manager. Appends are buffered and committed every
    ``flush_every`` models, every ``flush_seconds`` seconds, when ``max_pending_values`` eigenvalues wait, on
    ``flush()`` and on ``close()``; readers (of this object or another process) see committed rows only.
    """

    def __init__(self, root: zarr.Group, location: Any, mode: str, lock: WriterLock | None, *,
                 flush_every: int, flush_seconds: float, max_pending_values: int) -> None:
        self._root = root
        self._location = location
        self.mode = mode
        self._lock = lock
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.max_pending_values = max_pending_values
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._load_meta()
        self._pending_rows: list[dict[str, Any]] = []
        self._pending_results: list[tuple[int, ModelResult, np.ndarray]] = []  # (first model, result, model per row)
        self._pending_drift: list[pd.DataFrame] = []
        self._pending_values = 0
        self._last_flush = time.monotonic()
        self._known: dict[str, tuple[int, str]] | None = None  # model_id -> (max version, hash), incl. pending
        self._pairs: set[tuple[str, str]] | None = None  # (model_id, content_hash), incl. pending
        self._checked_names: set[str] = set()  # model-row keys already accepted by check_column_names
        self._hist_bins: int | None = self._hist_width()
        self._failed = False  # a flush could not write: nothing more is written, close() only releases the lock
        self._garbage: list[tuple[str, str]] = []

    # -- opening and closing -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike | Any, mode: str = "r", *, params: dict[str, Any] | None = None,
             flush_every: int = 256, flush_seconds: float = 10.0, max_pending_values: int = 1 << 23) -> "ZooStore":
        """Open the store at ``path`` (a directory, a zarr store URL or ``StoreLike``).

        mode: ``"r"`` read the committed state; ``"a"`` create if missing, take the writer lock, truncate
            anything beyond the counters (a crashed writer's leftovers) and append.
        params: the analysis parameters (JSON-able dict) recorded at creation; given for an existing store they
            must equal the recorded ones (``set_params`` replaces them deliberately).
        Raises ``StoreLockedError`` when another live writer holds the lock, ``FileNotFoundError`` when ``"r"``
        finds no store.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        options = dict(flush_every=flush_every, flush_seconds=flush_seconds, max_pending_values=max_pending_values)
        local = _local_dir(path)
        location = str(local) if local is not None else path
        if mode == "r":
            try:
                root = zarr.open_group(location, mode="r", zarr_format=3)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
                raise FileNotFoundError(f"no zooscope store at {path}") from exc
            _check_schema(root, path)
            return cls(root, location, "r", None, **options)
        lock = None
        if local is not None:
            if local.is_dir() and not (local / "zarr.json").exists() and any(
                    not p.name.startswith(LOCK_NAME) and not _ZARR_TMP.fullmatch(p.name) for p in local.iterdir()):
                raise ValueError(f"{local} exists and is not a zarr store; choose a new path for the store")
            try:
                local.mkdir(parents=True, exist_ok=True)
                lock = WriterLock(local)
            except OSError as exc:
                raise StoreWriteError(f"cannot write the store {local}: {exc.strerror or exc}") from exc
        try:
            root = zarr.open_group(location, mode="a", zarr_format=3)
            if not {"counters", "columns"} <= root.attrs.keys():
                # new, or a creation that was interrupted (nothing committed yet): the groups first, then the
                # attrs that make it a store, in one metadata write
                for name in GROUPS:
                    root.require_group(name)
                root.update_attributes({"schema_version": SCHEMA_VERSION, "zooscope_version": _zooscope_version(),
                                        "params": _json_safe(params or {}), "every_chunk_written": True,
                                        "counters": {c: 0 for c in COUNTERS}, "columns": {t: {} for t in TABLES}})
            _check_schema(root, path)
            store = cls(root, location, "a", lock, **options)
            store._recover()
            if params is not None:
                store._match_params(params)
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if isinstance(exc, OSError):
                _quiet_write_failures()
                raise StoreWriteError(f"cannot write the store {path}: {exc.strerror or exc}") from exc
            raise
        return store

    def __enter__(self) -> "ZooStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Flush what is pending, trim the arrays to the counters and release the writer lock."""
        if self.mode != "a" or self._root is None:
            return
        try:
            if not self._failed:
                self.flush()
                try:  # trimming rewrites array metadata: a full disk can refuse it after the last commit
                    self._truncate()
                    for group, name in self._garbage:
                        del self._root[group][name]
                        self._arrays.pop((group, name), None)
                except OSError as exc:
                    _quiet_write_failures()
                    raise StoreWriteError(f"cannot write the store {self._location} (trimming it after its last "
                                          f"commit): {exc.strerror or exc}; every committed model is intact") from exc
        finally:
            if self._lock is not None:
                self._lock.release()
            self._root = None  # type: ignore[assignment]

    def reload(self) -> None:
        """Re-read the committed counters (a reader following a running writer)."""
        if self.mode == "a":
            raise RuntimeError("reload() is for readers; a writer's view is always current")
        self._root = zarr.open_group(self._location, mode="r", zarr_format=3)
        self._arrays.clear()
        self._load_meta()
        self._known = self._pairs = None

    # -- metadata ----------------------------------------------------------------------------------------------

    def _load_meta(self) -> None:
        attrs = dict(self._root.attrs)
        self._counters: dict[str, int] = {c: int(attrs["counters"].get(c, 0)) for c in COUNTERS}
        self._columns: dict[str, dict[str, str]] = {t: dict(attrs["columns"].get(t, {})) for t in TABLES}
        self._esd_index: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The analysis parameters recorded in the store."""
        return dict(self._root.attrs.get("params", {}))

    @property
    def counters(self) -> dict[str, int]:
        """The committed row counts: n_models, n_layers, n_esd, n_hist, n_drift."""
        return dict(self._counters)

    def set_params(self, params: dict[str, Any]) -> None:
        """Record ``params`` as the store's analysis parameters (replacing any)."""
        self._writable()
        self._root.update_attributes({"params": _json_safe(params)})

    def _match_params(self, params: dict[str, Any]) -> None:
        old, new = self.params, _json_safe(params)
        old = {k: v for k, v in old.items() if k not in _LEGACY_PARAMS or k in new}
        if not old:
            self.set_params(new)
        elif old != new:
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            self.close()
            raise ValueError(f"analysis parameters differ from those recorded in the store ({', '.join(diff)}); "
                             f"use another store, or ZooStore.set_params() to replace them deliberately")

    def _writable(self) -> None:
        if self.mode != "a" or self._root is None:
            raise RuntimeError("the store is not open for writing (ZooStore.open(path, mode='a'))")

    # -- arrays ------------------------------------------------------------------------------------------------

    def _array(self, group: str, name: str) -> zarr.Array:
        key = (group, name)
        if key not in self._arrays:  # every chunk written, even one of fill values: check can tell a lost one
            self._arrays[key] = self._root[f"{group}/{name}"].with_config({"write_empty_chunks": True})
        return self._arrays[key]

    def _has(self, group: str, name: str) -> bool:
        return (group, name) in self._arrays or f"{group}/{name}" in self._root

    def _create_many(self, specs: list[ArraySpec]) -> list[zarr.Array]:
        """New arrays with room for ``rows`` rows each (whole chunks), created concurrently; a leftover of a
        failed flush under the same name is replaced."""
        def spec(kind: str, rows: int, chunks: tuple[int, ...], dims: tuple[str, ...]) -> dict[str, Any]:
            return dict(shape=(_round_up(max(rows, 1), chunks[0]),) + chunks[1:], chunks=chunks,
                        dtype=str if kind == "str" else _DTYPE[kind], fill_value=_FILL[kind], dimension_names=dims,
                        config={"write_empty_chunks": True})  # every committed chunk exists: check can tell

        made = _gather([self._root[g]._async_group.create_array(name, **spec(*rest), overwrite=True)
                        for g, name, *rest in specs])
        arrays = [zarr.Array(a) for a in made]
        self._arrays.update({(g, name): arr for (g, name, *_), arr in zip(specs, arrays)})
        return arrays

    def _hist_width(self) -> int | None:
        return self._array("hist", "counts").shape[1] if self._counters["n_hist"] else None

    def _truncate(self) -> None:
        """Cut every array to its committed length."""
        lengths = {("esd", "values"): self._counters["n_esd"], ("hist", "counts"): self._counters["n_hist"],
                   ("hist", "edges"): self._counters["n_hist"]}
        for table in TABLES:
            for name in self._columns[table].values():
                lengths[(table, name)] = self._counters[COUNTER_OF[table]]
        arrays = [(self._array(g, name), n) for (g, name), n in lengths.items() if self._has(g, name)]
        _resize_all([(arr, n) for arr, n in arrays if arr.shape[0] > n])

    def _recover(self) -> None:
        """Undo an interrupted flush: delete arrays the column map does not name (and those a widening superseded),
        truncate to the counters, and remove zarr's temporary ``*.partial`` files a killed writer left."""
        for table in TABLES:
            named = set(self._columns[table].values())
            for name in list(self._root[table].array_keys()):
                if name not in named:
                    del self._root[table][name]
        self._truncate()
        local = _local_dir(self._location)
        if local is not None:
            for dirpath, _, filenames in os.walk(local):
                for name in filenames:
                    if _PARTIAL.fullmatch(name):
                        Path(dirpath, name).unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------------------------------------

    def _ensure_index(self) -> None:
        if self._known is None:
            n = self._counters["n_models"]
            known: dict[str, tuple[int, str]] = {}
            pairs: set[tuple[str, str]] = set()
            failed: set[tuple[str, str]] = set()
            if n:
                ids, versions, hashes = (self._column("models", c, n) for c in ("model_id", "version",
                                                                                  "content_hash"))
                status = self._column("models", "status", n) if "status" in self._columns["models"] else [""] * n
                for mid, v, h, st in zip(ids.tolist(), versions.tolist(), hashes.tolist(), list(status)):
                    if v >= known.get(mid, (0, ""))[0]:
                        known[mid] = (int(v), h)
                    if h:
                        pairs.add((mid, h))
                        (failed.add if st == "error" else failed.discard)((mid, h))
            self._known, self._pairs, self._error_pairs = known, pairs, failed

    def _column(self, table: str, col: str, n: int) -> np.ndarray:
        name = self._columns[table].get(col)
        if name is None:
            kind = "str" if col in ("model_id", "content_hash") else "int"
            return np.full(n, _FILL[kind], dtype=_DTYPE[kind])
        values = self._array(table, name)[:n]
        return values if values.dtype.kind in "biuf" else values.astype(object)

    def append(self, model_row: dict[str, Any], result: ModelResult | None) -> None:
        """Append one model: its row, and (unless ``result`` is None, an error row) its layers, ESDs, histograms.

        model_row needs ``model_id``; the store fills ``version`` (next per model_id; a given one must be that),
        ``status`` ('ok', or 'error' without a result), ``error`` (""), ``n_layers``, ``n_params`` and
        ``scanned_at`` when absent. A non-empty ``content_hash`` already stored for the model_id is refused, unless
        its latest row for that content is an error (a retry: the new row is the next version).
        The model is committed by the next flush.
        """
        if result is None:
            model_row = {**model_row, "status": "error"}
        else:
            model_row = {"n_params": result.n_params, "n_layers": len(result.layers), **model_row}
        self.append_many([model_row], result, None if result is None else np.zeros(len(result.layers), np.int64))

    def append_many(self, model_rows: list[dict[str, Any]], result: ModelResult | None,
                    model_of_row: np.ndarray | None) -> None:
        """Append many models at once: their rows, and the layer rows of all of them in one ``result`` whose row
        ``i`` belongs to ``model_rows[model_of_row[i]]`` (non-decreasing). Rows as in :meth:`append`; a model
        row without layers in ``result`` and without a ``status`` is 'ok' with 0 layers."""
        self._writable()
        self._ensure_index()
        if result is not None:
            check_column_names((k for k in result.layers.columns if k not in self._columns["layers"]),
                               "layer column")
        known: dict[str, tuple[int, str]] = {}  # this call's rows, checked against each other too
        pairs: set[tuple[str, str]] = set()
        rows = []
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for model_row in model_rows:
            row = self._model_row(model_row, known, pairs, now)
            known[row["model_id"]] = (row["version"], row["content_hash"])
            pairs.add((row["model_id"], row["content_hash"]))
            rows.append(row)
        if result is not None and len(result.layers):
            bins = result.hist_counts.shape[1] if result.hist_counts.size else None
            if bins is not None:
                if self._hist_bins is not None and bins != self._hist_bins:
                    raise ValueError(f"model {rows[0]['model_id']!r}: histograms of {bins} bins, the store holds "
                                     f"{self._hist_bins}-bin histograms")
                self._hist_bins = bins
            self._pending_values += sum(len(e) for e in result.esd)
            self._pending_results.append((len(self._pending_rows), result, np.asarray(model_of_row, np.int64)))
        self._pending_rows += rows
        self._known.update(known)
        self._pairs.update(p for p in pairs if p[1])
        for row in rows:  # a model stored as an error may be stored again (zooscope scan --retry-failed)
            pair = (row["model_id"], row["content_hash"])
            (self._error_pairs.add if row["status"] == "error" else self._error_pairs.discard)(pair)
        if (len(self._pending_rows) >= self.flush_every or self._pending_values >= self.max_pending_values
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def _model_row(self, model_row: dict[str, Any], known: dict[str, tuple[int, str]],
                   pairs: set[tuple[str, str]], now: str) -> dict[str, Any]:
        """A model row checked and completed (version, status, error, counts, ``scanned_at`` = ``now``) for
        :meth:`append_many`; ``known``/``pairs``: rows of the same call not yet in the index."""
        if "model_id" not in model_row:
            raise ValueError("a model row needs a 'model_id'")
        new_names = [k for k in model_row if k not in self._columns["models"] and k not in self._checked_names]
        check_column_names(new_names, "model column")
        self._checked_names.update(new_names)
        row = {k: safe_text(v) if isinstance(v, str) else v for k, v in model_row.items()}
        mid = row["model_id"] = safe_text(str(row["model_id"]))
        h = row["content_hash"] = str(row.get("content_hash") or "")
        if h and (((mid, h) in self._pairs and (mid, h) not in self._error_pairs) or (mid, h) in pairs):
            raise ValueError(f"model {mid!r} with content hash {h[:16]}... is already in the store")
        version = (known.get(mid) or self._known.get(mid, (0, "")))[0] + 1
        if int(row.setdefault("version", version)) != version:
            raise ValueError(f"model {mid!r}: version {row['version']} given, the next version is {version}")
        row.setdefault("status", "ok")
        row.setdefault("error", "")
        row.setdefault("n_layers", 0)
        row.setdefault("scanned_at", now)
        return {**{k: row[k] for k in MODEL_COLUMNS if k in row}, **row}

    def append_drift(self, df: pd.DataFrame) -> None:
        """Append drift rows (any columns) and commit them together with anything pending."""
        self._writable()
        self._pending_drift.append(df.reset_index(drop=True))
        self.flush()

    def flush(self) -> None:
        """Write everything pending, then advance the counters in one attrs write (the commit).

        Raises ``StoreWriteError`` when the store cannot be written (disk full, read-only): the pending rows are
        dropped, the committed store is left as it was, and the store accepts no more writes.
        """
        self._writable()
        if self._failed:
            raise StoreWriteError(f"the store {self._location} could not be written earlier; reopen it")
        if not (self._pending_rows or self._pending_drift):
            return
        try:
            self._flush()
        except OSError as exc:
            _quiet_write_failures()
            lost = len(self._pending_rows)
            self._failed = True
            self._pending_rows, self._pending_results, self._pending_drift = [], [], []
            self._known = self._pairs = None
            raise StoreWriteError(f"cannot write the store {self._location}: {exc.strerror or exc}; the models "
                                  f"committed before are intact, the {lost} pending one(s) were not stored") from exc

    def _flush(self) -> None:
        c = dict(self._counters)
        columns = copy.deepcopy(self._columns)
        garbage: list[tuple[str, str]] = []
        writes: list[Write] = []
        n_models = len(self._pending_rows)

        frames, model_rows, counts = [], [], []
        for first, res, model_of_row in self._pending_results:
            frames.append(res.layers)
            model_rows.append(c["n_models"] + first + model_of_row)
            counts.extend(len(e) for e in res.esd)
        n_layers = sum(len(f) for f in frames)
        layer_cols = self._table_batch("layers", _group_frames(frames), n_layers)
        esd_count = np.asarray(counts, dtype=np.int64)
        ends = c["n_esd"] + np.cumsum(esd_count)
        layer_cols["model_row"] = ("int", np.concatenate(model_rows) if frames else np.zeros(0, np.int64))
        layer_cols["esd_start"] = ("int", ends - esd_count)
        layer_cols["esd_count"] = ("int", esd_count)

        self._write_table("models", self._table_batch("models", _group_rows(self._pending_rows), n_models),
                          c, columns, garbage, writes)
        self._write_table("layers", layer_cols, c, columns, garbage, writes)
        self._write_esd(c, writes)
        self._write_hist(c, n_layers, writes)
        if self._pending_drift:
            drift = _group_frames(self._pending_drift)
            n_drift = sum(len(f) for f in self._pending_drift)
            self._write_table("drift", self._table_batch("drift", drift, n_drift), c, columns, garbage, writes)
        _write_all(writes)
        self._commit(c, columns)
        # superseded by a wider kind: kept until close() for readers that opened before this commit (they read the
        # old name); a crashed writer's are deleted by the next writer's recovery
        self._garbage.extend(garbage)
        self._pending_rows, self._pending_results, self._pending_drift = [], [], []
        self._pending_values = 0
        self._last_flush = time.monotonic()

    def _table_batch(self, table: str, groups: list[tuple[np.ndarray, pd.DataFrame]],
                     n: int) -> dict[str, tuple[str, np.ndarray]]:
        kinds = {col: _kind_of(self._array(table, name).dtype) for col, name in self._columns[table].items()}
        return _assemble(groups, n, kinds, self._counters[COUNTER_OF[table]])

    def _write_table(self, table: str, batch: dict[str, tuple[str, np.ndarray]], c: dict[str, int],
                     columns: dict[str, dict[str, str]], garbage: list[tuple[str, str]],
                     writes: list[Write]) -> None:
        """Plan the writes of a batch's columns at rows [counter, counter + n), creating new and widened
        arrays now, and advance the counter in ``c``; superseded arrays go to ``garbage``."""
        start = c[COUNTER_OF[table]]
        n = len(next(iter(batch.values()))[1]) if batch else 0
        rows = slice(start, start + n)
        specs: list[ArraySpec] = []
        planned: list[tuple[slice, np.ndarray]] = []
        for col, (kind, values) in batch.items():
            name = columns[table].get(col)
            if name is not None and _kind_of(self._array(table, name).dtype) == kind:
                writes.append((self._array(table, name), rows, values))
                continue
            region = (rows, values)
            if name is None and start:  # new column: earlier rows written as missing (every chunk exists)
                region = (slice(0, start + n), np.concatenate([np.full(start, _FILL[kind], _DTYPE[kind]), values]))
            if name is not None:  # widen: rewrite the committed values in the wider kind, in the same write
                old = self._array(table, name)
                old_kind = _kind_of(old.dtype)
                committed = old[:start] if start else np.zeros(0, _DTYPE[old_kind])
                committed = committed.astype(object) if old_kind == "str" else committed
                region = (slice(0, start + n), np.concatenate([_convert(committed, old_kind, kind), values]))
                garbage.append((table, name))
            name = columns[table][col] = col if name is None else self._free_name(table, f"{col}~{kind}", columns)
            specs.append((table, name, kind, start + n, (ROW_CHUNK,), (DIMS[table],)))
            planned.append(region)
        for arr, (sel, values) in zip(self._create_many(specs), planned):
            writes.append((arr, sel, values))
        c[COUNTER_OF[table]] = start + n

    def _free_name(self, table: str, name: str, columns: dict[str, dict[str, str]]) -> str:
        """``name``, or ``name`` plus a number, that no column and no array of ``table`` uses yet."""
        taken = set(columns[table]) | set(columns[table].values()) | set(self._root[table].array_keys())
        candidate, k = name, 1
        while candidate in taken:
            k += 1
            candidate = f"{name}{k}"
        return candidate

    def _write_esd(self, c: dict[str, int], writes: list[Write]) -> None:
        values = [np.asarray(e, dtype=np.float64) for _, r, _ in self._pending_results for e in r.esd]
        total = sum(len(v) for v in values)
        if not total:
            return
        start = c["n_esd"]
        if not self._has("esd", "values"):
            self._create_many([("esd", "values", "float", start + total, (ESD_CHUNK,), ("eig",))])
        arr = self._array("esd", "values")
        writes.append((arr, slice(start, start + total), np.concatenate(values)))
        c["n_esd"] = start + total

    def _write_hist(self, c: dict[str, int], n_layers: int, writes: list[Write]) -> None:
        """Histogram rows aligned with the new layer rows (NaN for layers without one), once any layer has one.

        Runs after the layers table advanced ``c["n_layers"]`` by ``n_layers``.
        """
        bins = self._hist_bins
        if bins is None or not n_layers:
            return
        start = c["n_layers"] - n_layers
        if not c["n_hist"]:  # first histograms: earlier layers read as NaN
            self._create_many([("hist", "counts", "float", start + n_layers, (HIST_CHUNK, bins), ("layer", "bin")),
                               ("hist", "edges", "float", start + n_layers, (HIST_CHUNK, bins + 1),
                                ("layer", "edge"))])
        counts = np.full((n_layers, bins), np.nan)
        edges = np.full((n_layers, bins + 1), np.nan)
        row = 0
        for _, res, _ in self._pending_results:
            k = len(res.layers)
            if k and res.hist_counts.size:
                counts[row:row + k] = res.hist_counts
                edges[row:row + k] = res.hist_edges
            row += k
        for name, block in (("counts", counts), ("edges", edges)):
            arr = self._array("hist", name)
            writes.append((arr, slice(start, start + n_layers), block))
        c["n_hist"] = start + n_layers

    def _commit(self, counters: dict[str, int], columns: dict[str, dict[str, str]]) -> None:
        """The commit point: one atomic write of the root attrs with the new counters and column map.

        ``Group.update_attributes``, never ``attrs.update``: zarr's ``Attributes`` is a MutableMapping whose
        ``update`` writes ``zarr.json`` once per key, so a crash between two of those writes committed counters
        without the column map that names their arrays.
        """
        self._root.update_attributes({"counters": counters, "columns": columns,
                                      "zooscope_version": _zooscope_version()})
        self._counters, self._columns = dict(counters), columns
        self._esd_index = None

    # -- reading -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._counters["n_models"]

    def __repr__(self) -> str:
        c = self._counters
        return (f"<ZooStore {self._location} mode={self.mode!r}: {c['n_models']} models, {c['n_layers']} layers, "
                f"{c['n_esd']} eigenvalues, {c['n_drift']} drift rows>")

    def _read_table(self, table: str, columns: Iterable[str] | None = None) -> pd.DataFrame:
        n = self._counters[COUNTER_OF[table]]
        wanted = self._columns[table] if columns is None else [c for c in self._columns[table] if c in set(columns)]
        data = {col: self._column(table, col, n) for col in wanted}
        if columns is None:  # the base columns exist even when no row has them (e.g. every model failed)
            data.update({col: np.full(n, np.nan) for col in BASE_COLUMNS[table] if col not in data})
        if table == "layers" and "model_id" in data and "model_id" not in self._columns["layers"]:
            ids = self._column("models", "model_id", self._counters["n_models"])
            rows = data["model_row"] if "model_row" in self._columns["layers"] else np.zeros(0, np.int64)
            data["model_id"] = ids[rows] if len(rows) else np.zeros(0, dtype=object)
            data = {"model_id": data.pop("model_id"), **data}
        return pd.DataFrame(data, index=pd.RangeIndex(n, name=INDEX_NAMES[table]))

    def models(self, latest: bool = False, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """One row per committed model, indexed by model row; ``latest``: only each model_id's highest version.

        columns: read only these columns (those the store holds); default all.
        """
        if columns is not None and latest:
            columns = {*columns, "model_id", "version"}
        df = self._read_table("models", columns)
        if latest and len(df):
            df = df.loc[np.sort(df.groupby("model_id", sort=False)["version"].idxmax().to_numpy())]
        return df

    def layers(self, models: pd.DataFrame | Iterable[int] | Iterable[str] | str | None = None) -> pd.DataFrame:
        """One row per committed layer matrix, indexed by layer row (the argument of ``esd``/``hist``).

        models: restrict to these models — a models DataFrame (its index), model rows (ints) or model_ids (all
        their versions).
        """
        df = self._read_table("layers")
        if models is None:
            return df
        return df[df["model_row"].isin(self._model_rows(models))]

    def _model_rows(self, models: Any) -> np.ndarray:
        if isinstance(models, pd.DataFrame):
            return models.index.to_numpy()
        items = [models] if isinstance(models, str) else list(models)
        if all(isinstance(m, (int, np.integer)) for m in items):
            return np.asarray(items, dtype=np.int64)
        ids = self._column("models", "model_id", self._counters["n_models"])
        return np.flatnonzero(np.isin(ids, [str(m) for m in items]))

    def esd(self, layer_row: int) -> np.ndarray:
        """The eigenvalues (fp64, ascending as analysed) of layer row ``layer_row``."""
        n = self._counters["n_layers"]
        if not 0 <= layer_row < n:
            raise IndexError(f"layer row {layer_row} out of range: the store holds {n} layer rows")
        if self._esd_index is None:
            self._esd_index = (self._column("layers", "esd_start", n), self._column("layers", "esd_count", n))
        start, count = int(self._esd_index[0][layer_row]), int(self._esd_index[1][layer_row])
        if not count:
            return np.zeros(0)
        return self._array("esd", "values")[start:start + count]

    def esds(self, layer_rows: Iterable[int] | None = None) -> list[np.ndarray]:
        """The eigenvalues of several layer rows (default: all), read in one pass over the span they cover."""
        n = self._counters["n_layers"]
        rows = np.arange(n) if layer_rows is None else np.asarray(list(layer_rows), dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"layer rows out of range: the store holds {n} layer rows")
        if self._esd_index is None:
            self._esd_index = (self._column("layers", "esd_start", n), self._column("layers", "esd_count", n))
        start, count = self._esd_index[0][rows], self._esd_index[1][rows]
        if not count.sum():
            return [np.zeros(0) for _ in rows]
        lo, hi = int(start[count > 0].min()), int((start + count).max())
        span = self._array("esd", "values")[lo:hi]
        return [span[s - lo:s - lo + c].copy() for s, c in zip(start.tolist(), count.tolist())]

    def hist(self, layer_row: int) -> tuple[np.ndarray, np.ndarray]:
        """The weight histogram of layer row ``layer_row``: counts (bins,) and edges (bins + 1,); NaN if none."""
        counts, edges = self.hists([layer_row])
        return counts[0], edges[0]

    def hists(self, layer_rows: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The weight histograms of several layer rows (default: all), read in one pass over the span they
        cover: counts (rows, bins) and edges (rows, bins + 1); NaN rows for layers without one."""
        n = self._counters["n_hist"]
        if not n:
            raise LookupError("the store holds no weight histograms")
        rows = np.arange(n) if layer_rows is None else np.asarray(list(layer_rows), dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            bad = rows[(rows < 0) | (rows >= n)]
            raise IndexError(f"layer row(s) {', '.join(map(str, bad[:5]))} out of range: the store holds {n} "
                             "histogram rows")
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        return tuple(self._array("hist", name)[lo:hi][rows - lo] for name in ("counts", "edges"))

    def drift(self) -> pd.DataFrame:
        """The committed drift rows."""
        return self._read_table("drift")

    def committed_hashes(self) -> set[str]:
        """Content hashes of the committed models (non-empty ones)."""
        n = self._counters["n_models"]
        return {h for h in self._column("models", "content_hash", n).tolist() if h}

    def model_versions(self) -> dict[str, tuple[int, str]]:
        """model_id -> (highest version, its content hash), counting models appended but not yet flushed."""
        self._ensure_index()
        return dict(self._known)

    def to_xarray(self, table: str = "layers"):
        """A committed table (``models``, ``layers``, ``drift``, ``esd`` or ``hist``) as a lazy ``xarray.Dataset``.

        Equivalent to ``xarray.open_zarr(path, group=table, consolidated=False)`` cut to the committed rows, with
        widened columns under their column names.
        """
        import xarray as xr

        if table not in GROUPS:
            raise ValueError(f"table must be one of {GROUPS}, got {table!r}")
        ds = xr.open_zarr(self._location, group=table, consolidated=False, zarr_format=3)
        if table in TABLES:
            names = self._columns[table]
            ds = ds[list(names.values())].rename({v: k for k, v in names.items() if k != v})
            return ds.isel({DIMS[table]: slice(0, self._counters[COUNTER_OF[table]])})
        if table == "esd":
            return ds.isel(eig=slice(0, self._counters["n_esd"])) if "eig" in ds.dims else ds
        return ds.isel(layer=slice(0, self._counters["n_hist"])) if "layer" in ds.dims else ds

    # -- integrity ---------------------------------------------------------------------------------------------

    def check(self, full: bool = True) -> list[str]:
        """Integrity problems of the committed store (empty when sound); a damaged array is reported, never raised.

        Always (``full=False``: metadata and counters): counters against array lengths, ESD offsets contiguous and
        within n_esd, valid model rows, histogram rows, duplicate (model_id, hash) pairs, consecutive versions per
        model_id. ``full``: also every committed chunk of every array is read (present, decodable, right length)
        and the values that must be are valid: ESD values finite and >= 0, histograms finite or a whole NaN row,
        model ids non-empty, statuses known, an ``ok`` layer's alpha not NaN, each model's ``n_layers`` rows.
        """
        try:
            problems = self._check_fast()
        except Exception as exc:  # a corrupt chunk of an index column
            problems = [f"unreadable data: {type(exc).__name__}: {safe_text(str(exc))[:200]}"]
        if full and not problems:
            problems = self._check_data()
        return problems

    def _check_data(self) -> list[str]:
        """Read every committed chunk (see ``check``); the problems found."""
        c = self._counters
        problems: list[str] = []
        arrays = [("esd", "values", c["n_esd"])] if c["n_esd"] else []
        arrays += [("hist", name, c["n_hist"]) for name in ("counts", "edges") if c["n_hist"]]
        arrays += [(t, name, c[COUNTER_OF[t]]) for t in TABLES for name in self._columns[t].values()]
        local = _local_dir(self._location)
        every_chunk = local is not None and bool(self._root.attrs.get("every_chunk_written"))
        data: dict[tuple[str, str], np.ndarray] = {}
        for group, name, n in arrays:
            arr = self._array(group, name)
            step = arr.chunks[0]
            if every_chunk:
                missing = [i for i in range(-(-n // step))
                           if not (local / group / name / "c" / "/".join([str(i)] + ["0"] * (arr.ndim - 1))).is_file()]
                if missing:
                    problems.append(f"{group}/{name}: chunk(s) {_few(np.array(missing))} missing")
                    continue
            try:
                parts = [arr[i:min(i + step, n)] for i in range(0, n, step)]
                values = np.concatenate(parts) if parts else arr[:0]
            except Exception as exc:
                problems.append(f"{group}/{name}: unreadable ({type(exc).__name__}: {safe_text(str(exc))[:120]})")
                continue
            if len(values) != n:
                problems.append(f"{group}/{name}: read {len(values)} rows of the committed {n}")
                continue
            data[(group, name)] = values if values.dtype.kind in "biuf" else values.astype(object)
        problems += self._check_values(data)
        return problems

    def _check_values(self, data: dict[tuple[str, str], np.ndarray]) -> list[str]:
        """Values that must be valid (see ``check``), in the arrays read by ``_check_data``."""
        problems: list[str] = []

        def col(table: str, column: str) -> np.ndarray | None:
            name = self._columns[table].get(column)
            return None if name is None else data.get((table, name))

        esd = data.get(("esd", "values"))
        if esd is not None:
            bad = np.flatnonzero(~np.isfinite(esd) | (esd < 0))
            if len(bad):
                problems.append(f"esd/values: {len(bad)} value(s) not finite or negative, at {_few(bad)}")
        for name in ("counts", "edges"):
            block = data.get(("hist", name))
            if block is not None:
                finite = np.isfinite(block)
                bad = np.flatnonzero(~(finite.all(axis=1) | np.isnan(block).all(axis=1)))
                if len(bad):
                    problems.append(f"hist/{name}: rows {_few(bad)} are neither finite nor all NaN")
        checks = [("models", "model_id", lambda v: v.astype(str) != "", "empty"),
                  ("models", "status", lambda v: np.isin(v.astype(str), ["ok", "error"]), "not ok/error"),
                  ("layers", "status", lambda v: np.isin(v.astype(str), ["ok", "failed", "error"]),
                   "not ok/failed/error"),
                  ("layers", "name", lambda v: v.astype(str) != "", "empty")]
        for table, column, valid, what in checks:
            values = col(table, column)
            if values is not None:
                bad = np.flatnonzero(~valid(values))
                if len(bad):
                    problems.append(f"{table}/{column}: {what} at rows {_few(bad)}")
        status, alpha = col("layers", "status"), col("layers", "alpha")
        if status is not None and alpha is not None and alpha.dtype.kind == "f":
            bad = np.flatnonzero((status.astype(str) == "ok") & np.isnan(alpha))
            if len(bad):
                problems.append(f"layers/alpha: NaN in rows whose status is ok, at {_few(bad)}")
        n_layers, model_row = col("models", "n_layers"), col("layers", "model_row")
        if n_layers is not None and model_row is not None:
            counted = np.bincount(model_row, minlength=len(n_layers))[:len(n_layers)]
            expected = np.nan_to_num(n_layers.astype(np.float64), nan=0)
            bad = np.flatnonzero(counted != expected)
            if len(bad):
                problems.append(f"models/n_layers: differs from the layer rows stored at model rows {_few(bad)}")
        return problems

    def _check_fast(self) -> list[str]:
        """The metadata and counter checks of ``check``."""
        c = self._counters
        problems = []
        expected = [("esd", "values", c["n_esd"])] if c["n_esd"] else []
        if c["n_hist"]:
            expected += [("hist", "counts", c["n_hist"]), ("hist", "edges", c["n_hist"])]
            if c["n_hist"] != c["n_layers"]:
                problems.append(f"n_hist = {c['n_hist']} but n_layers = {c['n_layers']}")
        for table in TABLES:
            expected += [(table, name, c[COUNTER_OF[table]]) for name in self._columns[table].values()]
        for group, name, n in expected:
            if not self._has(group, name):
                problems.append(f"{group}/{name}: array missing")
            elif self._array(group, name).shape[0] < n:
                problems.append(f"{group}/{name}: {self._array(group, name).shape[0]} rows, fewer than the "
                                f"committed {n}")
        for col in ("model_row", "esd_start", "esd_count"):
            if c["n_layers"] and col not in self._columns["layers"]:
                problems.append(f"layers/{col}: column missing")
        if problems:
            return problems

        n_layers = c["n_layers"]
        if n_layers:
            start = self._column("layers", "esd_start", n_layers)
            count = self._column("layers", "esd_count", n_layers)
            ends = np.cumsum(count)
            bad = np.flatnonzero((count < 0) | (start != ends - count))
            if len(bad):
                problems.append(f"layers: ESD offsets not contiguous at layer rows {_few(bad)}")
            if ends[-1] != c["n_esd"]:
                problems.append(f"layers: ESD counts sum to {ends[-1]}, n_esd = {c['n_esd']}")
            model_row = self._column("layers", "model_row", n_layers)
            bad = np.flatnonzero((model_row < 0) | (model_row >= c["n_models"]))
            if len(bad):
                problems.append(f"layers: model_row outside 0..{c['n_models'] - 1} at layer rows {_few(bad)}")
            bad = np.flatnonzero(np.diff(model_row) < 0)
            if len(bad):
                problems.append(f"layers: model rows not in order at layer rows {_few(bad + 1)}")
        if c["n_hist"]:
            counts, edges = self._array("hist", "counts"), self._array("hist", "edges")
            if edges.shape[1] != counts.shape[1] + 1:
                problems.append(f"hist: {counts.shape[1]} bins but {edges.shape[1]} edges per row")
        n_models = c["n_models"]
        if n_models:
            models = pd.DataFrame({col: self._column("models", col, n_models)
                                   for col in ("model_id", "content_hash", "version", "status")})
            hashed = models[models["content_hash"] != ""]
            retried = hashed.duplicated(["model_id", "content_hash"], keep="last") & (hashed["status"] == "error")
            hashed = hashed[~retried]  # an error row followed by the retry of the same content
            dup = hashed[hashed.duplicated(["model_id", "content_hash"], keep=False)]
            for mid, h in dup[["model_id", "content_hash"]].drop_duplicates().itertuples(index=False):
                problems.append(f"models: ({mid!r}, {h[:16]}...) stored more than once")
            for mid, versions in models.groupby("model_id")["version"]:
                if sorted(versions) != list(range(1, len(versions) + 1)):
                    problems.append(f"models: versions of {mid!r} are {sorted(versions)}, not 1..{len(versions)}")
        return problems


def _few(rows: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:k])
    return shown + (f" ... ({len(rows)} in all)" if len(rows) > k else "")


def _local_dir(path: Any) -> Path | None:
    """The local directory a path names (None for URLs and store objects)."""
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if "://" not in text or text.startswith("file://"):
            return Path(text.removeprefix("file://")).expanduser()
    return None


def _check_schema(root: zarr.Group, path: Any) -> None:
    version = root.attrs.get("schema_version")
    if version is None or not {"counters", "columns"} <= root.attrs.keys():
        raise ValueError(f"{path} is a zarr group but not a zooscope store (or its creation was interrupted: "
                         f"opening it for writing finishes it)")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path} has store schema {version}; this zooscope ({_zooscope_version()}) reads up to "
                         f"{SCHEMA_VERSION}: upgrade zooscope")


# ---------------------------------------------------------------------------------------------------------------


class StoreView:
    """A read-only view of a store as DataFrames (what ``zooscope.open`` returns).

    ``latest=True`` keeps only the newest version of each model_id, in ``.models`` and ``.layers``.
    """

    def __init__(self, store: ZooStore, latest: bool = False) -> None:
        self.store = store
        self.latest = latest

    @property
    def models(self) -> pd.DataFrame:
        """One row per model (index: model row)."""
        return self.store.models(latest=self.latest)

    @property
    def layers(self) -> pd.DataFrame:
        """One row per layer matrix (index: layer row, the argument of ``esd``)."""
        return self.store.layers(self.models if self.latest else None)

    @property
    def drift(self) -> pd.DataFrame:
        """Distance-from-initialization rows."""
        return self.store.drift()

    @property
    def params(self) -> dict[str, Any]:
        """The analysis parameters recorded in the store."""
        return self.store.params

    def esd(self, layer_row: int) -> np.ndarray:
        """Eigenvalues of layer row ``layer_row``."""
        return self.store.esd(layer_row)

    def esds(self, layer_rows: Iterable[int] | None = None) -> list[np.ndarray]:
        """Eigenvalues of several layer rows (default: every row of ``.layers``)."""
        return self.store.esds(self.layers.index if layer_rows is None else layer_rows)

    def hist(self, layer_row: int) -> tuple[np.ndarray, np.ndarray]:
        """Weight histogram (counts, edges) of layer row ``layer_row``."""
        return self.store.hist(layer_row)

    def to_xarray(self, table: str = "layers"):
        """A table as a lazy ``xarray.Dataset`` (see ``ZooStore.to_xarray``)."""
        return self.store.to_xarray(table)

    def check(self, full: bool = True) -> list[str]:
        """Integrity problems (empty when sound); see ``ZooStore.check``."""
        return self.store.check(full)

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return repr(self.store).replace("<ZooStore", "<zooscope store", 1)


def open_store(path: str | os.PathLike | Any, latest: bool = False) -> StoreView:
    """Open a store read-only as DataFrames: ``.models``, ``.layers``, ``.drift``, ``.esd(layer_row)``."""
    return StoreView(ZooStore.open(path, "r"), latest=latest)
