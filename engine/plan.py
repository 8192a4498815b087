"""Plan a scan: which models still need analysing, how each is cut into parts, and how parts pack into tasks.

A model whose content hash the store already holds is skipped. A model larger than ``shard_bytes`` on disk is
split: by its safetensors/``.bin`` shard files when it has several (a file above the budget is split further),
otherwise into contiguous groups of whole tensors (checkpoint key order) of at most ``shard_bytes`` each
(a single tensor larger than the budget is a shard of its own). Each model or shard is a :class:`Part`. A model
with a ``base`` (a fine-tune read as ``W − W_base``, or a LoRA adapter merged into its base: ``peft``) is split by
the keys of the derived checkpoint (``pipelines.derived.open_derived``), and its parts read both files.

``pack`` groups parts into :class:`Task`s, the unit Dask schedules: small models are packed many to a task (up to
``batch_bytes`` read and ``batch_models`` parts), so that a zoo of 100k small models is hundreds of tasks whose
layers the task solves bucketed by shape (``pipelines.batch``); a shard of a large model is a task of its own.
Tasks carry paths and tensor names, never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from zooscope.pipelines.derived import derived_hash, open_derived
from zooscope.pipelines.readers import CheckpointError, content_hash, model_files

#: Models above this many bytes on disk are split into shards of at most this many bytes (2 GiB).
DEFAULT_SHARD_BYTES = 2 * 1024**3
#: A task packs parts until it reads this many bytes (16 MiB: about a second of work for small CNNs) ...
DEFAULT_BATCH_BYTES = 16 * 1024**2
#: ... or holds this many parts.
DEFAULT_BATCH_MODELS = 2048


class Source(Protocol):
    """What ``plan`` needs of a model: where it is and what it is called (``readers.ModelSource`` fits); optional
    ``base`` (path of its base model) and ``peft`` (a LoRA adapter directory), as ``engine.scan.ModelInput`` has."""

    path: str
    model_id: str


@dataclass(frozen=True)
class Part:
    """One model, or one shard of a model: analyse ``keys`` of the checkpoint at ``path`` (all when None).

    shard / n_shards: position of this part among its model's parts (0-based) and their number.
    nbytes: bytes of tensor data the part reads (file size for an unsplit model).
    wants_gpu: the part may use a GPU (its task asks for the ``GPU`` resource where workers offer one).
    base, peft: read the part through ``pipelines.derived.open_derived(path, base, peft)`` (no base and not peft:
        the checkpoint itself); ``content_hash`` then covers the base (``derived.derived_hash``).
    """

    model_id: str
    path: str
    content_hash: str
    keys: tuple[str, ...] | None
    shard: int
    n_shards: int
    nbytes: int
    wants_gpu: bool = False
    base: str | None = None
    peft: bool = False


@dataclass(frozen=True)
class Task:
    """The unit of work Dask schedules: ``parts`` analysed together, their layers bucketed by shape."""

    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the task reads."""
        return sum(p.nbytes for p in self.parts)

    @property
    def wants_gpu(self) -> bool:
        return any(p.wants_gpu for p in self.parts)


def pack(parts: Sequence[Part], *, batch_bytes: int | None = None, batch_models: int | None = None,
         min_tasks: int = 1) -> list[Task]:
    """Group ``parts`` into tasks, in order: consecutive unsplit models share a task up to ``batch_bytes`` read
    (default ``DEFAULT_BATCH_BYTES``) and ``batch_models`` parts (default ``DEFAULT_BATCH_MODELS``); each shard
    of a split model is a task of its own. ``min_tasks``: shrink the batches so that there are at least this many
    tasks when there are that many parts (e.g. a few tasks per worker, so every worker gets work).
    """
    max_bytes, max_models = _budgets([p.nbytes for p in parts if p.n_shards == 1], batch_bytes, batch_models,
                                     min_tasks)
    tasks: list[Task] = []
    unsplit: list[Part] = []
    for part in [*parts, None]:  # None ends the last run of unsplit models
        if part is not None and part.n_shards == 1:
            unsplit.append(part)
            continue
        tasks += [Task(tuple(unsplit[r.start:r.stop])) for r in _runs([p.nbytes for p in unsplit], max_bytes,
                                                                       max_models)]
        unsplit = []
        if part is not None:
            tasks.append(Task((part,)))
    return tasks


def batch_ranges(sizes: Sequence[int], *, batch_bytes: int | None = None, batch_models: int | None = None,
                 min_tasks: int = 1) -> list[range]:
    """Consecutive runs of items with these ``sizes`` (bytes read), with ``pack``'s budgets for unsplit models:
    up to ``batch_bytes`` and ``batch_models`` items a run, shrunk so that there are at least ``min_tasks`` runs
    when there are that many items (an item above the byte budget is a run of its own)."""
    return _runs(sizes, *_budgets(sizes, batch_bytes, batch_models, min_tasks))


def _runs(sizes: Sequence[int], max_bytes: int, max_models: int) -> list[range]:
    """Consecutive runs of at most ``max_bytes`` (an item above it alone) and ``max_models`` items."""
    runs: list[range] = []
    start, size = 0, 0
    for i, nbytes in enumerate(sizes):
        if i > start and (size + nbytes > max_bytes or i - start >= max_models):
            runs.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def _budgets(sizes: Sequence[int], batch_bytes: int | None, batch_models: int | None,
             min_tasks: int) -> tuple[int, int]:
    """``(bytes, items)`` a batch of items with these ``sizes`` may hold (``pack``'s defaults and shrinking)."""
    max_bytes = DEFAULT_BATCH_BYTES if batch_bytes is None else int(batch_bytes)
    max_models = DEFAULT_BATCH_MODELS if batch_models is None else int(batch_models)
    if max_bytes < 1 or max_models < 1 or min_tasks < 1:
        raise ValueError(f"batch_bytes, batch_models and min_tasks must be positive, got {batch_bytes}, "
                         f"{batch_models} and {min_tasks}")
    if sizes and min_tasks > 1:
        max_models = min(max_models, max(1, -(-len(sizes) // min_tasks)))
        max_bytes = min(max_bytes, max(1, -(-sum(sizes) // min_tasks)))
    return max_bytes, max_models


def plan(
    sources: Iterable[Source],
    *,
    done_hashes: Iterable[str],
    shard_bytes: int | None = None,
    hashes: Mapping[str, str] | None = None,
    sizes: Mapping[str, int] | None = None,
    wants_gpu: bool = False,
) -> list[Part]:
    """Parts for every source whose content hash is not in ``done_hashes``, in source order.

    ``hashes`` maps a source path to its content hash where the caller already knows it (else it is computed
    with ``readers.content_hash``, and ``derived.derived_hash`` for a source with a base), ``sizes`` its own files'
    bytes on disk (else ``disk_bytes``). Of several sources with the same content only the first is planned (the
    store keeps one row per hash). A checkpoint that cannot be opened for splitting becomes one task, so that its
    error is reported by its task like any other.
    """
    budget = DEFAULT_SHARD_BYTES if shard_bytes is None else int(shard_bytes)
    if budget < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    seen = set(done_hashes)
    parts: list[Part] = []
    for source in sources:
        base, peft = getattr(source, "base", None), getattr(source, "peft", False)
        digest = (hashes or {}).get(source.path) or derived_hash(
            content_hash(source.path), content_hash(base) if base is not None else None, peft)
        if digest in seen:
            continue
        seen.add(digest)
        size = sizes[source.path] if sizes is not None and source.path in sizes else disk_bytes(source.path)
        size += disk_bytes(base) if base is not None else 0
        groups = _shard_keys(source.path, budget, base, peft) if size > budget else None
        if not groups or len(groups) == 1:
            parts.append(Part(source.model_id, source.path, digest, None, 0, 1, size, wants_gpu, base, peft))
            continue
        for i, (keys, nbytes) in enumerate(groups):
            parts.append(Part(source.model_id, source.path, digest, tuple(keys), i, len(groups), nbytes, wants_gpu,
                              base, peft))
    return parts


def disk_bytes(path: str) -> int:
    """Bytes of a checkpoint on disk: the file, or an HF directory's shards and index (0 if missing)."""
    try:
        return sum(f.stat().st_size for f in model_files(path))
    except (CheckpointError, OSError):
        return 0


def split_keys(keys: Sequence[str], nbytes: Callable[[str], int], shard_of: Callable[[str], str],
               budget: int) -> list[tuple[list[str], int]]:
    """Group ``keys`` into shards: per shard file (first-seen order), then contiguous runs of ≤ ``budget`` bytes.

    Returns ``[(keys, bytes), ...]``; every key appears in exactly one group, in its original order.
    """
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(shard_of(key), []).append(key)
    groups: list[tuple[list[str], int]] = []
    for file_keys in by_file.values():
        current: list[str] = []
        size = 0
        for key in file_keys:
            b = nbytes(key)
            if current and size + b > budget:
                groups.append((current, size))
                current, size = [], 0
            current.append(key)
            size += b
        if current:
            groups.append((current, size))
    return groups


def _shard_keys(path: str, budget: int, base: str | None = None,
                peft: bool = False) -> list[tuple[list[str], int]] | None:
    try:
        with open_derived(path, base=base, peft=peft) as ckpt:
            return split_keys(ckpt.keys(), ckpt.nbytes, ckpt.shard_of, budget)
    except CheckpointError:
        return None
