"""Measure the eigenvalue backends on this machine and keep the routing table that ``backend="auto"`` uses.

``measure`` times every (shape, backend, precision) on heavy-tailed Student-t stacks and records the error
against fp64 LAPACK SVD; ``build_table`` keeps, per (precision, size class, batch class) bucket, the fastest
backend that ``auto`` may take (SVD or checked Gram, :func:`~zooscope.kernels.esd.auto_eligible`) whose error is
acceptable; ``save_table``/``load_table`` keep it as JSON under ``$ZOOSCOPE_HOME``, one table per device
(:func:`~zooscope.kernels.backends.device_key`), so that a shared home holds a login node's CPU table and a GPU
node's table side by side and each worker routes by the table of its own device.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from zooscope.kernels.backends import BackendUnavailable, describe_device, device_key
from zooscope.kernels.esd import (
    BACKENDS,
    PRECISIONS,
    Route,
    RoutingTable,
    auto_eligible,
    backend_available,
    batch_class,
    eigenvalues,
    is_gram,
    size_class,
    table_for_device,
)
from zooscope.pipelines.analyze import AnalysisOptions

TABLE_NAME = "esd_routing.json"
REFERENCE_BACKEND = "scipy-gesdd"
MAX_ERROR = {"fp64": 1e-8, "fp32": 1e-3}
"""A backend may win a bucket only if its max |λ − λ_ref| / λ_ref,max stays below this."""
STUDENT_T_DOF = 3.0

Shape = tuple[int, int, int]


def parse_shapes(text: str) -> list[Shape]:
    """``"9x64x64,1x768x3072"`` → ``[(9, 64, 64), (1, 768, 3072)]``; ``NxM`` means batch 1."""
    shapes = []
    for token in (t.strip().lower() for t in text.split(",")):
        if not token:
            continue
        try:
            dims = tuple(int(d) for d in token.split("x"))
        except ValueError:
            raise ValueError(f"bad shape {token!r}: expected BxNxM or NxM with integer sides") from None
        if len(dims) == 2:
            dims = (1, *dims)
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(f"bad shape {token!r}: expected BxNxM or NxM with positive sides")
        shapes.append(dims)
    return shapes


def shape_label(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def heavy_tailed_stack(shape: Shape, seed: int = 0) -> np.ndarray:
    """A heavy-tailed (Student-t, 3 dof) fp32 stack, like trained weights; fp32 as checkpoints store them."""
    return np.random.default_rng(seed).standard_t(STUDENT_T_DOF, size=shape).astype(np.float32)


def measure(
    shapes: Iterable[Shape],
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = PRECISIONS,
    repeats: int = 3,
    progress=None,
) -> pd.DataFrame:
    """Time each backend on each shape and precision; one row per runnable combination.

    Columns: ``shape`` (``BxNxM``), ``batch``, ``n``, ``m``, ``backend``, ``precision``, ``seconds`` (median of
    ``repeats`` timed calls after one warm-up, host array in to host array out), ``max_rel_error``
    (max |λ − λ_ref| / max λ_ref against fp64 ``scipy-gesdd``). Unavailable backends and fp32 Gram routes are
    skipped. ``progress(label)`` is called before each combination, if given.
    """
    rows = []
    for shape in shapes:
        stack = heavy_tailed_stack(shape)
        reference = eigenvalues(stack, backend=REFERENCE_BACKEND, precision="fp64")
        scale = float(reference.max()) or 1.0
        for precision in precisions:
            for backend in backends:
                if (precision == "fp32" and is_gram(backend)) or not backend_available(backend):
                    continue
                if progress is not None:
                    progress(f"{shape_label(shape)} {backend} {precision}")
                try:
                    got = eigenvalues(stack, backend=backend, precision=precision)
                except BackendUnavailable:
                    continue
                times = []
                for _ in range(max(1, repeats)):
                    start = time.perf_counter()
                    eigenvalues(stack, backend=backend, precision=precision)
                    times.append(time.perf_counter() - start)
                rows.append({
                    "shape": shape_label(shape),
                    "batch": shape[0],
                    "n": shape[1],
                    "m": shape[2],
                    "backend": backend,
                    "precision": precision,
                    "seconds": float(np.median(times)),
                    "max_rel_error": float(np.max(np.abs(got - reference)) / scale),
                })
    return pd.DataFrame(rows, columns=["shape", "batch", "n", "m", "backend", "precision", "seconds",
                                       "max_rel_error"])


def with_ratios(df: pd.DataFrame, baseline: str = REFERENCE_BACKEND) -> pd.DataFrame:
    """Adds ``speedup``: the baseline's time over this row's, same shape and precision (NaN without baseline)."""
    base = df[df["backend"] == baseline].set_index(["shape", "precision"])["seconds"]
    key = pd.MultiIndex.from_frame(df[["shape", "precision"]])
    out = df.copy()
    out["speedup"] = base.reindex(key).to_numpy() / df["seconds"].to_numpy()
    return out


def build_table(df: pd.DataFrame) -> RoutingTable:
    """The fastest accurate, auto-eligible backend per (precision, size class, batch class) bucket of a
    :func:`measure` frame.

    A bucket holding several measured shapes ranks backends by their mean time over those shapes.
    """
    if df.empty:
        raise ValueError("no measurements to build a routing table from")
    work = df.assign(
        size_class=[size_class(min(n, m)) for n, m in zip(df["n"], df["m"])],
        batch_class=[batch_class(b) for b in df["batch"]],
    )
    work = work[(work["max_rel_error"] <= work["precision"].map(MAX_ERROR)) & work["backend"].map(auto_eligible)]
    routes = []
    for (precision, s, b), group in work.groupby(["precision", "size_class", "batch_class"], sort=True):
        times = group.groupby("backend")["seconds"].mean().sort_values()
        routes.append(Route(precision=str(precision), size_class=int(s), batch_class=int(b),
                            backend=str(times.index[0]),
                            times=tuple((str(k), float(v)) for k, v in times.items())))
    return RoutingTable(routes=tuple(routes), machine=describe_machine(), device=device_key())


def describe_machine() -> str:
    """Host name and device (:func:`~zooscope.kernels.backends.describe_device`): where a table was measured."""
    return f"{platform.node()}: {describe_device()}"


def default_table_path() -> Path:
    """``$ZOOSCOPE_HOME/esd_routing.json`` (``ZOOSCOPE_HOME`` defaults to ``~/.cache/zooscope``)."""
    home = os.environ.get("ZOOSCOPE_HOME") or "~/.cache/zooscope"
    return Path(home).expanduser() / TABLE_NAME


def save_table(table: RoutingTable, path: str | os.PathLike | None = None) -> Path:
    """Write the table (atomically) into the JSON file that keeps one table per device, replacing the table of the
    same ``device`` and keeping the others; returns the path written. An unreadable old file is replaced."""
    target = Path(path) if path is not None else default_table_path()
    try:
        others = [t for t in load_tables(target) if t.device != table.device]
    except ValueError:
        others = []
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"tables": [t.as_dict() for t in (*others, table)]}, indent=2) + "\n",
                   encoding="utf-8")
    tmp.replace(target)
    return target


def load_tables(path: str | os.PathLike | None = None) -> tuple[RoutingTable, ...]:
    """Every saved routing table (one per device; ``()`` when none was saved). A corrupt file raises ValueError
    naming it. Reads the one-table files of earlier versions too."""
    source = Path(path) if path is not None else default_table_path()
    if not source.is_file():
        return ()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        return tuple(RoutingTable.from_dict(t) for t in (data["tables"] if "tables" in data else [data]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{source}: not a zooscope routing table ({exc}); rerun `zooscope bench svd --tune`") from exc


def load_table(path: str | os.PathLike | None = None, device: str | None = None) -> RoutingTable | None:
    """The saved table of ``device`` (default: this process's device), or None (see
    :func:`~zooscope.kernels.esd.table_for_device`)."""
    return table_for_device(load_tables(path), device)


def with_saved_table(options: AnalysisOptions) -> AnalysisOptions:
    """``options`` with every saved routing table (:func:`load_tables`) when ``esd_backend="auto"`` and none is set.

    All devices' tables travel with the options; each process that resolves a route (the worker that runs the
    task) takes the table of its own device and ignores the others
    (:func:`~zooscope.kernels.esd.table_for_device`). Every route ``auto`` may take keeps each eigenvalue within
    1e-6 of LAPACK SVD's, so a table changes speed, not results; the route each layer took is stored in its
    ``esd_backend`` column.
    """
    if options.esd_backend != "auto" or options.esd_table is not None:
        return options
    tables = load_tables()
    return options if not tables else dataclasses.replace(options, esd_table=tables)
