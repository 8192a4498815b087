"""Eigenvalue backends against LAPACK singular values, routing, and singular-value statistics."""
import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
from conftest import requires_cupy, requires_torch_cuda

from zooscope.kernels import backends, esd
from zooscope.kernels.backends import BackendUnavailable, cupy_available, torch_cuda_available
from zooscope.kernels.esd import BACKENDS, Route, RoutingTable, eigenvalues, resolve_backend, singular_value_stats

GPU_ONLY = {"cupy-svd", "cupy-gram-eigh", "cupy-gram-checked"}
CPU_BACKENDS = [b for b in BACKENDS if b not in GPU_ONLY]
SVD_BACKENDS = [b for b in CPU_BACKENDS if not esd.is_gram(b)]


def _stacks():
    rng = np.random.default_rng(42)
    return {
        "gauss-tall": rng.standard_normal((4, 60, 25)),
        "gauss-wide": rng.standard_normal((3, 20, 45)).astype(np.float32),
        "student-t-square": rng.standard_t(2.5, size=(5, 32, 32)),
        "student-t-conv": rng.standard_t(3.0, size=(9, 48, 16)) / np.sqrt(2),
    }


STACKS = _stacks()


def _reference(stack):
    """λ of WᵀW per matrix: squared LAPACK fp64 singular values, ascending."""
    return np.stack([np.sort(scipy.linalg.svdvals(w.astype(np.float64)) ** 2) for w in stack])


def _rel_err(got, ref):
    return np.max(np.abs(got - ref)) / np.max(ref)


@pytest.mark.parametrize("name", sorted(STACKS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_backends_match_lapack(backend, name):
    stack = STACKS[name]
    got = eigenvalues(stack, backend=backend, precision="fp64")
    assert got.shape == (stack.shape[0], min(stack.shape[1:]))
    assert got.dtype == np.float64
    assert np.all(np.diff(got, axis=1) >= 0) and np.all(got >= 0)
    assert _rel_err(got, _reference(stack)) < 1e-10


@pytest.mark.parametrize("name", sorted(STACKS))
@pytest.mark.parametrize("backend", SVD_BACKENDS)
def test_fp32_svd_within_1e4(backend, name):
    stack = STACKS[name]
    got = eigenvalues(stack, backend=backend, precision="fp32")
    assert got.dtype == np.float64
    assert _rel_err(got, _reference(stack)) < 1e-4


def test_scipy_gesdd_is_weightwatchers_exact_path():
    stack = STACKS["student-t-conv"]
    ww = np.stack([np.sort(scipy.linalg.svd(w, compute_uv=False)) ** 2 for w in stack])
    np.testing.assert_array_equal(eigenvalues(stack, backend="scipy-gesdd"), ww)


@pytest.mark.parametrize("backend", ["numpy-gram-eigh", "torch-gram-eigh", "cupy-gram-eigh"])
def test_gram_fp32_is_refused(backend):
    with pytest.raises(ValueError, match="fp64-only"):
        eigenvalues(STACKS["gauss-tall"], backend=backend, precision="fp32")


def test_backends_agree_with_each_other():
    stack = STACKS["student-t-square"]
    results = [eigenvalues(stack, backend=b) for b in CPU_BACKENDS]
    for other in results[1:]:
        assert _rel_err(other, results[0]) < 1e-10


def test_chunking_gives_the_same_answer(monkeypatch):
    stack = STACKS["student-t-conv"]
    whole = eigenvalues(stack, backend="numpy-gram-eigh")
    monkeypatch.setattr(esd, "CHUNK_BYTES", 8 * 48 * 16 * 2)  # two matrices per chunk
    np.testing.assert_array_equal(eigenvalues(stack, backend="numpy-gram-eigh"), whole)


def test_gram_eigenvalues_are_clipped_at_zero():
    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((2, 40, 3)) @ rng.standard_normal((2, 3, 30))  # rank 3 of 30
    got = eigenvalues(low_rank, backend="numpy-gram-eigh")
    assert np.all(got >= 0)
    assert _rel_err(got, _reference(low_rank)) < 1e-10


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(B, N, M\)"):
        eigenvalues(np.ones((4, 4)))
    with pytest.raises(ValueError, match="unknown eigenvalue backend"):
        eigenvalues(np.ones((1, 4, 4)), backend="lapack")
    with pytest.raises(ValueError, match="precision"):
        eigenvalues(np.ones((1, 4, 4)), precision="fp16")


@pytest.mark.skipif(cupy_available(), reason="CuPy is available here")
@pytest.mark.parametrize("backend", sorted(GPU_ONLY))
def test_cupy_backends_unavailable_without_gpu(backend):
    with pytest.raises(BackendUnavailable):
        eigenvalues(STACKS["gauss-tall"], backend=backend)


GPU_PARAMS = [pytest.param(b, marks=requires_cupy if b.startswith("cupy") else requires_torch_cuda)
              for b in BACKENDS if b.startswith(("cupy", "torch"))]


@pytest.mark.parametrize("backend", GPU_PARAMS)
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_gpu_backends_match_lapack(backend, precision):
    if precision == "fp32" and esd.is_gram(backend):
        pytest.skip("gram routes are fp64-only")
    stack = STACKS["student-t-conv"]
    tol = 1e-10 if precision == "fp64" else 1e-4
    assert _rel_err(eigenvalues(stack, backend=backend, precision=precision), _reference(stack)) < tol


@pytest.mark.skipif(any(os.path.exists(p) for p in backends._GPU_DEVICE_NODES) or sys.platform != "linux",
                    reason="a GPU device node exists (or not Linux): the GPU libraries must be asked")
def test_no_driver_means_no_gpu_without_importing_gpu_libraries():
    code = ("import sys; from zooscope.kernels.backends import gpu_available; "
            "print(gpu_available(), 'torch' in sys.modules, 'cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]  # torch's import alone takes seconds


def test_resolve_backend_without_table():
    chosen = resolve_backend(9, 64, 64)
    if esd.gpu_available():
        assert chosen in {"cupy-gram-checked", "torch-gram-checked"}
    else:
        assert chosen == "numpy-gram-checked"
        assert resolve_backend(1, 4096, 4096, precision="fp32") == "scipy-gesdd"


def _table():
    return RoutingTable(
        routes=(
            Route("fp64", 64, 16, "numpy-gram-checked", (("numpy-gram-checked", 0.001), ("scipy-gesdd", 0.004))),
            Route("fp64", 1024, 1, "torch-gram-checked", (("torch-gram-checked", 0.2), ("scipy-gesdd", 0.5))),
            Route("fp32", 1024, 1, "numpy-svd", (("numpy-svd", 0.3),)),
            Route("fp64", 4096, 1, "cupy-gram-checked", (("cupy-gram-checked", 0.1),)),
        ),
        machine="test",
    )


def test_resolve_backend_with_table():
    table = _table()
    assert resolve_backend(9, 64, 64, table=table) == "numpy-gram-checked"
    assert resolve_backend(12, 256, 60, table=table) == "numpy-gram-checked"  # nearest bucket
    assert resolve_backend(1, 3072, 768, table=table) == "torch-gram-checked"
    assert resolve_backend(1, 3072, 768, precision="fp32", table=table) == "numpy-svd"
    expected = "cupy-gram-checked" if cupy_available() else "torch-gram-checked"  # unrunnable rules are skipped
    assert resolve_backend(1, 4096, 4096, table=table) == expected
    stack = STACKS["student-t-square"]
    np.testing.assert_allclose(eigenvalues(stack, table=table), _reference(stack), rtol=0, atol=1e-10 * 1e3)


def test_table_rules_with_unchecked_gram_routes_are_skipped():
    table = RoutingTable(routes=(Route("fp64", 64, 1, "numpy-gram-eigh"), Route("fp64", 1024, 1, "scipy-gesdd")))
    assert resolve_backend(1, 64, 64, table=table) == "scipy-gesdd"  # the nearest auto-eligible rule
    assert resolve_backend(1, 64, 64, table=RoutingTable(routes=table.routes[:1])) == resolve_backend(1, 64, 64)


def _ill_conditioned(rng, n, m, condition):
    """An n×m matrix with singular values log-spaced from 1 down to 1/condition (random orthogonal factors)."""
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    k = min(n, m)
    return (u[:, :k] * np.logspace(0, -np.log10(condition), k)) @ v[:, :k].T


def test_checked_gram_keeps_gram_eigenvalues_of_well_conditioned_matrices():
    stack = STACKS["student-t-conv"]  # 48×16 Student-t: λmin/λmax ~ 0.1, far above the certification bound
    np.testing.assert_array_equal(eigenvalues(stack, backend="numpy-gram-checked"),
                                  eigenvalues(stack, backend="numpy-gram-eigh"))


@pytest.mark.parametrize("n, m, condition", [(300, 150, 1e6), (60, 30, 1e6)])
def test_checked_gram_resolves_what_gram_cannot_certify(n, m, condition):
    """Uncertain eigenvalues are re-solved by inverse iteration, the certified ones kept, from a side of
    ``ITERATION_MIN_SIDE`` (300×150); below it (60×30) by a whole SVD, which is cheaper there."""
    rng = np.random.default_rng(3)
    stack = np.stack([
        rng.standard_normal((n, m)),  # well conditioned: Gram kept
        _ill_conditioned(rng, n, m, condition),  # λ from 1 to 1e-12: the smallest uncertain
        rng.standard_normal((n, 4)) @ rng.standard_normal((4, m)),  # rank 4: m - 4 zeros, whole SVD
    ])
    gram = eigenvalues(stack, backend="numpy-gram-eigh")
    svd = eigenvalues(stack, backend="numpy-svd")  # the same library's LAPACK gesdd
    got = eigenvalues(stack, backend="numpy-gram-checked")
    np.testing.assert_array_equal(got[0], gram[0])
    uncertain = gram[1] * esd.CHECKED_ACCURACY < (n + m) * np.finfo(float).eps * gram[1, -1]
    assert 0 < uncertain.sum() < m // 2
    if m >= esd.ITERATION_MIN_SIDE:
        np.testing.assert_array_equal(got[1, ~uncertain], gram[1, ~uncertain])  # kept: no whole-matrix SVD
        np.testing.assert_allclose(got[1, uncertain], svd[1, uncertain], rtol=esd.CHECKED_ACCURACY)
    else:
        np.testing.assert_array_equal(got[1], svd[1])
    assert np.max(np.abs(gram[1, uncertain] / svd[1, uncertain] - 1)) > esd.CHECKED_ACCURACY  # Gram alone is not
    np.testing.assert_array_equal(got[2], svd[2])
    rank_loss = singular_value_stats(got[2:], n)["rank_loss"]
    assert rank_loss == singular_value_stats(svd[2:], n)["rank_loss"] == m - 4
    assert singular_value_stats(gram[2:], n)["rank_loss"] != m - 4  # what the unchecked Gram route gets wrong


@pytest.mark.parametrize("backend", ["numpy-gram-checked", "torch-gram-checked", "cupy-gram-checked"])
@pytest.mark.parametrize("condition", [1e1, 1e3, 1e4, 1e5, 1e7])
@pytest.mark.parametrize("shape", [(200, 200), (400, 100), (100, 300)])
def test_checked_gram_every_eigenvalue_within_1e6_of_lapack(shape, condition, backend):
    if not esd.backend_available(backend):
        pytest.skip(f"{backend} cannot run here")
    rng = np.random.default_rng(int(condition) + shape[0])
    stack = np.stack([_ill_conditioned(rng, *shape, condition) for _ in range(2)])
    got = eigenvalues(stack, backend=backend)
    ref = _reference(stack)
    assert np.max(np.abs(got - ref) / ref) < esd.CHECKED_ACCURACY


def test_auto_eligible():
    assert esd.auto_eligible("scipy-gesdd") and esd.auto_eligible("cupy-gram-checked")
    assert not esd.auto_eligible("torch-gram-eigh")


def test_table_json_round_trip():
    table = _table()
    again = RoutingTable.from_dict(json.loads(json.dumps(table.as_dict())))
    assert again == table


def test_table_with_fp32_gram_rule_is_rejected():
    bad = {"routes": [{"precision": "fp32", "size_class": 64, "batch_class": 1, "backend": "numpy-gram-eigh"}]}
    with pytest.raises(ValueError, match="fp64-only"):
        RoutingTable.from_dict(bad)


def test_singular_value_stats_against_weightwatcher():
    logging.disable(logging.WARNING)
    from weightwatcher import RMT_Util

    rng = np.random.default_rng(7)
    n = 50
    stack = rng.standard_t(3, size=(4, n, 20))
    stack[1, :, 5:] = 0.0  # rank 5: rank loss 15 in slice 1
    stack[2] *= 1e-4  # σ tiny: weak rank loss
    evals = eigenvalues(stack)
    stats = singular_value_stats(evals, n)
    svs = [scipy.linalg.svd(w, compute_uv=False) for w in stack]
    assert stats["rank_loss"] == sum(RMT_Util.calc_rank_loss(sv, n) for sv in svs) == 15
    assert stats["sv_max"] == pytest.approx(max(sv.max() for sv in svs), rel=1e-12)
    assert stats["sv_min"] == pytest.approx(min(sv.min() for sv in svs), abs=1e-12)  # global min, not WW's bug
    ww_min = singular_value_stats(evals, n, ww_sv_min=True)["sv_min"]  # WeightWatcher's max of slice minima
    assert ww_min == pytest.approx(max(sv.min() for sv in svs), rel=1e-12) and ww_min > stats["sv_min"]
    pooled = np.concatenate([sv**2 for sv in svs])
    assert stats["weak_rank_loss"] == int(np.count_nonzero(pooled < 1e-6)) > 0


def test_measure_and_build_table_pick_the_fastest_accurate_backend():
    import pandas as pd

    from zooscope.engine import tune

    df = tune.measure([(3, 24, 12)], backends=["scipy-gesdd", "numpy-gram-eigh"], precisions=["fp64", "fp32"],
                      repeats=1)
    assert set(zip(df["backend"], df["precision"])) == {
        ("scipy-gesdd", "fp64"), ("numpy-gram-eigh", "fp64"), ("scipy-gesdd", "fp32")}  # fp32 gram skipped
    assert (df["seconds"] > 0).all()
    assert df.loc[df["precision"] == "fp64", "max_rel_error"].max() < 1e-12
    assert 1e-9 < df.loc[df["precision"] == "fp32", "max_rel_error"].max() < 1e-4

    fake = pd.DataFrame({
        "shape": ["9x64x64"] * 3 + ["1x768x768"] * 2, "batch": [9, 9, 9, 1, 1], "n": [64, 64, 64, 768, 768],
        "m": [64, 64, 64, 768, 768], "backend": ["scipy-gesdd", "numpy-svd", "numpy-gram-checked", "scipy-gesdd",
                                                 "numpy-gram-checked"],
        "precision": ["fp64"] * 5, "seconds": [0.004, 0.002, 0.001, 0.5, 0.2],
        "max_rel_error": [0.0, 0.0, 1e-6, 0.0, 1e-14],  # the fastest stack backend is too inaccurate
    })
    table = tune.build_table(fake)
    assert resolve_backend(9, 64, 64, table=table) == "numpy-svd"
    assert resolve_backend(1, 768, 768, table=table) == "numpy-gram-checked"
    assert dict(table.routes[1].times) == {"numpy-gram-checked": 0.2, "scipy-gesdd": 0.5}
    unchecked = tune.build_table(fake.replace("numpy-gram-checked", "numpy-gram-eigh"))
    assert {r.backend for r in unchecked.routes} == {"numpy-svd", "scipy-gesdd"}  # auto never takes raw Gram


def test_save_and_load_table(tmp_path, monkeypatch):
    from zooscope.engine import tune

    monkeypatch.setenv("ZOOSCOPE_HOME", str(tmp_path / "home"))
    assert tune.load_table() is None
    path = tune.save_table(_table())
    assert path == tmp_path / "home" / "esd_routing.json"
    assert tune.load_table() == _table()
    assert tune.load_table(tune.save_table(_table(), tmp_path / "x.json")) == _table()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        tune.load_table(tmp_path / "bad.json")


def test_parse_shapes():
    from zooscope.engine.tune import parse_shapes

    assert parse_shapes("9x64x64, 768x3072") == [(9, 64, 64), (1, 768, 3072)]
    with pytest.raises(ValueError, match="BxNxM"):
        parse_shapes("9x64xa")


def test_bench_svd_command(tmp_path, monkeypatch, capsys):
    from zooscope.cli import main

    monkeypatch.setenv("ZOOSCOPE_HOME", str(tmp_path))
    out = tmp_path / "out"
    rc = main(["bench", "svd", "--shapes", "2x16x8", "--backends", "numpy-gram-eigh", "--precision", "fp64",
               "--repeats", "1", "--tune", "--out", str(out)])
    assert rc == 0
    from zooscope.kernels.backends import describe_device, device_key

    printed = capsys.readouterr().out
    assert f"device: {describe_device()}" in printed and f"routing table of {device_key()}" in printed
    assert (out / "svd_bench.png").stat().st_size > 0
    import pandas as pd

    df = pd.read_csv(out / "svd_bench.csv")
    assert set(df["backend"]) == {"scipy-gesdd", "numpy-gram-eigh"}  # the baseline is always measured
    from zooscope.engine.tune import load_table

    assert load_table().routes[0].backend in {"scipy-gesdd", "numpy-gram-eigh"}
    assert main(["bench", "svd", "--shapes", "0x4x4", "--out", str(out)]) == 2
    assert "bad shape" in capsys.readouterr().err


def test_bench_svd_model_shapes(tmp_path):
    pytest.importorskip("zooscope.pipelines.readers")
    from zooscope.commands.bench import model_shapes
    from zooscope.cli import main

    rng = np.random.default_rng(0)
    ckpt = tmp_path / "tiny.npz"
    np.savez(ckpt, **{"fc1.weight": rng.standard_normal((30, 20)).astype(np.float32),
                      "conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
                      "fc1.bias": np.zeros(30, np.float32)})
    assert model_shapes(str(ckpt)) == [(9, 16, 8), (1, 30, 20)]
    assert main(["bench", "svd", "--model", str(ckpt), "--backends", "numpy-svd", "--precision", "fp64",
                 "--repeats", "1", "--out", str(tmp_path / "out")]) == 0
    assert main(["bench", "svd", "--model", str(tmp_path / "missing.npz"), "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_input_is_widened_exactly(backend):
    if not esd.backend_available(backend):
        pytest.skip(f"{backend} cannot run here")
    half = STACKS["student-t-conv"].astype(np.float16)  # GPU backends widen on the device, CPU ones on the host
    np.testing.assert_array_equal(eigenvalues(half, backend=backend),
                                  eigenvalues(half.astype(np.float64), backend=backend))


def test_table_of_another_device_is_ignored_with_a_log_line(caplog):
    """A table tuned on another device (a GPU node's, on this CPU machine) says nothing about this one."""
    from zooscope.kernels.backends import device_key

    other = RoutingTable(routes=(Route("fp64", 64, 16, "scipy-gesdd"),), device="cuda:NVIDIA H100 80GB HBM3")
    esd._ignored_logged.clear()
    with caplog.at_level(logging.INFO, logger="zooscope.kernels.esd"):
        assert resolve_backend(9, 64, 64, table=other) == resolve_backend(9, 64, 64)
    assert "measured on cuda:NVIDIA H100 80GB HBM3 ignored on " + device_key() in caplog.text
    mine = RoutingTable(routes=(Route("fp64", 64, 16, "numpy-svd"),), device=device_key())
    anywhere = RoutingTable(routes=(Route("fp64", 64, 16, "scipy-gesdd"),))
    assert resolve_backend(9, 64, 64, table=(other, mine)) == "numpy-svd"  # this device's table, of several
    assert resolve_backend(9, 64, 64, table=(anywhere, mine)) == "numpy-svd"  # before a device-less one
    assert resolve_backend(9, 64, 64, table=(other, anywhere)) == "scipy-gesdd"  # no device named: any device
    stack = STACKS["student-t-square"]
    np.testing.assert_allclose(eigenvalues(stack, table=(other, mine)), _reference(stack), rtol=1e-10)


def test_saved_tables_are_kept_per_device(tmp_path, caplog):
    """A shared $ZOOSCOPE_HOME keeps a CPU login node's table and a GPU node's side by side; each process loads its
    own; the options carry all of them so that the worker that runs a task picks by its own device."""
    from zooscope.engine import tune
    from zooscope.kernels.backends import device_key
    from zooscope.pipelines.analyze import AnalysisOptions

    path = tmp_path / "esd_routing.json"
    gpu = RoutingTable(routes=(Route("fp64", 64, 16, "cupy-gram-checked"),), device="cuda:NVIDIA H200")
    here = RoutingTable(routes=(Route("fp64", 64, 16, "numpy-svd"),), device=device_key())
    tune.save_table(gpu, path)
    assert tune.load_table(path) is None  # only another device's table saved
    tune.save_table(here, path)
    tune.save_table(dataclasses.replace(here, machine="retuned"), path)  # same device: replaced, not added
    assert {t.device for t in tune.load_tables(path)} == {"cuda:NVIDIA H200", device_key()}
    assert tune.load_table(path).machine == "retuned"
    assert tune.load_table(path, device="cuda:NVIDIA H200") == gpu
    path.write_text(json.dumps(_table().as_dict()))  # a one-table file of an earlier version
    assert tune.load_tables(path) == (_table(),)
    tune.save_table(gpu)
    options = tune.with_saved_table(AnalysisOptions())
    assert options.esd_table == (gpu,)  # every device's table travels; the worker chooses
    assert tune.with_saved_table(AnalysisOptions(esd_backend="scipy-gesdd")).esd_table is None


def test_build_table_records_the_device():
    import pandas as pd

    from zooscope.engine import tune
    from zooscope.kernels.backends import describe_device, device_key

    fake = pd.DataFrame({"shape": ["9x64x64"], "batch": [9], "n": [64], "m": [64], "backend": ["numpy-svd"],
                         "precision": ["fp64"], "seconds": [0.002], "max_rel_error": [0.0]})
    table = tune.build_table(fake)
    assert table.device == device_key() and describe_device() in table.machine
    assert RoutingTable.from_dict(json.loads(json.dumps(table.as_dict()))) == table


def _single_threaded(func):
    """``func()`` with BLAS single-threaded, as on a Dask worker."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return func()


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_threaded_eigvalsh_blocks_equal_one_call_bitwise(monkeypatch, threads):
    """A stack of many small Gram matrices solved in NUMBA_NUM_THREADS row blocks: the eigenvalues of one
    single-threaded ``np.linalg.eigvalsh`` call, bit for bit (each matrix is solved on its own either way)."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
    assert backends.kernel_threads() == int(threads)
    x = np.random.default_rng(5).standard_t(3, size=(1001, 24, 16))
    g = x.transpose(0, 2, 1) @ x
    assert backends.block_threads(len(g), g.size) == int(threads)  # a split stack
    lam, routes = esd.eigenvalues_with_routes(x, backend="numpy-gram-eigh")
    np.testing.assert_array_equal(lam, _single_threaded(lambda: np.linalg.eigvalsh(g)))


@pytest.mark.parametrize("backend", ["numpy-gram-eigh", "numpy-gram-checked", "numpy-svd", "scipy-gesdd"])
def test_cpu_eigenvalues_do_not_depend_on_threads(monkeypatch, backend):
    """Large matrices (side 320, where OpenBLAS's threaded syevd/getrf round differently from its single-threaded
    ones): a stack solved with the process's BLAS threads and NUMBA_NUM_THREADS row blocks, one matrix at a time,
    and as a Dask worker (BLAS single-threaded, one thread) gives the same bits. The checked route re-solves the
    smallest eigenvalues of ill-conditioned matrices (on the thread pool), which must not change them either."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 400, 320))
    x[:, :, :3] *= 1e-7  # three tiny singular values per matrix: the checked route's certification runs
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")
    together, _ = esd.eigenvalues_with_routes(x, backend=backend)
    one_by_one = np.concatenate([esd.eigenvalues_with_routes(x[i : i + 1], backend=backend)[0] for i in range(6)])
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    worker = _single_threaded(lambda: esd.eigenvalues_with_routes(x, backend=backend)[0])
    np.testing.assert_array_equal(together, one_by_one)
    np.testing.assert_array_equal(together, worker)
    reference = np.sort(np.linalg.svd(x, compute_uv=False) ** 2, axis=1)
    np.testing.assert_allclose(together[:, 3:], reference[:, 3:], rtol=1e-9)
    if backend != "numpy-gram-eigh":  # the unchecked Gram route loses the tiny ones to rounding, by design
        np.testing.assert_allclose(together[:, :3], reference[:, :3], rtol=1e-6)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_row_blocks_work_in_a_forked_child(monkeypatch):
    """A child forked after the parent's row-block pool started (a fork-based multiprocessing pool) solves in row
    blocks too, instead of waiting forever on the parent's threads, which it does not have."""
    import time

    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    g = np.random.default_rng(2).standard_normal((64, 40, 40))
    assert backends.block_threads(len(g), g.size) == 2
    expected = backends.map_row_blocks(np.linalg.eigvalsh, g)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only with the same eigenvalues
        os._exit(0 if np.array_equal(backends.map_row_blocks(np.linalg.eigvalsh, g), expected) else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on its parent's thread pool")
