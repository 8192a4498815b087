"""Run planned tasks in-process or on a Dask cluster and yield their results as they finish.

A task is a batch of parts (small models, or one shard of a large one). Each task opens its checkpoints on the
worker, reads only its own tensors and analyses them together (``pipelines.batch.analyze_batch``); the client sends
paths and tensor names, never weights. A file that cannot be read comes back inside the task's ``BatchResult``
as that part's ``CheckpointError`` (permanent: the file will not get better, so the task is not retried for it).
Anything else that fails a task (a worker that died, memory, a missing backend) is transient: Dask retries the
task ``retries`` times, and a task that still fails comes back as its exception for every part it held.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from zooscope.engine.plan import Part, Task
from zooscope.kernels.backends import one_blas_thread
from zooscope.pipelines.analyze import AnalysisOptions
from zooscope.pipelines.batch import analyze_batch
from zooscope.pipelines.result import BatchResult
from zooscope.pipelines.summary import summary_columns

#: In a log (stderr not a terminal), the scan's progress is printed as a line at most this often, seconds.
LOG_EVERY_S = 30.0
#: Test hook: a task holding this model_id ends its process with ``os._exit(1)`` ...
EXIT_ON_ENV = "ZOOSCOPE_TEST_EXIT_ON"
#: ... unless this marker file exists (the hook creates it before exiting, so the retry succeeds).
EXIT_MARKER_ENV = "ZOOSCOPE_TEST_EXIT_MARKER"
#: Seconds a cluster scan waits for its first worker (e.g. SLURM jobs still queued) before giving up.
WORKER_WAIT_S = 600.0


def run_task(task: Task, options: AnalysisOptions) -> BatchResult:
    """The task body: analyse the task's parts together (``pipelines.batch.analyze_batch``; a part with a base or
    ``peft``: ``pipelines.derived.open_derived``).

    ``result.timings['wall']`` is the task's wall time in seconds. A batch of whole models comes back with its
    model summaries (``BatchResult.summaries``) and without the node-strength vectors (used here, not stored), so
    that the scanning process has less to receive and compute; a shard keeps them for the merge. The ``Task`` is
    sent to a worker as it is: Dask does not walk an object's fields as it walks lists of tuples.
    """
    for part in task.parts:
        _test_exit_hook(part.model_id)
    t0 = time.perf_counter()
    batch = analyze_batch([(p.path, list(p.keys) if p.keys is not None else None, p.base, p.peft)
                           for p in task.parts], options)
    if all(p.keys is None for p in task.parts):
        batch.summaries = summary_columns(batch.result, batch.part_of_row, len(task.parts))
        batch.result.strengths = []
    batch.result.timings["wall"] = time.perf_counter() - t0
    return batch


def _test_exit_hook(model_id: str) -> None:
    if os.environ.get(EXIT_ON_ENV) != model_id:
        return
    marker = os.environ.get(EXIT_MARKER_ENV)
    if marker:
        try:
            Path(marker).touch(exist_ok=False)
        except FileExistsError:
            return
    os._exit(1)


def execute(
    tasks: Sequence[Task],
    options: AnalysisOptions,
    *,
    client: Any = None,
    retries: int = 2,
    progress: bool = True,
    worker_wait: float = WORKER_WAIT_S,
) -> Iterator[tuple[Task, BatchResult | Exception]]:
    """Run ``tasks`` and yield ``(task, BatchResult or the exception that failed it)`` as each finishes.

    ``client=None`` runs them one by one in this process; otherwise they are submitted to the Dask
    ``client``, GPU-wanting tasks asking for ``resources={"GPU": 1}`` as :func:`task_resources` decides; a cluster
    without a worker after ``worker_wait`` seconds raises ``TimeoutError``.
    Progress on stderr counts models, shards and bytes (a bar on a terminal, lines in a log).
    """
    parts = [p for t in tasks for p in t.parts]
    with _Progress(parts, enabled=progress) as bar:
        outcomes = _in_process(tasks, options) if client is None else _on_cluster(tasks, options, client, retries,
                                                                                   worker_wait)
        for task, outcome in outcomes:
            for part in task.parts:
                bar.advance(part)
            yield task, outcome


def _in_process(tasks: Sequence[Task], options: AnalysisOptions) -> Iterator[tuple[Task, Any]]:
    """One task after another, with BLAS single-threaded like a Dask worker (``OMP_NUM_THREADS=1``): the same
    LAPACK path as on a cluster, and no thread oversubscription on the many small matrices of a batch."""
    with one_blas_thread():
        for task in tasks:
            try:
                outcome = run_task(task, options)
            except Exception as err:  # noqa: BLE001 - one task's failure must not end the scan
                outcome = err
            yield task, outcome


def _on_cluster(tasks: Sequence[Task], options: AnalysisOptions, client: Any, retries: int,
                worker_wait: float) -> Iterator[tuple[Task, Any]]:
    from distributed import as_completed

    if not client.scheduler_info().get("workers"):  # e.g. SLURM jobs still queued: GPU routing needs a worker
        try:
            client.wait_for_workers(1, timeout=worker_wait)
        except TimeoutError as err:
            raise TimeoutError(f"no Dask worker joined within {worker_wait:.0f} s") from err
    workers = client.scheduler_info().get("workers", {})
    n_gpu = sum(w.get("resources", {}).get("GPU", 0) > 0 for w in workers.values())
    run_id = uuid.uuid4().hex[:8]
    by_key: dict[str, Task] = {}
    futures = []
    for i, task in enumerate(tasks):
        key = f"analyze-{run_id}-{i}"
        by_key[key] = task
        futures.append(client.submit(
            run_task, task, options,
            key=key, retries=retries, pure=False,
            resources=task_resources(task, n_gpu, len(workers), requires_gpu=needs_gpu(options)),
        ))
    for future in as_completed(futures):
        try:
            outcome = future.result()
        except Exception as err:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths
            outcome = err
        task = by_key[future.key]
        future.release()
        yield task, outcome


def wants_gpu(options: AnalysisOptions) -> bool:
    """Whether tasks with these options can use a GPU (eigenvalue backend auto/torch/cupy, or the CUDA fit)."""
    return options.esd_backend == "auto" or options.esd_backend.startswith(("cupy", "torch")) \
        or options.fit_backend == "cuda"


def needs_gpu(options: AnalysisOptions) -> bool:
    """Whether tasks with these options cannot run without a GPU (a CuPy eigenvalue backend or the CUDA fit):
    ``engine.run.task_resources(..., requires_gpu=True)`` then keeps them off CPU workers, also small ones."""
    return options.esd_backend.startswith("cupy") or options.fit_backend == "cuda"


GPU_TASK_MIN_BYTES = 64 << 20
"""On a cluster where only some workers have a GPU, tasks reading fewer bytes than this may run on any worker."""


def task_resources(task: Task, gpu_workers: int, workers: int, min_bytes: int | None = None, *,
                   requires_gpu: bool = False) -> dict[str, int] | None:
    """The Dask resources ``task`` asks for on a cluster of ``workers`` workers, ``gpu_workers`` of them with a GPU.

    A GPU-wanting task asks for one ``GPU`` whenever a worker has one (one task per GPU at a time), except on a
    mixed cluster, where tasks below ``min_bytes`` (default ``GPU_TASK_MIN_BYTES``) ask for nothing so that the
    CPU workers take them: CPU workers see no GPU (``CUDA_VISIBLE_DEVICES=""``), so their ``auto`` routes stay on
    the CPU. Every route ``auto`` takes on either kind of worker keeps λ within 1e-6 of LAPACK SVD's;
    ``esd_backend`` records which. ``requires_gpu`` (options that cannot run without a GPU,
    ``needs_gpu``): always ``GPU=1`` when a worker has one, whatever the size.
    """
    if not (task.wants_gpu or requires_gpu) or gpu_workers == 0:
        return None
    if not requires_gpu and gpu_workers < workers \
            and task.nbytes < (GPU_TASK_MIN_BYTES if min_bytes is None else min_bytes):
        return None
    return {"GPU": 1}


class _Progress:
    """Progress over bytes, with model and shard counts, on stderr: a rich bar on a terminal; in a log (stderr not a
    terminal, e.g. a nightly job) a plain line at most every ``LOG_EVERY_S`` seconds and at the end. Disabled: does
    nothing."""

    def __init__(self, tasks: Sequence[Part], *, enabled: bool) -> None:
        self.enabled = enabled and len(tasks) > 0
        self.shards_left: dict[str, int] = {}
        for task in tasks:
            self.shards_left[task.content_hash] = self.shards_left.get(task.content_hash, 0) + 1
        self.n_models, self.n_shards = len(self.shards_left), len(tasks)
        self.models_done = self.shards_done = self.bytes_done = 0
        self.total_bytes = sum(t.nbytes for t in tasks)
        self.bar: Any = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            console = Console(stderr=True)
            self.started = self.logged = time.monotonic()
            if console.is_terminal:
                self.bar = Progress(
                    TextColumn("scan"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                    TextColumn("models {task.fields[models]}  shards {task.fields[shards]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                )
                self.bar.start()
                self.task_id = self.bar.add_task("scan", total=self.total_bytes, **self._fields())
        return self

    def _fields(self) -> dict[str, str]:
        return {"models": f"{self.models_done}/{self.n_models}", "shards": f"{self.shards_done}/{self.n_shards}"}

    def advance(self, task: Part) -> None:
        self.shards_done += 1
        self.bytes_done += task.nbytes
        self.shards_left[task.content_hash] -= 1
        if self.shards_left[task.content_hash] == 0:
            self.models_done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task_id, advance=task.nbytes, **self._fields())
            return
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY_S or self.shards_done == self.n_shards:
            self.logged = now
            self._log_line(now - self.started)

    def _log_line(self, elapsed: float) -> None:
        from rich.filesize import decimal

        done = self.bytes_done / self.total_bytes if self.total_bytes else self.shards_done / self.n_shards
        left = f", ~{elapsed * (1 - done) / done:.0f} s left" if 0 < done < 1 else ""
        print(f"scan: models {self.models_done}/{self.n_models}  shards {self.shards_done}/{self.n_shards}  "
              f"{decimal(self.bytes_done)}/{decimal(self.total_bytes)}  {elapsed:.0f} s{left}", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
