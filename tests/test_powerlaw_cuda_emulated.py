"""The CUDA power-law kernel's source, run on CPU threads, against the Numba kernel (no GPU needed).

``kernels/powerlaw_cuda.py`` holds CUDA C compiled by CuPy on a GPU machine. Here the same source is compiled by
g++ with a small shim that emulates one thread block at a time: 256 real threads, ``__syncthreads`` a
``std::barrier``, ``__shared__`` variables statics shared by the block's threads, ``atomicMin`` a compare-and-swap
loop. It checks the kernel's logic (candidates, pruning, first-argmin reduction, races at barriers), not the GPU's
arithmetic; the GPU itself is tested by ``test_powerlaw.py``'s ``requires_cupy`` tests. Skips without g++ (C++20),
except where ``ZOOSCOPE_REQUIRE_GXX`` is set (CI, which installs g++): there it fails.
"""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from zooscope.kernels import powerlaw_cuda, powerlaw_numba

SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
using std::fabs; using std::log; using std::pow;
struct Dim { int x; };
static thread_local Dim threadIdx, blockIdx;
static std::barrier<>* g_bar;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
static inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
static inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
#define __global__
#define __shared__ static
"""

RUNNER = r"""
extern "C" void run(const double* values, const long long* offsets, long long B, int unique, int fixed,
                    double lo, double hi, long long min_tail, double bias, long long* idx, double* alpha,
                    double* D, double* S) {
    for (long long b = 0; b < B; ++b) {
        std::barrier<> bar(THREADS);
        g_bar = &bar;
        std::vector<std::thread> threads;
        for (int t = 0; t < THREADS; ++t)
            threads.emplace_back([=] { threadIdx.x = t; blockIdx.x = (int)b;
                pl_scan(values, offsets, S, unique, fixed, lo, hi, min_tail, bias, idx, alpha, D); });
        for (auto& th : threads) th.join();
    }
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:  # CI installs g++ and sets ZOOSCOPE_REQUIRE_GXX=1: there a missing compiler fails
        (pytest.fail if os.environ.get("ZOOSCOPE_REQUIRE_GXX") else pytest.skip)("g++ not installed")
    work = tmp_path_factory.mktemp("cuda_emu")
    (work / "kernel.cpp").write_text(SHIM + powerlaw_cuda._SOURCE + RUNNER)
    built = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o",
                            str(work / "kernel.so"), str(work / "kernel.cpp")], capture_output=True, text=True)
    if built.returncode != 0:
        (pytest.fail if os.environ.get("ZOOSCOPE_REQUIRE_GXX") else pytest.skip)(f"g++ cannot build the emulation (needs C++20 <barrier>): {built.stderr[-300:]}")
    lib = ctypes.CDLL(str(work / "kernel.so"))
    p = ctypes.c_void_p
    lib.run.argtypes = [p, p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_double,
                        ctypes.c_longlong, ctypes.c_double, p, p, p, p]

    def run(values, offsets, unique, fixed, lo, hi, min_tail, bias):
        values = np.ascontiguousarray(values, np.float64)
        offsets = np.ascontiguousarray(offsets, np.int64)
        batch = offsets.size - 1
        idx = np.full(batch, -1, np.int64)
        alpha, d = np.full(batch, np.nan), np.full(batch, np.nan)
        scratch = np.empty_like(values)
        lib.run(values.ctypes.data, offsets.ctypes.data, batch, int(unique), int(fixed), lo, hi, min_tail, bias,
                idx.ctypes.data, alpha.ctypes.data, d.ctypes.data, scratch.ctypes.data)
        return idx, alpha, d

    return run


def _samples(seed):
    """Pareto, Student-t ESDs, lognormal, heavily tied and tiny samples, as one ragged batch."""
    rng = np.random.default_rng(seed)
    xs = [np.sort(rng.pareto(rng.uniform(0.7, 3.0), int(rng.integers(30, 1500))) + 1.0) for _ in range(4)]
    for dof in (1.5, 3.0):
        w = rng.standard_t(dof, size=(300, int(rng.integers(60, 200))))
        xs.append(np.sort(np.linalg.svd(w, compute_uv=False) ** 2))
    xs.append(np.sort(rng.lognormal(0, 1.5, 700)))
    xs += [np.sort(np.round(rng.pareto(1.5, int(rng.integers(50, 800))) + 1.0, 1)) for _ in range(2)]
    xs += [np.array([]), np.array([2.0]), np.array([1.0, 2.0]), np.array([1.0, 1.0, 1.0]),
           np.array([1.0, 1.0, 3.0, 3.0])]
    offsets = np.zeros(len(xs) + 1, np.int64)
    np.cumsum([x.size for x in xs], out=offsets[1:])
    return np.concatenate(xs), offsets


MODES = {  # (unique, fixed, lo, hi, min_tail, bias)
    "ww": (False, False, -np.inf, np.inf, 0, 0.0),
    "powerlaw": (True, False, -np.inf, np.inf, 0, 0.0),
    "ww-range-min-tail": (False, False, 1.5, 4.0, 20, 0.0),
    "powerlaw-range": (True, False, 1.5, 4.0, 20, 0.0),
    "ww-fixed-xmin": (False, True, 2.0, 2.0, 0, 0.0),
    "powerlaw-fixed-xmin": (True, True, 2.0, 2.0, 0, 0.0),
    "ww-small-n-bias": (False, False, -np.inf, np.inf, 50, 1.0),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_cuda_source_equals_numba_kernel(emulated, mode, seed):
    values, offsets = _samples(seed)
    got = emulated(values, offsets, *MODES[mode])
    want = powerlaw_numba.best_of_ragged(values, offsets, *MODES[mode])
    np.testing.assert_array_equal(got[0], want[0])  # the same xmin candidate: first argmin of D
    np.testing.assert_allclose(got[1], want[1], rtol=1e-13, atol=0, equal_nan=True)  # alpha
    np.testing.assert_allclose(got[2], want[2], rtol=1e-13, atol=1e-15, equal_nan=True)  # D
