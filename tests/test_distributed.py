"""Scans on a Dask LocalCluster (2 worker processes, shared by the module): same results as in-process,
worker loss, client crash and resume, cluster profiles."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_scan import assert_same_store, layers_by_model, write_zoo
from zooscope.engine.cluster import ClusterConfigError, load_profiles, make_client
from zooscope.engine.run import EXIT_MARKER_ENV, EXIT_ON_ENV, has_gpu_workers
from zooscope.engine.scan import scan
from zooscope.engine.store import ZooStore
from zooscope.pipelines.analyze import AnalysisOptions, analyze_path

ROOT = Path(__file__).resolve().parents[1]
N_MODELS = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def client(workdir):
    """A 2-process LocalCluster built from a profile file; its workers carry the test exit hook's settings."""
    config = workdir / "cluster.yaml"
    config.write_text(yaml.safe_dump({"ci": {"kind": "local", "workers": 2, "threads_per_worker": 1,
                                             "memory_limit": "2GiB", "dashboard_address": ":0"}}))
    hook = {EXIT_ON_ENV: "victim", EXIT_MARKER_ENV: str(workdir / "victim-killed-once")}
    saved = {k: os.environ.get(k) for k in hook}
    os.environ.update(hook)  # worker processes (and their restarts) inherit the environment at spawn
    try:
        with make_client("ci", config=config) as c:
            yield c
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def zoo(workdir) -> Path:
    write_zoo(workdir / "zoo", n=N_MODELS)
    return workdir / "zoo"


@pytest.fixture(scope="module")
def reference(workdir, zoo) -> Path:
    """The zoo scanned in-process, uninterrupted, unsharded."""
    store = workdir / "reference.zarr"
    assert scan([zoo], store, cluster="none", progress=False).n_ok == N_MODELS
    return store


def test_cluster_scan_equals_in_process_scan(client, zoo, reference, tmp_path):
    assert not has_gpu_workers(client)
    store = tmp_path / "cluster.zarr"
    report = scan([zoo], store, client=client, progress=False)
    assert (report.n_ok, report.n_error, report.cluster) == (N_MODELS, 0, "client")
    assert_same_store(reference, store)


def test_sharded_cluster_scan_equals_unsharded_in_process_scan(client, zoo, reference, tmp_path):
    store = tmp_path / "sharded.zarr"
    report = scan([zoo], store, client=client, shard_bytes=3000, progress=False)
    assert report.n_ok == N_MODELS
    assert_same_store(reference, store)


def test_worker_killed_mid_task_is_retried(client, workdir, tmp_path):
    paths = write_zoo(tmp_path / "zoo", n=3, seed=10)
    victim = paths[1].with_name("victim.safetensors")
    paths[1].rename(victim)
    marker = workdir / "victim-killed-once"
    assert not marker.exists()
    store = tmp_path / "killed.zarr"
    report = scan([tmp_path / "zoo"], store, client=client, progress=False)
    assert marker.exists()  # a worker really did exit in the middle of the victim's task
    assert (report.n_ok, report.n_error) == (3, 0)
    with ZooStore.open(str(store)) as zoo:
        assert zoo.check() == []
    layers = layers_by_model(store)
    direct = analyze_path(str(victim), AnalysisOptions())
    np.testing.assert_array_equal(layers.loc[layers["model_id"] == "victim", "alpha"].to_numpy(),
                                  direct.layers["alpha"].to_numpy())


def test_client_killed_mid_scan_then_rerun_completes(zoo, reference, tmp_path):
    store = tmp_path / "crash.zarr"
    cmd = [sys.executable, "-m", "zooscope", "scan", str(zoo), "--store", str(store), "--cluster", "none",
           "--commit-seconds", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = 0
    deadline = time.monotonic() + 60
    try:
        while committed == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
            committed = _committed_models(store)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert committed >= 1, proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL
    remaining = _committed_models(store)
    assert 1 <= remaining < N_MODELS, "the scan finished before it could be killed; make the zoo slower"
    with ZooStore.open(str(store)) as zoo_store:
        assert zoo_store.check() == []
    with pytest.warns(RuntimeWarning, match="stale lock"):  # the dead writer's lock does not block
        report = scan([zoo], store, cluster="none", progress=False)
    assert (report.n_ok, report.n_skipped) == (N_MODELS - remaining, remaining)
    assert_same_store(reference, store)


def _committed_models(store: Path) -> int:
    try:
        with ZooStore.open(str(store)) as zoo:
            return len(zoo.models())
    except Exception:  # not created yet, or mid-creation
        return 0


def test_cluster_profiles():
    packaged = load_profiles()
    assert (ROOT / "cluster.yaml").read_text() == (ROOT / "zooscope" / "cluster.yaml").read_text()
    assert packaged == load_profiles(ROOT / "cluster.yaml")
    assert {p["kind"] for p in packaged.values()} == {"none", "local", "local-cuda", "slurm", "address"}
    with make_client("none") as client:
        assert client is None
    with pytest.raises(ClusterConfigError, match="unknown cluster profile 'nope'"):
        with make_client("nope"):
            pass
    for kind, module in (("local-cuda", "dask_cuda"), ("slurm", "dask_jobqueue")):
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(ClusterConfigError, match=module.replace("_", "-")):
                with make_client(kind):
                    pass
