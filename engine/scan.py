"""``scan``: checkpoints (paths and/or a manifest CSV) -> content hashes -> plan -> tasks -> the Zarr store.

Only models whose content hash the store does not hold are analysed (a nightly rerun over a growing directory
analyses only what is new or changed; a changed file of a known ``model_id`` becomes its next ``version`` and
the old rows stay; a bad file already recorded with the same hash is not retried). Shards of a model are merged
in layer order and the model is appended to the store as soon as its last shard finishes: this process is the
store's only writer, so a crash loses at most the models in flight and a rerun picks up the rest.

A model with a ``base`` (``--base``, a manifest ``base`` column) is analysed as ``W − W_base`` (with ``peft``: a
LoRA adapter directory, merged into its base when it has one; ``pipelines.derived``); its content hash covers
both files (``derived.derived_hash``) and its file stat both stats, so a changed base is analysed again.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from zooscope.engine.cluster import available_cores, describe_compute, get_profile, make_client
from zooscope.engine.plan import Part, Task, batch_ranges, disk_bytes, pack, plan
from zooscope.engine.run import execute, wants_gpu
from zooscope.engine.store import ZooStore, check_column_names
from zooscope.engine.tune import with_saved_table
from zooscope.pipelines.analyze import AnalysisOptions, require_backends
from zooscope.pipelines.derived import derived_hash
from zooscope.pipelines.drift import DRIFT_COLUMNS, DriftPair, drift_tables, pair_checkpoints
from zooscope.pipelines.readers import CheckpointError, adapter_files, content_hash, discover, model_files
from zooscope.pipelines.result import BatchResult, ModelResult, merge_results
from zooscope.pipelines.summary import SUMMARY_METRICS, summary_columns

#: With ``cluster="auto"``, start a LocalCluster only for at least this much work (bytes to read) ...
AUTO_LOCAL_BYTES = 256 * 1024**2
#: ... spread over at least this many tasks, on a machine with at least two cores; else run in-process.
AUTO_LOCAL_TASKS = 2

#: Completed models are committed at least every this many models (a commit costs about 0.3 s whatever its size:
#: a zoo of small models commits every few batches, not every batch).
COMMIT_MODELS = 4096

#: Models smaller than this (bytes on disk) are hashed in the scanning thread, bigger ones on a thread pool.
HASH_INLINE_BYTES = 4 * 1024**2

#: Model-row columns that scan writes itself; a manifest column may not reuse these names.
RESERVED_COLUMNS = frozenset({
    "model_id", "path", "content_hash", "version", "status", "error", "n_layers", "n_params", "seconds",
    "scanned_at", "file_stat", "base_path", *SUMMARY_METRICS, *(f"robust_{m}" for m in SUMMARY_METRICS),
})


class ScanUsageError(ValueError):
    """The scan cannot start: no inputs, a bad manifest, or a bad argument."""


@dataclass
class ScanReport:
    """What a scan did. ``failed`` lists ``(path, message naming the file)`` per model that failed: recorded as an
    error row (the file cannot be read), or, ``n_retry`` of them, not stored because the failure was not the
    file's (a dead worker, memory, a missing backend), so the next scan retries them."""

    store: str
    n_ok: int = 0
    n_error: int = 0
    n_skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    cluster: str = "none"
    n_drift: int = 0
    n_retry: int = 0

    @property
    def exit_code(self) -> int:
        """0 when every analysed model is ok, 3 when some failed."""
        return 3 if self.n_error else 0


@dataclass(frozen=True)
class ModelInput:
    """One model to scan: absolute ``path``, its ``model_id`` and the manifest's metadata columns; ``base``: the
    absolute path of the model it is read against (``W − W_base``), ``peft``: ``path`` is a LoRA adapter
    directory (``pipelines.derived.open_derived``)."""

    path: str
    model_id: str
    metadata: tuple[tuple[str, Any], ...] = ()
    base: str | None = None
    peft: bool = False


def scan(
    paths: Sequence[str | os.PathLike] = (),
    store: str | os.PathLike | None = None,
    *,
    manifest: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    peft: bool = False,
    options: AnalysisOptions = AnalysisOptions(),
    cluster: str = "auto",
    config: str | os.PathLike | None = None,
    workers: int | None = None,
    shard_bytes: int | None = None,
    batch_bytes: int | None = None,
    batch_models: int | None = None,
    rehash: bool = False,
    retry_failed: bool = False,
    commit_seconds: float = 10.0,
    progress: bool = True,
    client: Any = None,
) -> ScanReport:
    """Analyse every new or changed checkpoint of ``paths`` and ``manifest`` into the store at ``store``.

    base: a checkpoint of the same architecture: every model without its own manifest ``base`` is analysed as
        ``W − W_base`` (WeightWatcher's ``base_model``); its path is stored in the ``base_path`` column.
    peft: every model of ``paths`` is a LoRA adapter directory (a manifest row: its ``peft`` column), analysed as
        ``B·A·scale``, or merged into its base (``W_base + B·A·scale``).

    cluster: a profile of ``cluster.yaml`` (``config``, else the packaged one) such as ``none`` (in-process),
        ``local``, ``local-cuda``, ``slurm``, ``address``; or ``auto``: ``local`` when there are at least
        ``AUTO_LOCAL_TASKS`` tasks and ``AUTO_LOCAL_BYTES`` bytes to read on a machine with ≥ 2 cores, else
        ``none`` (so a small zoo or a rerun with nothing new starts no cluster). ``client``: an existing
        ``distributed.Client`` to use instead (``cluster`` is then ignored).
    shard_bytes: models larger than this (bytes on disk) are split into shards (default 2 GiB; never with
        ``options.intra``/``stacked``, whose rows span the whole model).
    batch_bytes, batch_models: smaller models are analysed many to a task, up to this many bytes read and models
        (``engine.plan.pack``; on a cluster the batches shrink so that each worker gets about four tasks).
    rehash: hash every file even when its size and mtime match what the store recorded for that path.
    retry_failed: analyse again the models stored as errors (files that could not be read); by default only
        models that failed for another reason (not stored) are retried.
    commit_seconds: completed models are committed to the store at least this often (and every ``COMMIT_MODELS``
        models, and at the end); a crash loses at most the models completed since the last commit. 0: commit after
        every task.
    Raises ``ScanUsageError`` for no inputs, a bad manifest, or a store recorded with other analysis options;
    ``StoreLockedError`` when another live process writes the store. Errors of single models never raise: they
    become error rows (see ``ScanReport.failed``).
    """
    t0 = time.perf_counter()
    if store is None:
        raise ScanUsageError("no store given: pass store=PATH (--store on the command line)")
    options = with_saved_table(options)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    models = collect_inputs(paths, manifest, peft=peft)
    if base is not None:
        models = [m if m.base is not None else replace(m, base=os.path.abspath(base)) for m in models]
    if not models:
        given = [*map(str, paths), *([str(manifest)] if manifest else [])]
        raise ScanUsageError(f"no checkpoints found in {', '.join(given) or '(no paths given)'}")
    for name, value in (("shard_bytes", shard_bytes), ("batch_bytes", batch_bytes), ("batch_models", batch_models)):
        if value is not None and not value >= 1:
            raise ScanUsageError(f"{name} must be a positive number, got {value!r}")
    if options.intra or options.stacked:  # their rows span every tensor of a model: models are never split
        if shard_bytes is not None:
            raise ScanUsageError("shard_bytes cannot be combined with intra/stacked: their layers span every tensor "
                                 "of a model, which is therefore analysed whole")
        shard_bytes = sys.maxsize
    if client is None and cluster != "auto":
        get_profile(cluster, config)  # a bad profile fails before the store is touched
    if client is None and cluster in ("auto", "none", "local"):  # this machine runs it: its backends must exist
        try:
            require_backends(options)
        except ValueError as err:
            raise ScanUsageError(str(err)) from err
    try:  # a manifest column the store cannot hold fails now, not at the first write after the analysis
        check_column_names({name for m in models for name, _ in m.metadata}, "manifest column")
    except ValueError as err:
        raise ScanUsageError(str(err)) from err
    pairs = _drift_pairs(models)  # a bad init column fails before any analysis, not after it
    report = ScanReport(store=str(store))
    try:
        zoo = ZooStore.open(str(store), "a", params=options.as_params(), flush_every=COMMIT_MODELS,
                            flush_seconds=commit_seconds)
    except ValueError as err:  # not a store, or a store made with other analysis options
        raise ScanUsageError(str(err)) from err
    try:
        known = zoo.models(columns=("model_id", "path", "file_stat", "content_hash", "status"))
        hashes, stats, failures = _hash_all(models, known, rehash)
        done = _stored_pairs(known, retry_failed)
        for model, message in failures:  # unreadable before any task: recorded now, with a path-derived hash
            digest = "unreadable:" + hashlib.sha256(_input_name(model).encode()).hexdigest()
            if (model.model_id, digest) in done:
                report.n_skipped += 1
                continue
            row = _model_row(model, digest, "", message)
            zoo.append(row, None)
            report.n_error += 1
            report.failed.append((model.path, row["error"]))
        by_hash: dict[str, list[ModelInput]] = {}  # models to store, by content: identical files analysed once
        for model in models:
            if model.path in hashes:
                if (model.model_id, hashes[model.path]) in done:
                    report.n_skipped += 1
                else:
                    by_hash.setdefault(hashes[model.path], []).append(model)
        parts = plan([twins[0] for twins in by_hash.values()], done_hashes=(), shard_bytes=shard_bytes,
                     hashes=hashes, sizes={p: _stat_bytes(s) for p, s in stats.items()}, wants_gpu=wants_gpu(options))
        report.cluster = "client" if client is not None else resolve_cluster(cluster, parts)
        context = nullcontext(client) if client is not None else make_client(report.cluster, config=config,
                                                                           workers=workers)
        with context as active:
            if progress:
                print(f"zooscope scan: {describe_compute(active)}", file=sys.stderr, flush=True)
            n_workers = len(active.scheduler_info().get("workers", {})) if active is not None else 1
            tasks = pack(parts, batch_bytes=batch_bytes, batch_models=batch_models, min_tasks=4 * max(1, n_workers)
                         if active is not None else 1)
            writer = _Writer(zoo, report, by_hash, stats)
            for task, outcome in execute(tasks, options, client=active, progress=progress):
                writer.add(task, outcome)
            report.n_drift = _scan_drift(models, pairs, zoo, active, batch_bytes, batch_models)
    finally:
        zoo.close()
    report.seconds = time.perf_counter() - t0
    return report


def _stored_pairs(known: pd.DataFrame, retry_failed: bool) -> set[tuple[str, str]]:
    """``(model_id, content_hash)`` of the stored models a scan skips: all, or with ``retry_failed`` those whose
    latest row for that content is not an error."""
    if not len(known):
        return set()
    rows = known if not retry_failed else known.drop_duplicates(["model_id", "content_hash"], keep="last")
    if retry_failed:
        rows = rows[rows["status"] != "error"]
    return set(zip(rows["model_id"], rows["content_hash"]))


def _drift_pairs(models: Sequence[ModelInput]) -> list[tuple[str, str, float]]:
    """``(model_id, init_model_id, step)`` for every model whose manifest ``init`` names another checkpoint of
    the scan (none without an ``init`` column); a bad ``init`` or a missing step raises ``ScanUsageError``."""
    manifest = pd.DataFrame([{"model_id": m.model_id, "path": m.path, **dict(m.metadata)} for m in models])
    if "init" not in manifest.columns:
        return []
    try:
        return pair_checkpoints(manifest)
    except ValueError as err:
        raise ScanUsageError(f"cannot pair checkpoints with their init: {err}") from err


def _scan_drift(models: Sequence[ModelInput], pairs: Sequence[tuple[str, str, float]], zoo: ZooStore,
                client: Any, batch_bytes: int | None = None, batch_models: int | None = None) -> int:
    """Distance from initialization for the ``pairs`` of ``_drift_pairs`` (paper 001) that the store's
    ``/drift`` does not hold yet. Pairs (in ``pair_checkpoints`` order, so a sweep's same-shaped runs sit together)
    are batched like models (``plan.batch_ranges`` on the bytes of both files, up to ``batch_bytes`` and
    ``batch_models`` pairs, about four tasks per worker), one ``pipelines.drift.drift_tables`` call per task, on
    the cluster or in-process. Returns the number of pairs
    added. A pair that cannot be read is skipped (its model's own row already carries the error)."""
    if not pairs:
        return 0
    known = zoo.drift()
    done = set(zip(known["model_id"], known["init_model_id"])) if len(known) else set()
    path_of = {m.model_id: m.path for m in models}
    todo = [DriftPair(path_of[i], path_of[m], m, i, step) for m, i, step in pairs if (m, i) not in done]
    n_workers = len(client.scheduler_info().get("workers", {})) if client is not None else 1
    sizes = [disk_bytes(p.init) + disk_bytes(p.ckpt) for p in todo]
    runs = batch_ranges(sizes, batch_bytes=batch_bytes, batch_models=batch_models,
                        min_tasks=4 * max(1, n_workers) if client is not None else 1)
    batches = [[todo[j] for j in run] for run in runs]
    if client is None:
        results = [_drift_batch(batch) for batch in batches]
    else:
        results = client.gather(client.map(_drift_batch, batches, pure=False)) if batches else []
    tables = [table for table, _ in results if len(table)]
    if tables:
        zoo.append_drift(pd.concat(tables, ignore_index=True))
    return sum(n for _, n in results)


def _drift_batch(pairs: list[DriftPair]) -> tuple[pd.DataFrame, int]:
    """The drift rows of the readable ``pairs``, stacked, and how many pairs they cover."""
    tables = [t for t in drift_tables(pairs, skip_unreadable=True) if t is not None]
    return (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=DRIFT_COLUMNS)), len(tables)


def collect_inputs(paths: Iterable[str | os.PathLike], manifest: str | os.PathLike | None = None, *,
                   peft: bool = False) -> list[ModelInput]:
    """The models named by ``paths`` (files, model directories, directories of checkpoints; with ``peft``: LoRA
    adapter directories, or directories holding them) and ``manifest``.

    A path that does not exist is kept as one model (it becomes an error row). Manifest CSV: ``path`` (relative
    to the manifest's folder unless absolute), optional ``model_id`` (only for a path that is one model), optional
    ``base`` (a base model, relative like ``path``; empty: none) and ``peft`` (true: ``path`` is a LoRA adapter
    directory), and any other columns, kept as model metadata. A path listed twice is scanned once (the
    manifest's listing, else the first); the manifest may not list one path with two bases.
    """
    found: dict[str, ModelInput] = {}
    if manifest is not None:
        for model in read_manifest(manifest):
            other = found.setdefault(model.path, model)
            if (other.base, other.peft) != (model.base, model.peft):
                raise ScanUsageError(f"manifest {manifest} lists {model.path} twice with different base or peft; "
                                     "scan the second pairing in another run (it becomes the model's next version)")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for given in paths:
        for model in _expand(Path(given), peft):
            found.setdefault(model.path, model)
    first: dict[str, str] = {}
    for model in found.values():  # one model_id, two files: a second version would silently replace the first
        other = first.setdefault(model.model_id, model.path)
        if other != model.path:
            raise ScanUsageError(f"model_id {model.model_id!r} names two files, {other} and {model.path}; give each "
                                 "model its own model_id")
    return list(found.values())


def read_manifest(manifest: str | os.PathLike) -> list[ModelInput]:
    """Models of a manifest CSV (see ``collect_inputs``); every path must lie in or below the manifest's folder
    (symbolic links resolved)."""
    manifest = Path(manifest)
    try:
        table = pd.read_csv(manifest)
    except (OSError, ValueError) as err:
        raise ScanUsageError(f"cannot read manifest {manifest}: {err}") from err
    if "path" not in table.columns:
        raise ScanUsageError(f"manifest {manifest} needs a 'path' column; it has {', '.join(map(str, table.columns))}")
    meta_columns = [c for c in table.columns if c not in ("path", "model_id", "base", "peft")]
    clash = sorted(set(meta_columns) & RESERVED_COLUMNS)
    if clash:
        raise ScanUsageError(f"manifest {manifest}: columns {', '.join(clash)} are reserved for scan results; "
                             "rename them")
    models = []
    for i, row in table.iterrows():
        if pd.isna(row["path"]) or not str(row["path"]).strip():
            raise ScanUsageError(f"manifest {manifest}, row {i + 2}: empty path")
        path = _manifest_path(manifest, i, row["path"])
        base = row.get("base")
        base = None if base is None or pd.isna(base) or not str(base).strip() else \
            os.path.abspath(_manifest_path(manifest, i, base))
        peft = _manifest_flag(manifest, i, row.get("peft", False))
        metadata = tuple((c, _init_path(manifest, v) if c == "init" else _plain(v))
                         for c, v in ((c, row[c]) for c in meta_columns))
        expanded = [replace(m, base=base) for m in _expand(path, peft)]
        model_id = row.get("model_id")
        if model_id is not None and not pd.isna(model_id):
            if len(expanded) != 1:
                raise ScanUsageError(f"manifest {manifest}, row {i + 2}: model_id {model_id!r} given for {path}, "
                                     f"which holds {len(expanded)} models")
            expanded = [replace(expanded[0], model_id=str(model_id))]
        models += [replace(m, metadata=metadata) for m in expanded]
    return models


def _manifest_path(manifest: Path, i: int, value: Any) -> Path:
    """A manifest cell naming a file, relative to the manifest's folder unless absolute, which it must lie in or
    below (symbolic links resolved); ``i``: the table row (the file's line ``i + 2``)."""
    path = manifest.parent / str(value).strip()
    root = os.path.realpath(manifest.parent)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ScanUsageError(f"manifest {manifest}, row {i + 2}: {path} is outside the manifest's folder {root} "
                             "(a manifest names checkpoints in or below its own folder)")
    return path


def _manifest_flag(manifest: Path, i: int, value: Any) -> bool:
    """A manifest cell read as a yes/no flag: empty, 0, false, no -> False; 1, true, yes -> True."""
    text = "" if pd.isna(value) else str(_plain(value)).strip().lower()
    if text in ("", "0", "0.0", "false", "no"):
        return False
    if text in ("1", "1.0", "true", "yes"):
        return True
    raise ScanUsageError(f"manifest {manifest}, row {i + 2}: peft must be true or false, got {value!r}")


def _init_path(manifest: Path, value: Any) -> Any:
    """An ``init`` entry that names a checkpoint file relative to the manifest becomes its absolute path (so it
    pairs with that model's absolute ``path``); a model_id or anything else is kept as it is."""
    value = _plain(value)
    if isinstance(value, str) and value.strip() and (manifest.parent / value).exists():
        return str(manifest.parent / value)
    return value


def resolve_cluster(cluster: str, tasks: Sequence[Task]) -> str:
    """The profile ``cluster='auto'`` stands for, given the planned tasks (other names pass through).

    ``local`` lays its workers out by the machine's GPUs (``engine.cluster.local_worker_specs``: one worker per
    GPU, CPU workers that see no GPU), so ``auto`` on a GPU machine places GPU work explicitly too; ``none`` runs
    in this one process (one CUDA context at most).
    """
    if cluster != "auto":
        return cluster
    big = len(tasks) >= AUTO_LOCAL_TASKS and sum(t.nbytes for t in tasks) >= AUTO_LOCAL_BYTES
    return "local" if big and available_cores() >= 2 else "none"


def file_stat(path: str, files: Sequence[Path] | None = None) -> str:
    """``"files:bytes:newest mtime in ns"`` of a model's files (``model_files(path)``, when known): cheap evidence
    that a file did not change."""
    stats = [f.stat() for f in (model_files(path) if files is None else files)]
    return f"{len(stats)}:{sum(s.st_size for s in stats)}:{max(s.st_mtime_ns for s in stats)}"


def _stat_bytes(stat: str) -> int:
    """The bytes on disk of the model's own files, from its ``file_stat`` (or ``_input_stat``) string."""
    return int(stat.split(":")[1])


def _expand(path: Path, peft: bool = False) -> list[ModelInput]:
    """The models at ``path`` (``readers.discover``); with ``peft``, the LoRA adapter directories at or below it."""
    if not path.exists():
        return [ModelInput(os.path.abspath(path), path.stem or path.name, peft=peft)]
    if not peft:
        return [ModelInput(os.path.abspath(s.path), s.model_id) for s in discover([path])]
    if not path.is_dir() or adapter_files(path):  # one model (a file: an error row naming it)
        return [ModelInput(os.path.abspath(path), path.resolve().name if path.is_dir() else path.stem, peft=True)]
    found = []
    for dirpath, dirnames, _ in os.walk(path):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in list(dirnames):
            if adapter_files(Path(dirpath, name)):
                found.append(ModelInput(os.path.abspath(Path(dirpath, name)),
                                        Path(dirpath, name).relative_to(path).as_posix(), peft=True))
                dirnames.remove(name)
    return found


def _plain(value: Any) -> Any:
    """A manifest cell as a plain Python value (numpy scalars -> int/float/str/bool)."""
    return value.item() if hasattr(value, "item") else value


def _input_stat(model: ModelInput, files: Sequence[Path]) -> str:
    """``file_stat`` of a model of ``files``, and for a model with a base also the base's stat and path (and
    ``peft``)."""
    stat = file_stat(model.path, files) + (" peft" if model.peft else "")
    if model.base is None:
        return stat
    try:
        return f"{stat} base {file_stat(model.base)} {model.base}"
    except (CheckpointError, OSError) as err:
        raise CheckpointError(None, None, f"base model {err}") from err


def _input_name(model: ModelInput) -> str:
    """The path of a model, with its base's and ``peft`` when it has them: what an unreadable model's hash hashes."""
    return model.path + (f"\0base {model.base}" if model.base is not None else "") + ("\0peft" if model.peft else "")


def _hash_all(models: Sequence[ModelInput], known: pd.DataFrame,
              rehash: bool) -> tuple[dict[str, str], dict[str, str], list[tuple[ModelInput, str]]]:
    """Content hashes by path (reusing the store's hash where path and file stat match; with a base: the
    ``derived_hash`` of both files, each base hashed once), file stats by path, and the models whose files cannot
    be read, with the message. Files under ``HASH_INLINE_BYTES`` are hashed one after the other (a thread per
    small file costs more than its hash), bigger ones on a thread pool."""
    cached: dict[tuple[str, str], str] = {}
    if not rehash and len(known) and {"path", "file_stat", "content_hash"} <= set(known.columns):
        cached = {(p, s): h for p, s, h in zip(known["path"], known["file_stat"], known["content_hash"])
                  if isinstance(s, str) and s}
    stats: dict[str, str] = {}
    files: dict[str, list[Path]] = {}
    failures: list[tuple[ModelInput, str]] = []
    for model in models:
        try:
            files[model.path] = model_files(model.path)
            stats[model.path] = _input_stat(model, files[model.path])
        except (CheckpointError, OSError) as err:
            failures.append((model, str(err)))
    hashes = {m.path: cached[(m.path, stats[m.path])] for m in models if (m.path, stats.get(m.path)) in cached}
    todo = [m for m in models if m.path in stats and m.path not in hashes]
    bases = list(dict.fromkeys(m.base for m in todo if m.base is not None))
    small = {m.path for m in todo if _stat_bytes(stats[m.path]) < HASH_INLINE_BYTES}

    def one(path: str) -> tuple[str | None, str]:
        try:
            return content_hash(path, files.get(path)), ""
        except (CheckpointError, OSError) as err:
            return None, str(err)

    with ThreadPoolExecutor(max_workers=max(1, min(8, available_cores()))) as pool:  # hashlib releases the GIL
        base_hashes = dict(zip(bases, pool.map(one, bases)))
        inline = {path: one(path) for path in small}
        large = [m.path for m in todo if m.path not in small]
        digests = {**inline, **dict(zip(large, pool.map(one, large)))}
        for model in todo:
            digest, message = digests[model.path]
            base_digest, base_message = base_hashes.get(model.base, (None, ""))
            if digest is None:
                failures.append((model, message))
            elif base_message:
                failures.append((model, f"base model {base_message}"))
            else:
                hashes[model.path] = derived_hash(digest, base_digest, model.peft)
    return hashes, stats, failures


#: The model-row columns of the summaries (WeightWatcher's means and the robust ones).
SUMMARY_COLUMNS = frozenset({*SUMMARY_METRICS, *(f"robust_{m}" for m in SUMMARY_METRICS)})


class _Writer:
    """Turns finished tasks into store rows: the models of a batch are appended together (one row per model, their
    summaries computed for the whole batch at once); the shards of a split model are merged, in layer order, when
    its last shard is in. A task that failed as a whole (a dead worker, memory, a missing backend) is transient: its
    models are reported, not stored, so the next scan retries them."""

    def __init__(self, zoo: ZooStore, report: ScanReport, by_hash: dict[str, list[ModelInput]],
                 stats: dict[str, str]) -> None:
        self.zoo, self.report, self.by_hash, self.stats = zoo, report, by_hash, stats
        self.shards: dict[str, dict[int, Any]] = {}

    def add(self, task: Task, outcome: BatchResult | Exception) -> None:
        if len(task.parts) == 1 and task.parts[0].n_shards > 1:
            part = task.parts[0]
            shard = outcome if isinstance(outcome, BaseException) else _part_or_error(outcome, 0)
            done = self.shards.setdefault(part.content_hash, {})
            done[part.shard] = shard
            if len(done) == part.n_shards:
                del self.shards[part.content_hash]
                self._add_merged(part, [done[i] for i in range(part.n_shards)])
            return
        if isinstance(outcome, BaseException):
            for part in task.parts:
                self._transient(part, outcome)
            return
        self._add_batch(task.parts, outcome)

    def _transient(self, part: Part, err: BaseException) -> None:
        for model in self.by_hash[part.content_hash]:
            self.report.n_error += 1
            self.report.n_retry += 1
            self.report.failed.append((model.path, f"{model.path}: {_message(err)} (not stored: retried by the "
                                                   "next scan)"))

    def _add_batch(self, parts: Sequence[Part], batch: BatchResult) -> None:
        result = batch.result
        seconds = result.timings.get("wall", math.nan) / max(1, sum(p.nbytes for p in parts))
        rows = []
        for i, part in enumerate(parts):
            model = self.by_hash[part.content_hash][0]
            error = "" if batch.errors[i] is None else _message(batch.errors[i])
            rows.append(_model_row(model, part.content_hash, self.stats.get(model.path, ""), error))
            if error:
                rows[-1].update(n_layers=0)
            else:
                rows[-1].update(n_params=int(batch.n_params[i]), seconds=seconds * part.nbytes)
        counts = np.bincount(batch.part_of_row, minlength=len(parts))
        for i, row in enumerate(rows):
            if not row["error"]:
                row["n_layers"] = int(counts[i])
        if len(result.layers):
            for column, values in batch.summaries.items():
                for i, row in enumerate(rows):
                    if not row["error"] and counts[i]:
                        row[column] = float(values[i])
        self.zoo.append_many(rows, result, batch.part_of_row)
        self._count(rows)
        for i, part in enumerate(parts):  # byte-identical files of other models: their own rows, the same results
            for twin in self.by_hash[part.content_hash][1:]:
                self._add_twin(twin, rows[i], None if rows[i]["error"] else batch.part(i))

    def _add_twin(self, twin: ModelInput, row: dict[str, Any], result: ModelResult | None) -> None:
        own = _model_row(twin, row["content_hash"], self.stats.get(twin.path, ""),
                         row["error"].replace(self.by_hash[row["content_hash"]][0].path, twin.path))
        own.update({k: v for k, v in row.items() if k in ("n_layers", "n_params", "seconds") or k in SUMMARY_COLUMNS})
        self.zoo.append(own, result)
        self._count([own])

    def _add_merged(self, part: Part, shards: list[Any]) -> None:
        model = self.by_hash[part.content_hash][0]
        error = next((s for s in shards if isinstance(s, BaseException)), None)
        if error is not None and not isinstance(error, CheckpointError):
            self._transient(part, error)
            return
        row = _model_row(model, part.content_hash, self.stats.get(model.path, ""),
                         "" if error is None else _message(error))
        result = None if error is not None else merge_results(shards)
        if result is not None:
            row.update(n_layers=len(result.layers), n_params=int(result.n_params),
                       seconds=float(result.timings.get("wall", math.nan)))
            if len(result.layers):
                row.update({c: float(v[0]) for c, v in summary_columns(
                    result, np.zeros(len(result.layers), np.int64), 1).items()})
        self.zoo.append(row, result)
        self._count([row])
        for twin in self.by_hash[part.content_hash][1:]:
            self._add_twin(twin, row, result)

    def _count(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["error"]:
                self.report.n_error += 1
                self.report.failed.append((row["path"], row["error"]))
            else:
                self.report.n_ok += 1


def _part_or_error(batch: BatchResult, i: int) -> ModelResult | CheckpointError:
    result = batch.part(i) if batch.errors[i] is None else batch.errors[i]
    if not isinstance(result, BaseException):
        result.timings["wall"] = batch.result.timings.get("wall", math.nan)
    return result


def _message(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _model_row(model: ModelInput, digest: str, stat: str, error: str) -> dict[str, Any]:
    """The ``/models`` row of one model without its results (docs/INTERFACES.md, Table columns; the store adds
    ``version`` and ``scanned_at``; the caller adds ``n_layers``, ``n_params``, ``seconds`` and the summaries)."""
    return {
        "model_id": model.model_id,
        "path": model.path,
        "content_hash": digest,
        "status": "error" if error else "ok",
        "error": error if not error or model.path in error else f"{model.path}: {error}",
        "n_layers": 0,
        "seconds": math.nan,
        "file_stat": stat,
        **({"base_path": model.base} if model.base is not None else {}),
        **({"peft": True} if model.peft else {}),
        **dict(model.metadata),
    }

