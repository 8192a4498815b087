"""Scans on a Dask LocalCluster (2 worker processes, shared by the module): same results as in-process,
worker loss, client crash and resume, cluster profiles; the store's commit protocol under a writer killed at
chosen store writes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from zarr.storage import LocalStore

from test_scan import assert_same_store, layers_by_model, write_zoo
from test_store import make_result
from zooscope.engine.cluster import ClusterConfigError, load_profiles, make_client
from zooscope.engine import run as run_module
from zooscope.engine.plan import Part, Task
from zooscope.engine.run import EXIT_MARKER_ENV, EXIT_ON_ENV, task_resources
from zooscope.engine.scan import scan
from zooscope.engine.lock import LOCK_NAME
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
    assert not any(w.get("resources", {}).get("GPU") for w in client.scheduler_info()["workers"].values())
    store = tmp_path / "cluster.zarr"
    report = scan([zoo], store, client=client, progress=False)
    assert (report.n_ok, report.n_error, report.cluster) == (N_MODELS, 0, "client")
    assert_same_store(reference, store)


def test_cluster_scan_equals_in_process_scan_on_large_layers(client, tmp_path):
    """Two models whose layers (side 256-384) OpenBLAS's threads would round differently: scanned on the workers
    (one BLAS thread, one kernel thread each) and in-process (one BLAS thread, the matrices in row blocks over
    every core), the stores are equal bit for bit."""
    from safetensors.numpy import save_file

    zoo = tmp_path / "big"
    zoo.mkdir()
    for seed in range(2):
        rng = np.random.default_rng(seed)
        save_file({"a.weight": rng.standard_t(3, (384, 320)).astype(np.float32),
                   "b.weight": rng.standard_t(3, (320, 300)).astype(np.float32),
                   "conv.weight": rng.standard_t(3, (256, 256, 3, 3)).astype(np.float32)},
                  str(zoo / f"big{seed}.safetensors"))
    scan([zoo], tmp_path / "in-process.zarr", cluster="none", progress=False)
    scan([zoo], tmp_path / "cluster.zarr", client=client, progress=False)
    assert_same_store(tmp_path / "in-process.zarr", tmp_path / "cluster.zarr")


def test_task_resources():
    small, big = (Task((Part("m", "p", "h", None, 0, 1, nbytes, wants_gpu=True),)) for nbytes in (10, 1000))
    assert task_resources(big, gpu_workers=0, workers=4) is None  # no GPU anywhere
    assert task_resources(small, gpu_workers=4, workers=4, min_bytes=100) == {"GPU": 1}  # all GPU: one task each
    assert task_resources(small, gpu_workers=1, workers=4, min_bytes=100) is None  # mixed: CPU workers take it
    assert task_resources(big, gpu_workers=1, workers=4, min_bytes=100) == {"GPU": 1}
    cpu_only = Task((Part("m", "p", "h", None, 0, 1, 1000, wants_gpu=False),))
    assert task_resources(cpu_only, gpu_workers=4, workers=4) is None


def _set_gpu_resource(client, worker: str, amount: int) -> None:
    async def set_resources(dask_worker):
        await dask_worker.set_resources(GPU=amount)

    client.run(set_resources, workers=[worker])
    deadline = time.monotonic() + 10
    while client.scheduler_info()["workers"][worker].get("resources", {}).get("GPU", 0) != amount:
        assert time.monotonic() < deadline, "the scheduler did not see the worker's new resources"
        time.sleep(0.05)


@pytest.mark.parametrize("min_bytes, small_tasks_anywhere", [(1 << 40, True), (0, False)])
def test_mixed_cluster_routes_small_tasks_to_any_worker(client, zoo, reference, tmp_path, monkeypatch, min_bytes,
                                                        small_tasks_anywhere):
    from distributed import get_task_stream

    gpu_worker, cpu_worker = sorted(client.scheduler_info()["workers"])
    monkeypatch.setattr(run_module, "GPU_TASK_MIN_BYTES", min_bytes)
    _set_gpu_resource(client, gpu_worker, 1)  # a pretend GPU: the analysis still runs on the CPU
    try:
        with get_task_stream(client) as stream:
            report = scan([zoo], tmp_path / "mixed.zarr", client=client, progress=False)
    finally:
        _set_gpu_resource(client, gpu_worker, 0)
    assert report.n_ok == N_MODELS
    assert_same_store(reference, tmp_path / "mixed.zarr")
    ran_on = {t["worker"] for t in stream.data if str(t["key"]).startswith("analyze-")}
    assert (cpu_worker in ran_on) == small_tasks_anywhere  # else every task waited for the GPU worker


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
    direct = analyze_path(str(victim), AnalysisOptions(fit_backend="numba"))  # the scan's route
    np.testing.assert_array_equal(layers.loc[layers["model_id"] == "victim", "alpha"].to_numpy(),
                                  direct.layers["alpha"].to_numpy())


def test_client_killed_mid_scan_then_rerun_completes(zoo, reference, tmp_path):
    store = tmp_path / "crash.zarr"
    cmd = [sys.executable, "-m", "zooscope", "scan", str(zoo), "--store", str(store), "--cluster", "none",
           "--commit-seconds", "0", "--no-progress", "--batch-models", "1"]
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


# -- the commit protocol, writer killed at chosen store writes --------------------------------------------------


class Died(Exception):
    """The writer 'died' at the chosen store write."""


class StoreWrites:
    """Counts the writes (set, set_if_not_exists, delete, delete_dir) of zarr's LocalStore; from the ``die_at``-th
    on (1-based; 0 = never) each one raises ``Died`` before touching the disk, as if the process had been killed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, die_at: int = 0) -> None:
        self.die_at, self.ops, self.in_flight, self._lock = die_at, [], 0, threading.Lock()
        for name in ("set", "set_if_not_exists", "delete", "delete_dir"):
            monkeypatch.setattr(LocalStore, name, self._wrap(name, getattr(LocalStore, name)))

    def _wrap(self, name, op):
        async def wrapped(store, key, *args, **kwargs):
            with self._lock:
                self.ops.append((name, key))
                if self.die_at and len(self.ops) >= self.die_at:
                    raise Died(len(self.ops))
                self.in_flight += 1
            try:
                return await op(store, key, *args, **kwargs)
            finally:
                with self._lock:
                    self.in_flight -= 1
        return wrapped

    def settle(self) -> None:
        """Wait for writes that were under way when the writer died (they land, as they may after a SIGKILL)."""
        while self.in_flight:
            time.sleep(0.001)


def _crash_models() -> list[tuple[dict, object]]:
    """Four models whose flushes create the arrays, add a column, widen it (int -> float) and append an error row."""
    rng = np.random.default_rng(3)
    models = [({"model_id": "m0", "content_hash": "h0"}, make_result(rng, 2)),
              ({"model_id": "m1", "content_hash": "h1", "tag": 3}, make_result(rng, 1, extra={"late": [7]})),
              ({"model_id": "m2", "content_hash": "h2", "tag": "x"},
               make_result(rng, 2, extra={"late": [0.5, np.nan]})),
              ({"model_id": "m3", "content_hash": "h3", "error": "unreadable"}, None)]
    for i, (row, _) in enumerate(models):
        row["scanned_at"] = f"2024-01-0{i + 1}"
    return models


CRASH_DRIFT = pd.DataFrame({"model_id": ["m0", "m0"], "checkpoint": [0, 5], "rmsd": [0.0, 0.25]})


def _write_crash_store(path: Path, skip: int = 0, drift: bool = True) -> None:
    """The models from the ``skip``-th on, one commit each, then the drift rows: five commits from scratch."""
    with ZooStore.open(path, "a", params={"p": 1}, flush_every=1) as store:
        for row, result in _crash_models()[skip:]:
            store.append(dict(row), result)
        if drift:
            store.append_drift(CRASH_DRIFT)


def _store_content(path: Path) -> tuple:
    with ZooStore.open(path) as zoo:
        assert zoo.check() == []
        return (zoo.counters, zoo.models().drop(columns="seconds", errors="ignore"), zoo.layers(), zoo.drift(),
                zoo.esds(), [zoo.hist(i) for i in range(zoo.counters["n_hist"])])


def test_writer_killed_around_each_commit_leaves_a_sound_store(tmp_path, monkeypatch):
    """The window behind the flaky client-kill test: a commit once wrote the root zarr.json once per attrs key
    (zarr's ``Attributes.update``), so a writer killed between the counters and the column map left committed
    layer rows without columns ("layers/model_row: column missing"). Kill the writer just before and just after
    every root zarr.json write (store creation and each commit): a reader sees a sound prefix (or no store yet),
    and a rerun from what was committed gives the uninterrupted store."""
    _write_crash_store(tmp_path / "reference.zarr")
    reference = _store_content(tmp_path / "reference.zarr")
    writes = StoreWrites(monkeypatch)
    _write_crash_store(tmp_path / "counted.zarr")
    monkeypatch.undo()
    roots = [i + 1 for i, op in enumerate(writes.ops) if op == ("set", "zarr.json")]
    assert len(roots) == 1 + 1 + 5  # the group, the store attrs, then exactly one root write per commit
    for die_at in sorted({k + d for k in roots for d in (0, 1)}):
        path = tmp_path / f"died-at-{die_at}.zarr"
        writes = StoreWrites(monkeypatch, die_at)
        with pytest.raises(Died):
            _write_crash_store(path)
        writes.settle()
        monkeypatch.undo()
        try:
            reader = ZooStore.open(path)
        except (FileNotFoundError, ValueError):  # killed while creating it: nothing committed, next open finishes
            n_models, n_drift = 0, 0
        else:
            assert reader.check() == [], f"died at store write {die_at}"
            n_models, n_drift = len(reader), reader.counters["n_drift"]
            assert list(reader.models().get("model_id", [])) == [f"m{i}" for i in range(n_models)]
        _write_crash_store(path, skip=n_models, drift=not n_drift)
        got = _store_content(path)
        assert got[0] == reference[0], f"died at store write {die_at}"
        for a, b in zip(got[1:4], reference[1:4]):
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        for a, b in zip(got[4], reference[4]):
            np.testing.assert_array_equal(a, b)
        for (counts, edges), (ref_counts, ref_edges) in zip(got[5], reference[5]):
            np.testing.assert_array_equal(counts, ref_counts)
            np.testing.assert_array_equal(edges, ref_edges)


def test_interrupted_store_creation_is_finished_by_the_next_writer(tmp_path):
    # killed while zarr wrote the first zarr.json: its temporary file lies next to the lock
    path = tmp_path / "tmpfile.zarr"
    path.mkdir()
    (path / f"{LOCK_NAME}.0123.tmp").write_text("{")  # and the dead writer's lock file, half-made
    (path / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")
    with ZooStore.open(path, "a") as store:
        assert store.check() == []
    # a store half-created by a writer that set its attrs one key at a time
    path = tmp_path / "half.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3).update_attributes({"schema_version": 1})
    with pytest.raises(ValueError, match="creation was interrupted"):
        ZooStore.open(path)
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "m0", "content_hash": "h0"}, None)
    with ZooStore.open(path) as zoo:
        assert zoo.check() == [] and list(zoo.models()["model_id"]) == ["m0"]
