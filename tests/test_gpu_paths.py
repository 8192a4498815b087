"""The GPU code paths on a machine without a GPU: CuPy replaced by a numpy-backed stand-in that behaves like
CuPy 14 where it matters here (``eigvalsh`` of a 2-D array is cuSOLVER's ``syevd``, of a 3-D stack batched Jacobi,
whose ``info`` is only checked under ``cupyx.errstate(linalg="raise")``), GPU detection with its reasons logged,
and the allocator pools released after a stack. References: LAPACK's SVD (scipy) for the eigenvalues.
"""
from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.linalg

from zooscope.kernels import backends, esd
from zooscope.kernels.esd import eigenvalues, eigenvalues_with_routes


def _reference(stack):
    return np.sort(np.stack([scipy.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2 for w in stack]), axis=1)


class FakePool:
    def __init__(self, total=0, used=0):
        self.total, self.used, self.frees = total, used, 0

    def total_bytes(self):
        return self.total

    def used_bytes(self):
        return self.used

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self):
        self.frees += 1
        self.total = self.used


class FakeCupy(types.ModuleType):
    """numpy in CuPy's clothes. ``jacobi_fails``: the batched solver exhausts its sweeps (info > 0) and returns the
    unconverged diagonal; ``syevd_fails``: indices (by matrix content) where 2-D syevd fails; ``nan_rows``: rows
    the batched solver returns as NaN without an info code."""

    def __init__(self, jacobi_fails=False, syevd_fails=(), nan_rows=()):
        super().__init__("cupy")
        self.jacobi_fails, self.nan_rows = jacobi_fails, set(nan_rows)
        self.syevd_fails: list[np.ndarray] = list(syevd_fails)
        self.calls: list[tuple] = []
        self.errstate = "ignore"
        self.pool, self.pinned = FakePool(), FakePool()
        self.linalg = types.SimpleNamespace(eigvalsh=self._eigvalsh, svd=self._svd)
        self.isfinite = np.isfinite

    def asarray(self, x):
        self.calls.append(("asarray", np.asarray(x).dtype))
        return np.array(x)

    @staticmethod
    def asnumpy(x):
        return np.asarray(x)

    def get_default_memory_pool(self):
        return self.pool

    def get_default_pinned_memory_pool(self):
        return self.pinned

    def _info(self, failed: bool):
        if failed and self.errstate == "raise":
            raise np.linalg.LinAlgError("Error reported by syevj in cuSOLVER. devInfo = 101.")

    def _eigvalsh(self, a):
        self.calls.append(("eigvalsh", a.ndim))
        if a.ndim == 2:
            failed = any(np.array_equal(a, bad) for bad in self.syevd_fails)
            self._info(failed)
            return np.diag(a).copy() if failed else np.linalg.eigvalsh(a)
        self._info(self.jacobi_fails)
        if self.jacobi_fails:
            w = np.sort(np.diagonal(a, axis1=1, axis2=2), axis=1)
        else:  # a matrix with NaN entries gets NaN eigenvalues (no info code)
            w = np.stack([np.linalg.eigvalsh(g) if np.isfinite(g).all() else np.full(len(g), np.nan) for g in a])
        for i in self.nan_rows:
            w[i] = np.nan
        return w

    def _svd(self, a, compute_uv=False):
        self.calls.append(("svd", a.ndim))
        return np.linalg.svd(a, compute_uv=compute_uv)


@pytest.fixture
def fake_cupy(monkeypatch):
    """Install a FakeCupy (and a cupyx with errstate) and make the CuPy backends available; yields a factory."""

    def install(**kwargs):
        cp = FakeCupy(**kwargs)

        @contextlib.contextmanager
        def errstate(linalg=None):
            before, cp.errstate = cp.errstate, linalg or cp.errstate
            try:
                yield
            finally:
                cp.errstate = before

        monkeypatch.setitem(sys.modules, "cupy", cp)
        monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(errstate=errstate))
        monkeypatch.setattr(esd, "cupy_available", lambda: True)
        monkeypatch.setattr(backends, "cupy_available", lambda: True)
        return cp

    return install


def _stack(b, n=40, m=24, seed=0):
    return np.random.default_rng(seed).standard_t(3.0, size=(b, n, m))


@pytest.mark.parametrize("backend", ["cupy-gram-eigh", "cupy-gram-checked"])
def test_single_matrix_takes_syevd_and_a_stack_takes_batched_jacobi(fake_cupy, backend):
    cp = fake_cupy()
    one = _stack(1)
    evals, routes = eigenvalues_with_routes(one, backend=backend)
    assert [c for c in cp.calls if c[0] == "eigvalsh"] == [("eigvalsh", 2)]  # 2-D: syevd, never Jacobi
    np.testing.assert_allclose(evals, _reference(one), rtol=1e-10)
    assert routes == [backend]
    cp.calls.clear()
    many = _stack(6)
    evals, routes = eigenvalues_with_routes(many, backend=backend)
    assert [c for c in cp.calls if c[0] == "eigvalsh"] == [("eigvalsh", 3)]  # one batched call for the stack
    np.testing.assert_allclose(evals, _reference(many), rtol=1e-10)
    assert routes == [backend] * 6


@pytest.mark.parametrize("backend", ["cupy-gram-eigh", "cupy-gram-checked"])
def test_unconverged_jacobi_is_caught_and_the_fallback_recorded(fake_cupy, backend):
    """Under CuPy's default errstate an exhausted Jacobi returns garbage silently; the solver must see info."""
    cp = fake_cupy(jacobi_fails=True)
    stack = _stack(5)
    evals, routes = eigenvalues_with_routes(stack, backend=backend)
    np.testing.assert_allclose(evals, _reference(stack), rtol=1e-10)
    assert routes == [f"{backend}:syevd-fallback"] * 5
    assert [c for c in cp.calls if c[0] == "eigvalsh"] == [("eigvalsh", 3)] + [("eigvalsh", 2)] * 5
    assert cp.errstate == "ignore"  # restored


def test_nonfinite_rows_and_failing_syevd_fall_back_per_matrix(fake_cupy):
    stack = _stack(4, seed=3)
    gram_2 = stack[2].T @ stack[2]
    cp = fake_cupy(nan_rows=(1, 2), syevd_fails=[gram_2])
    evals, routes = eigenvalues_with_routes(stack, backend="cupy-gram-checked")
    np.testing.assert_allclose(evals, _reference(stack), rtol=1e-10)
    assert routes == ["cupy-gram-checked", "cupy-gram-checked:syevd-fallback", "cupy-gram-checked:svd-fallback",
                      "cupy-gram-checked"]
    assert ("svd", 3) in cp.calls  # matrix 2 by CuPy's SVD
    one = stack[2:3]
    assert eigenvalues_with_routes(one, backend="cupy-gram-eigh")[1] == ["cupy-gram-eigh:svd-fallback"]


def test_a_nonfinite_matrix_is_not_a_solver_failure(fake_cupy):
    cp = fake_cupy()
    stack = _stack(3)
    stack[1, 0, 0] = np.nan
    evals, routes = eigenvalues_with_routes(stack, backend="cupy-gram-eigh")
    assert routes == ["cupy-gram-eigh"] * 3 and np.isnan(evals[1]).all() and np.isfinite(evals[[0, 2]]).all()
    assert ("svd", 3) not in cp.calls


@pytest.mark.parametrize("backend", ["cupy-svd", "cupy-gram-eigh", "cupy-gram-checked"])
def test_stored_dtype_crosses_the_bus_and_widens_on_the_device(fake_cupy, backend):
    cp = fake_cupy()
    half = _stack(3).astype(np.float16)
    got = eigenvalues(half, backend=backend)
    assert cp.calls[0] == ("asarray", np.dtype(np.float16))  # the host copy is the stored fp16, not fp64
    np.testing.assert_allclose(got, _reference(half.astype(np.float64)), rtol=1e-10)


def test_gpu_pool_released_after_a_stack_only_above_the_threshold(fake_cupy):
    cp = fake_cupy()
    cp.pool.total, cp.pool.used = backends.POOL_KEEP_BYTES + 1, 0
    eigenvalues(_stack(2), backend="cupy-gram-eigh")
    assert cp.pool.frees == 1 and cp.pool.total == 0
    cp.pool.total = backends.POOL_KEEP_BYTES // 2
    eigenvalues(_stack(2), backend="cupy-gram-eigh")
    assert cp.pool.frees == 1  # small pools are kept: no cudaFree/cudaMalloc per layer
    eigenvalues(_stack(2), backend="numpy-gram-checked")
    assert cp.pool.frees == 1  # CPU routes leave GPU pools alone


def test_torch_eigvalsh_failure_falls_back_per_matrix(monkeypatch):
    """torch raises LinAlgError when its solver does not converge: the chunk is solved again matrix by matrix,
    and the matrix that fails again by torch's SVD, recorded on its route."""
    import torch

    stack = _stack(3, seed=5)
    bad = torch.from_numpy(stack[1].T @ stack[1])
    real = torch.linalg.eigvalsh

    def flaky(a):
        if a.ndim == 3 or torch.allclose(a, bad):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky)
    evals, routes = eigenvalues_with_routes(stack, backend="torch-gram-checked")
    np.testing.assert_allclose(evals, _reference(stack), rtol=1e-10)
    assert routes == ["torch-gram-checked", "torch-gram-checked:svd-fallback", "torch-gram-checked"]


def test_numpy_gram_failure_falls_back(monkeypatch):
    stack = _stack(2, seed=6)
    real = np.linalg.eigvalsh

    def flaky(a):
        if a.ndim == 3:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real(a)

    monkeypatch.setattr(np.linalg, "eigvalsh", flaky)
    evals, routes = eigenvalues_with_routes(stack, backend="numpy-gram-eigh")
    np.testing.assert_allclose(evals, _reference(stack), rtol=1e-10)
    assert routes == ["numpy-gram-eigh"] * 2  # one at a time with the same solver: same route


# -- detection ---------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_probes(monkeypatch):
    """Probe caches cleared before and after; CUDA_VISIBLE_DEVICES unset; the device nodes 'present'."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(backends, "_no_gpu_driver", lambda: False)
    backends.clear_cache()
    yield
    backends.clear_cache()


def test_missing_cupy_is_logged_when_a_gpu_node_exists(fresh_probes, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with caplog.at_level(logging.INFO, logger="zooscope.kernels.backends"):
        assert not backends.cupy_available()
    assert "CuPy import failed" in caplog.text and caplog.records[-1].levelno == logging.WARNING


def test_driver_error_is_logged_with_its_message(fresh_probes, monkeypatch, caplog):
    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime")

    cp = types.ModuleType("cupy")
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=broken))
    monkeypatch.setitem(sys.modules, "cupy", cp)
    with caplog.at_level(logging.WARNING, logger="zooscope.kernels.backends"):
        assert not backends.cupy_available()
    assert "cudaErrorInsufficientDriver" in caplog.text
    assert "cudaErrorInsufficientDriver" in backends.describe_device()


def test_cpu_only_torch_build_is_named(fresh_probes, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with caplog.at_level(logging.WARNING, logger="zooscope.kernels.backends"):
        assert not backends.torch_cuda_available()
    assert "CPU-only build" in caplog.text


def test_fake_gpu_is_counted_named_and_keyed(fresh_probes, monkeypatch):
    cp = types.ModuleType("cupy")
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 2, getDeviceProperties=lambda i: {"name": b"NVIDIA H200"}))
    monkeypatch.setitem(sys.modules, "cupy", cp)
    assert backends.visible_gpus() == ["0", "1"]
    assert backends.device_key() == "cuda:NVIDIA H200"
    assert backends.describe_device().startswith("GPU NVIDIA H200 (CuPy")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # this process's own GPUs are what workers get
    assert backends.visible_gpus() == ["3", "5"]


def test_hidden_gpus_are_logged_without_importing_gpu_libraries():
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "from zooscope.kernels.backends import gpu_available, describe_device; "
            "print(gpu_available(), 'torch' in sys.modules, 'cupy' in sys.modules); print(describe_device())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    first, second = done.stdout.splitlines()
    assert first.split() == ["False", "False", "False"]
    assert "no GPU: CUDA_VISIBLE_DEVICES='' hides every GPU" in second
    assert "CuPy not used: CUDA_VISIBLE_DEVICES='' hides every GPU" in done.stderr


def test_a_refused_batched_call_falls_back_to_syevd(fake_cupy, monkeypatch):
    """cuSOLVER may refuse a batch (an error status, not info): CuPy raises CUSOLVERError; solved one by one."""

    class CUSOLVERError(RuntimeError):
        pass

    libs = types.ModuleType("cupy_backends.cuda.libs.cusolver")
    libs.CUSOLVERError = CUSOLVERError
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cusolver", libs)
    cp = fake_cupy()
    real = cp._eigvalsh

    def refuse_batches(a):
        if a.ndim == 3:
            raise CUSOLVERError("CUSOLVER_STATUS_INVALID_VALUE")
        return real(a)

    cp.linalg.eigvalsh = refuse_batches
    stack = _stack(3, seed=9)
    evals, routes = eigenvalues_with_routes(stack, backend="cupy-gram-checked")
    np.testing.assert_allclose(evals, _reference(stack), rtol=1e-10)
    assert routes == ["cupy-gram-checked:syevd-fallback"] * 3
