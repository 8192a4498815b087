"""Dask clients from the named profiles of ``cluster.yaml``: none, local, local-cuda, slurm, address.

``make_client(profile)`` is a context manager that starts (or connects to) the cluster, prints the dashboard
link, yields a ``distributed.Client`` (``None`` for the in-process profile ``none``) and tears it down after.
The packaged default profiles are ``zooscope/cluster.yaml``; the fields are documented in that file.

``slurm`` jobs with ``gpus: N`` pin one worker per GPU the way dask-jobqueue and dask-cuda compose: the job asks for
``--gres=gpu:N`` and runs ``python -m dask cuda worker`` (dask-jobqueue's ``worker_command``) instead of the plain
worker; dask-cuda starts one worker process per GPU SLURM assigned (its ``CUDA_VISIBLE_DEVICES``), each with that
GPU first in its own ``CUDA_VISIBLE_DEVICES``, named ``<job>-0 .. <job>-(N-1)`` as dask-jobqueue expects of a job of
``processes = N`` workers, and each advertising ``GPU=1``. This holds for N = 1 too: one code path, and the worker
sets up its GPU (CUDA context, CPU affinity, device memory limit) as ``local-cuda`` does. Tested here without SLURM,
on the job script and the cluster's worker spec only: no job is submitted, so sbatch's acceptance of the script,
dask-cuda's worker start-up on a GPU node and the workers' GPU pinning are untested (no SLURM and no GPU here).
``local-cuda`` is untested for the same reason.

``local`` on a machine with GPUs places GPU work explicitly (:func:`local_worker_specs`): one worker per GPU, that
GPU alone in its ``CUDA_VISIBLE_DEVICES`` and advertising ``GPU=1``, and the other cores as CPU workers with
``CUDA_VISIBLE_DEVICES=""``, so their ``backend="auto"`` routes stay on the CPU (no second CUDA context on a GPU).
Tested here by the worker specs for 0, 1 and 8 GPUs (injected) and by a cluster started with one injected GPU.
"""
from __future__ import annotations

import importlib.resources
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from zooscope.kernels.backends import available_cores, describe_device, visible_gpus

KINDS = ("none", "local", "local-cuda", "slurm", "address")


class ClusterConfigError(ValueError):
    """A profile that cannot be built: unknown name or kind, bad field, or a missing optional dependency."""


def load_profiles(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Read the profiles of a cluster YAML file (the packaged ``cluster.yaml`` when ``path`` is None).

    Returns ``{name: fields}``; every profile has a ``kind`` among ``KINDS`` (a missing ``kind`` defaults to the
    profile's name). The profile ``none`` always exists.
    """
    if path is None:
        text = importlib.resources.files("zooscope").joinpath("cluster.yaml").read_text(encoding="utf-8")
        where = "the packaged cluster.yaml"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ClusterConfigError(f"cannot read cluster config {path}: {err.strerror or err}") from err
        where = str(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{where} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{where} must map profile names to settings")
    profiles: dict[str, dict[str, Any]] = {"none": {"kind": "none"}}
    for name, fields in raw.items():
        fields = dict(fields or {})
        fields.setdefault("kind", name)
        if fields["kind"] not in KINDS:
            raise ClusterConfigError(f"{where}: profile {name!r} has kind {fields['kind']!r}; expected one of {KINDS}")
        profiles[str(name)] = fields
    return profiles


def get_profile(profile: str, config: str | os.PathLike | None = None) -> dict[str, Any]:
    """The fields of ``profile`` in ``config`` (the packaged ``cluster.yaml`` when None); unknown names raise."""
    profiles = load_profiles(config)
    if profile not in profiles:
        raise ClusterConfigError(f"unknown cluster profile {profile!r}; available: {', '.join(profiles)}")
    return profiles[profile]


@contextmanager
def make_client(profile: str = "local", *, config: str | os.PathLike | None = None,
                workers: int | None = None) -> Iterator[Any]:
    """Start the cluster of ``profile`` (from ``config`` or the packaged ``cluster.yaml``) and yield its client.

    ``workers`` overrides the profile's worker count. Yields ``None`` for kind ``none`` (run in-process).
    The cluster and client are closed when the ``with`` block ends, also on error.
    """
    fields = get_profile(profile, config)
    if workers is not None and workers < 1:
        raise ClusterConfigError(f"--workers must be at least 1, got {workers}")
    kind = fields["kind"]
    if kind == "none":
        yield None
        return
    from distributed import Client

    if kind == "address":
        if not fields.get("address"):
            raise ClusterConfigError(f"profile {profile!r} (kind address) needs an 'address' field")
        cluster = None
        client = Client(fields["address"])
    else:
        cluster = _start(kind, fields, workers)
        client = Client(cluster)
    try:
        print(f"Dask dashboard ({profile}): {client.dashboard_link}", file=sys.stderr)
        yield client
    finally:
        client.close()
        if cluster is not None:
            # workers idle in native threads (BLAS, Numba) are killed after a grace period; that is expected here
            logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
            cluster.close()


#: Times a cluster whose start failed (e.g. a worker process killed while its nanny started) is started again.
START_RETRIES = 2


def _start(kind: str, fields: dict[str, Any], workers: int | None) -> Any:
    """The cluster of a profile, started again when a worker dies during the start (``Nanny failed to start``)."""
    attempt = 0
    while True:
        try:
            return _BUILDERS[kind](fields, workers)
        except RuntimeError as err:
            if attempt == START_RETRIES or "failed to start" not in str(err):
                raise
            attempt += 1
            print(f"Dask cluster start failed ({err}); starting it again", file=sys.stderr)


def _count(value: Any, default: int, name: str) -> int:
    if value in (None, "auto"):
        return default
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ClusterConfigError(f"{name} must be a positive integer or 'auto', got {value!r}") from None
    if count < 1:
        raise ClusterConfigError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return count


def local_worker_specs(fields: dict[str, Any], workers: int | None, gpus: list[str],
                       cores: int) -> dict[str, dict[str, Any]]:
    """The worker processes of a ``local`` profile: ``{name: Nanny options}`` (``nthreads``, ``memory_limit``,
    ``resources``, ``env``).

    ``gpus``: the machine's visible GPUs as ``CUDA_VISIBLE_DEVICES`` entries (:func:`~zooscope.kernels.backends.
    visible_gpus`); ``cores``: CPU cores available. ``workers`` (or the profile's ``workers``, default the larger of
    ``cores`` and the GPU count) counts all worker processes; the profile's ``gpus`` (``auto`` = every visible GPU,
    or a number, 0 = none) how many of them own a GPU: ``gpu-<i>`` with ``CUDA_VISIBLE_DEVICES=<that GPU>`` and
    ``resources={"GPU": 1}``. The rest are ``cpu-<i>`` with ``CUDA_VISIBLE_DEVICES=""``: no GPU library in them
    can reach a device. Each worker's Numba kernels use its share of the cores (``NUMBA_NUM_THREADS``), so that
    the workers' parallel loops do not oversubscribe the machine.
    """
    wanted = fields.get("gpus", "auto")
    if wanted in (None, "auto"):
        n_gpu = len(gpus)
    elif isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 0:
        if wanted > len(gpus):
            raise ClusterConfigError(f"profile asks for gpus: {wanted} but this machine shows {len(gpus)} GPU(s)")
        n_gpu = wanted
    else:
        raise ClusterConfigError(f"gpus must be a non-negative integer or 'auto', got {wanted!r}")
    total = workers or _count(fields.get("workers"), max(cores, n_gpu), "workers")
    n_gpu = min(n_gpu, total)
    threads = _count(fields.get("threads_per_worker"), 1, "threads_per_worker")
    memory = fields.get("memory_limit", "auto") or "auto"
    if memory == "auto":  # as LocalCluster: the system's memory split evenly between the worker processes
        from distributed.worker_memory import parse_memory_limit

        memory = parse_memory_limit("auto", 1, total, logger=logging.getLogger("distributed.worker_memory"))
    numba = {"NUMBA_NUM_THREADS": str(max(1, cores // total))}
    specs = {f"gpu-{i}": {"nthreads": threads, "memory_limit": memory, "resources": {"GPU": 1},
                          "env": {"CUDA_VISIBLE_DEVICES": gpus[i], **numba}} for i in range(n_gpu)}
    specs.update({f"cpu-{i}": {"nthreads": threads, "memory_limit": memory, "resources": {},
                               "env": {"CUDA_VISIBLE_DEVICES": "", **numba}} for i in range(total - n_gpu)})
    return specs


def _local(fields: dict[str, Any], workers: int | None, gpus: list[str] | None = None) -> Any:
    """A ``SpecCluster`` of local worker processes laid out by :func:`local_worker_specs` (``gpus``: the visible
    GPUs, detected when None), with LocalCluster's scheduler settings (listening on 127.0.0.1)."""
    from distributed import Nanny, Scheduler, SpecCluster

    specs = local_worker_specs(fields, workers, visible_gpus() if gpus is None else gpus, available_cores())
    dashboard = fields.get("dashboard_address", ":8787")
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": dashboard is not None,
                                               "dashboard_address": dashboard}}
    common = {"host": "127.0.0.1", "dashboard": False, "silence_logs": logging.WARN}
    return SpecCluster(scheduler=scheduler, silence_logs=logging.WARN,
                       workers={name: {"cls": Nanny, "options": {**common, **spec}} for name, spec in specs.items()})


def describe_compute(client: Any = None) -> str:
    """What computes, for people: ``"in-process: <device>"`` without a client, else one line per kind of worker
    with its count and device (:func:`~zooscope.kernels.backends.describe_device`, asked on each worker) and
    resources, e.g. ``"1 worker(s) GPU=1: GPU NVIDIA H100 ...; 15 worker(s): CPU ...; no GPU: ..."``."""
    if client is None:
        return f"in-process: {describe_device()}"
    devices = client.run(describe_device)
    info = client.scheduler_info().get("workers", {})
    counts: dict[tuple[str, str], int] = {}
    for address, device in devices.items():
        resources = ",".join(f"{k}={v:g}" for k, v in sorted(info.get(address, {}).get("resources", {}).items()))
        counts[(resources, device)] = counts.get((resources, device), 0) + 1
    return "; ".join(f"{n} worker(s){' ' + res if res else ''}: {device}"
                     for (res, device), n in sorted(counts.items(), key=lambda kv: (kv[0][0] == "", kv[0])))


def _local_cuda(fields: dict[str, Any], workers: int | None) -> Any:
    if fields.get("rmm_pool_size"):
        raise ClusterConfigError(
            "rmm_pool_size is not supported: zooscope allocates through CuPy's and torch's own pools (released after "
            "each stack), never through RMM, so an RMM pool would only reserve GPU memory nobody uses; remove it")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterConfigError(
            "cluster profile kind 'local-cuda' needs dask-cuda (and a CUDA GPU): pip install 'zooscope[gpu-cuda12]' "
            "or 'zooscope[gpu-cuda13]'"
        ) from None
    kwargs: dict[str, Any] = {
        "threads_per_worker": _count(fields.get("threads_per_worker"), 1, "threads_per_worker"),
        "memory_limit": fields.get("memory_limit", "auto") or "auto",
        "dashboard_address": fields.get("dashboard_address", ":8787"),
        "resources": {"GPU": 1},
    }
    if fields.get("devices") is not None:
        kwargs["CUDA_VISIBLE_DEVICES"] = str(fields["devices"])
    n = workers or (None if fields.get("workers") in (None, "auto") else _count(fields["workers"], 1, "workers"))
    if n is not None:
        kwargs["n_workers"] = n
    return LocalCUDACluster(**kwargs)


#: the dask-cuda worker command that jobs with GPUs run (``python -m dask cuda worker``, dask's CLI entry point)
CUDA_WORKER_COMMAND = "dask cuda worker"


def slurm_layout(fields: dict[str, Any]) -> tuple[int, int]:
    """(worker processes per job, GPUs per job) of a ``slurm`` profile.

    With ``gpus`` >= 1 every job runs one worker per GPU, so ``processes`` is the GPU count (a profile that sets
    it otherwise is refused); without GPUs it is the profile's ``processes`` (default 1).
    """
    gpus = fields.get("gpus") or 0
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise ClusterConfigError(f"gpus must be a non-negative integer, got {gpus!r}")
    if not gpus:
        return _count(fields.get("processes"), 1, "processes"), 0
    if fields.get("processes") not in (None, "auto", gpus):
        raise ClusterConfigError(f"a slurm job with gpus: {gpus} runs one worker per GPU; set processes to {gpus} "
                                 f"or leave it out (got processes: {fields['processes']!r})")
    return gpus, gpus


def slurm_cluster(fields: dict[str, Any]) -> Any:
    """The dask-jobqueue ``SLURMCluster`` of a ``slurm`` profile, not yet scaled (no job submitted).

    CPU jobs run ``processes`` plain Dask workers, with ``CUDA_VISIBLE_DEVICES=""`` (no GPU reachable). Jobs with
    ``gpus: N`` ask SLURM for ``--gres=gpu:N`` and run dask-cuda's worker, which starts one worker process per GPU
    SLURM assigned to the job (each with its own ``CUDA_VISIBLE_DEVICES``, named like dask-jobqueue's N-worker
    groups), each advertising ``GPU=1`` and getting cores/N threads and memory/N.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterConfigError(
            "cluster profile kind 'slurm' needs dask-jobqueue: pip install 'zooscope[cluster]'"
        ) from None
    processes, gpus = slurm_layout(fields)
    cores = _count(fields.get("cores"), 1, "cores")
    if cores < processes:
        raise ClusterConfigError(f"a slurm job of {processes} worker processes needs at least {processes} cores, "
                                 f"got cores: {cores}")
    directives = list(fields.get("job_extra_directives") or [])
    prologue = list(fields.get("job_script_prologue") or [])
    gpu_options: dict[str, Any] = {}
    if gpus:
        directives.append(f"--gres=gpu:{gpus}")
        gpu_options = {"worker_command": CUDA_WORKER_COMMAND, "worker_extra_args": ["--resources", "GPU=1"]}
    else:  # a CPU job on a GPU node (no gres, devices not fenced by cgroups) must not reach its GPUs either
        prologue.append('export CUDA_VISIBLE_DEVICES=""')
    return SLURMCluster(
        queue=fields.get("queue"),
        account=fields.get("account"),
        cores=cores,
        processes=processes,
        memory=str(fields.get("memory") or "16GB"),
        walltime=str(fields.get("walltime") or "01:00:00"),
        local_directory=fields.get("local_directory"),
        job_extra_directives=directives,
        job_script_prologue=prologue,
        scheduler_options={"dashboard_address": fields.get("dashboard_address", ":8787")},
        **gpu_options,
    )


def _slurm(fields: dict[str, Any], workers: int | None) -> Any:
    processes, _ = slurm_layout(fields)
    cluster = slurm_cluster(fields)
    jobs = math.ceil(workers / processes) if workers else _count(fields.get("jobs"), 1, "jobs")
    cluster.scale(jobs=jobs)
    return cluster


_BUILDERS = {"local": _local, "local-cuda": _local_cuda, "slurm": _slurm}
