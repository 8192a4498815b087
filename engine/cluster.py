"""Dask clients from the named profiles of ``cluster.yaml``: none, local, local-cuda, slurm, address.

``make_client(profile)`` is a context manager that starts (or connects to) the cluster, prints the dashboard
link, yields a ``distributed.Client`` (``None`` for the in-process profile ``none``) and tears it down after.
The packaged default profiles are ``zooscope/cluster.yaml``; the fields are documented in that file.
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
        cluster = _BUILDERS[kind](fields, workers)
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


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. under taskset or a batch job)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def _local(fields: dict[str, Any], workers: int | None) -> Any:
    from distributed import LocalCluster

    n = workers or _count(fields.get("workers"), available_cores(), "workers")
    return LocalCluster(
        n_workers=n,
        threads_per_worker=_count(fields.get("threads_per_worker"), 1, "threads_per_worker"),
        processes=True,
        memory_limit=fields.get("memory_limit", "auto") or "auto",
        dashboard_address=fields.get("dashboard_address", ":8787"),
    )


def _local_cuda(fields: dict[str, Any], workers: int | None) -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterConfigError(
            "cluster profile kind 'local-cuda' needs dask-cuda (and a CUDA GPU): pip install 'zooscope[gpu]'"
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
    if fields.get("rmm_pool_size"):
        kwargs["rmm_pool_size"] = fields["rmm_pool_size"]
    return LocalCUDACluster(**kwargs)


def _slurm(fields: dict[str, Any], workers: int | None) -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterConfigError(
            "cluster profile kind 'slurm' needs dask-jobqueue: pip install 'zooscope[cluster]'"
        ) from None
    processes = _count(fields.get("processes"), 1, "processes")
    gpus = int(fields.get("gpus") or 0)
    directives = list(fields.get("job_extra_directives") or [])
    worker_args: list[str] = []
    if gpus:
        directives.append(f"--gres=gpu:{gpus}")
        worker_args = ["--resources", f"GPU={max(1, gpus // processes)}"]
    cluster = SLURMCluster(
        queue=fields.get("queue"),
        account=fields.get("account"),
        cores=_count(fields.get("cores"), 1, "cores"),
        processes=processes,
        memory=str(fields.get("memory") or "16GB"),
        walltime=str(fields.get("walltime") or "01:00:00"),
        local_directory=fields.get("local_directory"),
        job_extra_directives=directives,
        job_script_prologue=list(fields.get("job_script_prologue") or []),
        worker_extra_args=worker_args,
        scheduler_options={"dashboard_address": fields.get("dashboard_address", ":8787")},
    )
    if workers:
        cluster.scale(jobs=math.ceil(workers / processes))
    else:
        cluster.scale(jobs=_count(fields.get("jobs"), 1, "jobs"))
    return cluster


_BUILDERS = {"local": _local, "local-cuda": _local_cuda, "slurm": _slurm}
