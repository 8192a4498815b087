"""The slurm profile without SLURM: the job scripts and worker layout that dask-jobqueue would submit."""
from __future__ import annotations

import re

import pytest
import yaml
from dask.utils import parse_bytes

from zooscope.engine.cluster import ClusterConfigError, load_profiles, make_client, slurm_cluster, slurm_layout

SLURMCluster = pytest.importorskip("dask_jobqueue").SLURMCluster


def worker_line(script: str) -> str:
    """The job script's worker command line (the one that runs python -m ...)."""
    lines = [line for line in script.splitlines() if " -m " in line]
    assert len(lines) == 1, script
    return lines[0]


def option(line: str, name: str) -> str | None:
    found = re.search(rf" {name} (\S+)", line)
    return found.group(1) if found else None


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
    assert option(line, "--resources") == "GPU=1"
    assert option(line, "--nthreads") == "4"  # 16 cores over 4 GPU workers
    assert parse_bytes(option(line, "--memory-limit")) == pytest.approx(parse_bytes("64GB") / 4, rel=0.01)
    assert "--nworkers" not in line and "--nanny" not in line  # dask-cuda starts one nanny per GPU itself
    # the cluster expects 4 workers per job, named <job>-0 .. <job>-3 as dask-cuda names them
    assert group == ["-0", "-1", "-2", "-3"]
    assert slurm_layout(fields) == (4, 4)


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


def test_cpu_job_keeps_plain_workers():
    fields = {"cores": 8, "processes": 2, "memory": "8GB", "gpus": 0, "dashboard_address": ":0"}
    with slurm_cluster(fields) as cluster:
        script = cluster.job_script()
        group = cluster.new_spec.get("group")
    line = worker_line(script)
    assert "--gres" not in script and "--resources" not in line
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


def test_too_few_cores_for_the_gpu_workers_is_refused():
    with pytest.raises(ClusterConfigError, match="needs at least 4 cores"):
        slurm_cluster({"cores": 2, "gpus": 4})


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
