"""Plan a scan: which models still need analysing, and how each is cut into tasks (one per model shard).

A model whose content hash the store already holds is skipped. A model larger than ``shard_bytes`` on disk is
split: by its safetensors/``.bin`` shard files when it has several (a file above the budget is split further),
otherwise into contiguous groups of whole tensors (checkpoint key order) of at most ``shard_bytes`` each
(a single tensor larger than the budget is a shard of its own). Tasks carry tensor names, never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from zooscope.pipelines.readers import CheckpointError, content_hash, model_files, open_checkpoint

#: Models above this many bytes on disk are split into shards of at most this many bytes (2 GiB).
DEFAULT_SHARD_BYTES = 2 * 1024**3


class Source(Protocol):
    """What ``plan`` needs of a model: where it is and what it is called (``readers.ModelSource`` fits)."""

    path: str
    model_id: str


@dataclass(frozen=True)
class Task:
    """One unit of work: analyse ``keys`` of the checkpoint at ``path`` (all tensors when ``keys`` is None).

    shard / n_shards: position of this task among its model's tasks (0-based) and their number.
    nbytes: bytes of tensor data the task reads (file size for an unsplit model).
    wants_gpu: the task may use a GPU (it asks for the ``GPU`` resource where workers offer one).
    """

    model_id: str
    path: str
    content_hash: str
    keys: tuple[str, ...] | None
    shard: int
    n_shards: int
    nbytes: int
    wants_gpu: bool = False


def plan(
    sources: Iterable[Source],
    *,
    done_hashes: Iterable[str],
    shard_bytes: int | None = None,
    hashes: Mapping[str, str] | None = None,
    wants_gpu: bool = False,
) -> list[Task]:
    """Tasks for every source whose content hash is not in ``done_hashes``, in source order.

    ``hashes`` maps a source path to its content hash where the caller already knows it (else it is computed
    with ``readers.content_hash``). Of several sources with the same content only the first is planned (the
    store keeps one row per hash). A checkpoint that cannot be opened for splitting becomes one task, so that
    its error is reported by the task like any other.
    """
    budget = DEFAULT_SHARD_BYTES if shard_bytes is None else int(shard_bytes)
    if budget < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    seen = set(done_hashes)
    tasks: list[Task] = []
    for source in sources:
        digest = (hashes or {}).get(source.path) or content_hash(source.path)
        if digest in seen:
            continue
        seen.add(digest)
        size = disk_bytes(source.path)
        groups = _shard_keys(source.path, budget) if size > budget else None
        if not groups or len(groups) == 1:
            tasks.append(Task(source.model_id, source.path, digest, None, 0, 1, size, wants_gpu))
            continue
        for i, (keys, nbytes) in enumerate(groups):
            tasks.append(Task(source.model_id, source.path, digest, tuple(keys), i, len(groups), nbytes, wants_gpu))
    return tasks


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


def _shard_keys(path: str, budget: int) -> list[tuple[list[str], int]] | None:
    try:
        with open_checkpoint(path) as ckpt:
            return split_keys(ckpt.keys(), ckpt.nbytes, ckpt.shard_of, budget)
    except CheckpointError:
        return None
