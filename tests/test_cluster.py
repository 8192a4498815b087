"""Cluster layouts without the hardware: where GPU work may run on a local machine with 0, 1 or 8 GPUs (GPU count
injected), and the slurm profile's job scripts and worker layout that dask-jobqueue would submit (no SLURM)."""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import yaml
from dask.utils import parse_bytes

from zooscope.engine import cluster as cluster_mod
from zooscope.engine.cluster import (ClusterConfigError, describe_compute, load_profiles, local_worker_specs,
                                     make_client, slurm_cluster, slurm_layout)
from zooscope.engine.run import task_resources
from zooscope.engine.run import needs_gpu, wants_gpu
from zooscope.pipelines.analyze import AnalysisOptions

LOCAL = {"kind": "local", "threads_per_worker": 1, "memory_limit": "1GiB"}


def _layout(specs):
    """{name: (GPU resource, CUDA_VISIBLE_DEVICES)} of worker specs."""
    return {name: (spec["resources"].get("GPU", 0), spec["env"]["CUDA_VISIBLE_DEVICES"])
            for name, spec in specs.items()}


def test_local_layout_without_gpu_is_cpu_workers_that_see_no_gpu():
    specs = local_worker_specs(LOCAL, None, gpus=[], cores=4)
    assert _layout(specs) == {f"cpu-{i}": (0, "") for i in range(4)}
    assert {s["nthreads"] for s in specs.values()} == {1}
    # each worker's Numba loops get its share of the cores
    assert {s["env"]["NUMBA_NUM_THREADS"] for s in specs.values()} == {"1"}
    assert {s["env"]["NUMBA_NUM_THREADS"] for s in local_worker_specs(LOCAL, 2, gpus=[], cores=16).values()} == {"8"}
    assert {parse_bytes(s["memory_limit"]) for s in specs.values()} == {parse_bytes("1GiB")}
    from distributed.system import MEMORY_LIMIT  # memory_limit auto: the system's memory split like LocalCluster's

    auto = local_worker_specs({"kind": "local"}, None, gpus=["0"], cores=4)
    assert [s["memory_limit"] for s in auto.values()] == [pytest.approx(MEMORY_LIMIT / 4, rel=1e-3)] * 4


def test_local_layout_with_one_gpu_has_one_gpu_worker_and_hides_the_gpu_from_the_others():
    assert _layout(local_worker_specs(LOCAL, None, gpus=["0"], cores=4)) == {
        "gpu-0": (1, "0"), "cpu-0": (0, ""), "cpu-1": (0, ""), "cpu-2": (0, "")}
    # this process's own CUDA_VISIBLE_DEVICES entries (here GPU 3, by UUID) are what the GPU worker gets
    assert _layout(local_worker_specs(LOCAL, 2, gpus=["GPU-3f2a"], cores=16)) == {"gpu-0": (1, "GPU-3f2a"),
                                                                                 "cpu-0": (0, "")}


def test_local_layout_with_eight_gpus():
    gpus = [str(i) for i in range(8)]
    specs = local_worker_specs(LOCAL, None, gpus=gpus, cores=16)
    assert _layout(specs) == {**{f"gpu-{i}": (1, str(i)) for i in range(8)}, **{f"cpu-{i}": (0, "") for i in range(8)}}
    # fewer cores than GPUs: still one worker per GPU; --workers 2: two of them; gpus: 0: CPU workers only
    assert _layout(local_worker_specs(LOCAL, None, gpus=gpus, cores=4)) == {f"gpu-{i}": (1, str(i)) for i in range(8)}
    assert _layout(local_worker_specs(LOCAL, 2, gpus=gpus, cores=16)) == {"gpu-0": (1, "0"), "gpu-1": (1, "1")}
    assert _layout(local_worker_specs({**LOCAL, "gpus": 0}, None, gpus=gpus, cores=3)) == {
        f"cpu-{i}": (0, "") for i in range(3)}
    assert _layout(local_worker_specs({**LOCAL, "gpus": 2, "workers": 3}, None, gpus=gpus, cores=16)) == {
        "gpu-0": (1, "0"), "gpu-1": (1, "1"), "cpu-0": (0, "")}


@pytest.mark.parametrize("gpus, message", [(9, "gpus: 9 but this machine shows 8"), (-1, "non-negative"),
                                           ("all", "non-negative")])
def test_bad_local_gpu_counts_are_refused(gpus, message):
    with pytest.raises(ClusterConfigError, match=message):
        local_worker_specs({**LOCAL, "gpus": gpus}, None, gpus=[str(i) for i in range(8)], cores=16)


@pytest.mark.parametrize("n_gpus", [0, 1, 8])
def test_task_resources_on_local_layouts(n_gpus):
    """GPU-wanting tasks go to GPU workers (one per GPU at a time); small ones may take a CPU worker, where they
    route to the CPU; tasks that cannot run without a GPU (CuPy backend, CUDA fit) always ask for one."""
    specs = local_worker_specs(LOCAL, None, gpus=[str(i) for i in range(n_gpus)], cores=16)
    gpu_workers = sum(s["resources"].get("GPU", 0) for s in specs.values())
    assert gpu_workers == n_gpus
    big, small = (SimpleNamespace(wants_gpu=True, nbytes=n) for n in (1 << 30, 1 << 20))
    cpu_task = SimpleNamespace(wants_gpu=False, nbytes=1 << 30)
    gpu = None if n_gpus == 0 else {"GPU": 1}
    assert task_resources(big, gpu_workers, len(specs)) == gpu
    assert task_resources(small, gpu_workers, len(specs)) is None  # mixed cluster: any worker
    assert task_resources(small, gpu_workers, len(specs), requires_gpu=True) == gpu
    assert task_resources(cpu_task, gpu_workers, len(specs)) is None


def test_which_options_want_or_need_a_gpu():
    assert wants_gpu(AnalysisOptions()) and not needs_gpu(AnalysisOptions())  # auto: GPU if the worker has one
    assert needs_gpu(AnalysisOptions(esd_backend="cupy-gram-checked"))
    assert needs_gpu(AnalysisOptions(fit_backend="cuda"))
    torch_route = AnalysisOptions(esd_backend="torch-svd")  # torch runs on CPU workers too
    assert wants_gpu(torch_route) and not needs_gpu(torch_route)
    assert not wants_gpu(AnalysisOptions(esd_backend="scipy-gesdd"))


def test_local_cluster_with_an_injected_gpu_pins_it_to_one_worker(tmp_path, monkeypatch):
    """The `local` profile started for real (2 processes) as it would be on a 1-GPU machine: the GPU worker's
    CUDA_VISIBLE_DEVICES names the GPU, the CPU worker's hides every GPU, and describe_compute asks each worker."""
    monkeypatch.setattr(cluster_mod, "visible_gpus", lambda: ["0"])
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"box": {**LOCAL, "workers": 2, "dashboard_address": ":0"}}))
    with make_client("box", config=config) as client:
        workers = client.scheduler_info()["workers"]
        assert sorted((w["name"], w["resources"].get("GPU", 0)) for w in workers.values()) == [("cpu-0", 0),
                                                                                               ("gpu-0", 1)]
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        by_name = {w["name"]: seen[address] for address, w in workers.items()}
        assert by_name == {"gpu-0": "0", "cpu-0": ""}
        described = describe_compute(client)
    assert described.startswith("1 worker(s) GPU=1: ")  # GPU workers first
    assert "1 worker(s): CPU" in described and "CUDA_VISIBLE_DEVICES='' hides every GPU" in described
    assert describe_compute(None).startswith("in-process: ")


def test_rmm_pool_is_refused():
    with pytest.raises(ClusterConfigError, match="rmm_pool_size is not supported"):
        cluster_mod._local_cuda({"kind": "local-cuda", "rmm_pool_size": "20GiB"}, None)
    assert "rmm_pool_size" not in load_profiles()["local-cuda"]


try:
    from dask_jobqueue import SLURMCluster
except ImportError:  # the local-layout tests above still run
    SLURMCluster = None
requires_jobqueue = pytest.mark.skipif(SLURMCluster is None, reason="needs dask-jobqueue (zooscope[cluster])")


def worker_line(script: str) -> str:
    """The job script's worker command line (the one that runs python -m ...)."""
    lines = [line for line in script.splitlines() if " -m " in line]
    assert len(lines) == 1, script
    return lines[0]


def option(line: str, name: str) -> str | None:
    found = re.search(rf" {name} (\S+)", line)
    return found.group(1) if found else None


@requires_jobqueue
def test_gpu_job_runs_one_dask_cuda_worker_per_gpu():
    fields = {"cores": 16, "memory": "64GB", "gpus": 4, "dashboard_address": ":0",
              "job_extra_directives": ["--constraint=h100"]}
    with slurm_cluster(fields) as cluster:
        script = cluster.job_script()
        group = cluster.new_spec.get("group")
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "--gres=gpu:4" in directives and "--constraint=h100" in directives
    assert "--cpus-per-task=16" in directives
    line = worker_line(script)
    assert " -m dask cuda worker " in line  # dask-cuda's worker, through dask's CLI
    assert option(line, "--resources") == "GPU=1" and "CUDA_VISIBLE_DEVICES" not in script  # SLURM's own
    assert option(line, "--nthreads") == "4"  # 16 cores over 4 GPU workers
    assert parse_bytes(option(line, "--memory-limit")) == pytest.approx(parse_bytes("64GB") / 4, rel=0.01)
    assert "--nworkers" not in line and "--nanny" not in line  # dask-cuda starts one nanny per GPU itself
    # the cluster expects 4 workers per job, named <job>-0 .. <job>-3 as dask-cuda names them
    assert group == ["-0", "-1", "-2", "-3"]
    assert slurm_layout(fields) == (4, 4)


@requires_jobqueue
def test_single_gpu_job_and_packaged_profile():
    packaged = load_profiles()["slurm"]
    with slurm_cluster({**packaged, "dashboard_address": ":0"}) as cluster:
        script = cluster.job_script()
        group = cluster.new_spec.get("group")
    line = worker_line(script)
    assert f"#SBATCH --gres=gpu:{packaged['gpus']}" in script and " -m dask cuda worker " in line
    assert option(line, "--resources") == "GPU=1"
    assert option(line, "--nthreads") == str(packaged["cores"] // packaged["gpus"])
    assert packaged["gpus"] == 1 and group is None  # one worker per job: no group


@requires_jobqueue
def test_cpu_job_keeps_plain_workers():
    fields = {"cores": 8, "processes": 2, "memory": "8GB", "gpus": 0, "dashboard_address": ":0"}
    with slurm_cluster(fields) as cluster:
        script = cluster.job_script()
        group = cluster.new_spec.get("group")
    line = worker_line(script)
    assert "--gres" not in script and "--resources" not in line
    assert script.index('export CUDA_VISIBLE_DEVICES=""') < script.index(line)  # CPU workers see no GPU
    assert " -m distributed.cli.dask_worker " in line
    assert option(line, "--nworkers") == "2" and option(line, "--nthreads") == "4"
    assert group == ["-0", "-1"]
    assert slurm_layout({"cores": 4}) == (1, 0)


@pytest.mark.parametrize("fields, message", [
    ({"gpus": 4, "processes": 2}, "one worker per GPU; set processes to 4"),
    ({"gpus": -1}, "gpus must be a non-negative integer"),
    ({"gpus": "two"}, "gpus must be a non-negative integer"),
])
def test_bad_gpu_layouts_are_refused(fields, message):
    with pytest.raises(ClusterConfigError, match=message):
        slurm_layout(fields)


@requires_jobqueue
def test_too_few_cores_for_the_gpu_workers_is_refused():
    with pytest.raises(ClusterConfigError, match="needs at least 4 cores"):
        slurm_cluster({"cores": 2, "gpus": 4})


@requires_jobqueue
def test_workers_option_rounds_up_to_whole_gpu_jobs(tmp_path, monkeypatch):
    """``--workers N`` on a GPU profile counts GPU workers: jobs = ceil(N / gpus); no job is submitted here."""
    calls: list[tuple] = []
    monkeypatch.setattr(SLURMCluster, "scale", lambda self, n=None, jobs=0, **kw: calls.append((n, jobs)))
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"gpu": {"kind": "slurm", "cores": 8, "memory": "32GB", "gpus": 4, "jobs": 3,
                                              "dashboard_address": ":0"}}))
    with make_client("gpu", config=config, workers=6) as client:
        assert client.cluster.new_spec["options"]["worker_extra_args"] == ["--resources", "GPU=1"]
    with make_client("gpu", config=config):
        pass
    assert [call for call in calls if call != (0, 0)] == [(None, 2), (None, 3)]  # (0, 0): scale down at close


def test_a_cluster_whose_worker_dies_while_starting_is_started_again(monkeypatch, capsys):
    from zooscope.engine import cluster as cluster_module

    calls = []

    def flaky(fields, workers):
        calls.append(workers)
        if len(calls) < 3:
            raise RuntimeError("Nanny failed to start.")
        return "cluster"

    monkeypatch.setitem(cluster_module._BUILDERS, "local", flaky)
    assert cluster_module._start("local", {}, 2) == "cluster" and calls == [2, 2, 2]
    assert capsys.readouterr().err.count("starting it again") == 2
    calls.clear()

    def broken(fields, workers):
        calls.append(workers)
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setitem(cluster_module._BUILDERS, "local", broken)
    with pytest.raises(RuntimeError, match="failed to start"):
        cluster_module._start("local", {}, 2)
    assert len(calls) == cluster_module.START_RETRIES + 1
    monkeypatch.setitem(cluster_module._BUILDERS, "local", lambda f, w: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.raises(RuntimeError, match="bad"):  # other errors are not retried
        cluster_module._start("local", {}, 2)
