"""GPU kernel (CuPy RawKernel) for the Clauset xmin scan: all samples of a batch in one launch.

One thread block per sample, its threads over the candidate xmins (definitions and options as in
``powerlaw_numba``). The suffix sums ``S_i = sum_{j>=i} ln(x_j/x_i)`` follow the CPU kernel's recursion: the
block computes the terms, thread 0 adds them up in the same order, and the kernel is compiled without fused
multiply-adds, so alpha rounds as on the CPU. Each candidate is first probed where the thread's previous
candidate deviated most, and abandoned as soon as one deviation exceeds the best D of the block (kept in
shared memory, lowered with an atomic min on its bit pattern, valid for non-negative doubles); a block
reduction over (D, index) then picks the first argmin, so the result equals the unpruned scan. CuPy is
imported lazily; without it or a device, ``BackendUnavailable`` is raised. The device buffers go back to CuPy's pool
after the launch, and the pool to the driver when it holds more than ``backends.POOL_KEEP_BYTES``.
"""
from __future__ import annotations

import functools

import numpy as np

from zooscope.kernels.backends import BackendUnavailable, cupy_available, release_gpu_pools

THREADS = 256

_SOURCE = r"""
#define THREADS 256
#define INF __longlong_as_double(0x7ff0000000000000LL)
#define QNAN __longlong_as_double(0x7ff8000000000000LL)
extern "C" __global__
void pl_scan(const double* __restrict__ values, const long long* __restrict__ offsets, double* __restrict__ S,
             const int unique, const int fixed, const double lo, const double hi, const long long min_tail,
             const double bias, long long* __restrict__ out_idx, double* __restrict__ out_alpha,
             double* __restrict__ out_D)
{
    const int b = blockIdx.x;
    const int t = threadIdx.x;
    const long long off = offsets[b];
    const long long N = offsets[b + 1] - off;
    const double* x = values + off;
    double* s = S + off;
    __shared__ unsigned long long best_bits;
    __shared__ long long special;      /* fixed: the candidate; unique: the dropped last distinct value */
    __shared__ double red_D[THREADS];
    __shared__ double red_a[THREADS];
    __shared__ long long red_i[THREADS];
    for (long long i = t; i < N - 1; i += THREADS) s[i] = (double)(N - 1 - i) * log(x[i + 1] / x[i]);
    __syncthreads();
    if (t == 0) {
        best_bits = 0x7ff0000000000000ULL;
        special = -1;
        if (N > 0) s[N - 1] = 0.0;
        for (long long i = N - 2; i >= 0; --i) s[i] += s[i + 1];
        if (fixed) {
            for (long long j = 0; j < N - 1; ++j) if (x[j] >= lo) { special = j; break; }
        } else if (unique) {
            for (long long j = N - 1; j >= 0; --j)
                if ((j == 0 || x[j] != x[j - 1]) && x[j] >= lo && x[j] <= hi) { special = j; break; }
        }
    }
    __syncthreads();
    const long long min_n = min_tail > 2 ? min_tail : 2;
    double myD = INF;
    double myA = QNAN;
    long long myI = -1;
    long long probe = -1;
    for (long long i = N - 2 - t; i >= 0; i -= THREADS) {
        const bool first = !unique || i == 0 || x[i] != x[i - 1];
        bool is_cand;
        if (fixed) is_cand = (i == special);
        else is_cand = first && x[i] >= lo && x[i] <= hi && !(unique && i == special);
        if (!is_cand || N - i < min_n) continue;
        const double n = (double)(N - i);
        const double alpha = 1.0 + (n - bias) / s[i];
        double D = 1.0;
        if (alpha > 1.0) {
            const double e = 1.0 - alpha;
            const double xi = x[i];
            double limit = __longlong_as_double(*(volatile long long*)&best_bits);
            double m = 0.0;
            long long at = i;
            if (probe > i) {  /* a point of this tail: where the previous candidate deviated most */
                m = fabs(1.0 - pow(x[probe] / xi, e) - (double)(probe - i) / n);
                at = probe;
            }
            bool dead = m > limit;
            for (long long j = i; j < N && !dead; ++j) {
                if (unique && j > i && x[j] == x[j - 1]) continue;
                const double d = fabs(1.0 - pow(x[j] / xi, e) - (double)(j - i) / n);
                if (d > m) {
                    m = d;
                    at = j;
                    if ((j & 63) == 0) limit = __longlong_as_double(*(volatile long long*)&best_bits);
                    dead = m > limit;
                }
            }
            probe = at;
            if (dead) continue;
            D = m;
        }
        atomicMin(&best_bits, (unsigned long long)__double_as_longlong(D));
        if (D < myD || (D == myD && i < myI)) { myD = D; myI = i; myA = alpha; }
    }
    red_D[t] = myD; red_i[t] = myI; red_a[t] = myA;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if (t < w) {
            const double d2 = red_D[t + w];
            const long long i2 = red_i[t + w];
            if (i2 >= 0 && (red_i[t] < 0 || d2 < red_D[t] || (d2 == red_D[t] && i2 < red_i[t]))) {
                red_D[t] = d2; red_i[t] = i2; red_a[t] = red_a[t + w];
            }
        }
        __syncthreads();
    }
    if (t == 0) {
        out_idx[b] = red_i[0];
        out_alpha[b] = red_i[0] >= 0 ? red_a[0] : QNAN;
        out_D[b] = red_i[0] >= 0 ? red_D[0] : QNAN;
    }
}
"""


@functools.cache
def _kernel():
    import cupy

    return cupy.RawKernel(_SOURCE, "pl_scan", options=("--fmad=false",))


def best_of_ragged(values: np.ndarray, offsets: np.ndarray, unique: bool, fixed: bool, lo_val: float,
                   hi_val: float, min_tail: int, bias: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index of xmin within its sample or -1, alpha, D) for every ascending sample ``values[offsets[b]:offsets[b+1]]``.

    Same contract as ``powerlaw_numba.best_of_ragged``; one kernel launch, one block per sample.
    """
    if not cupy_available():
        raise BackendUnavailable("the 'cuda' power-law backend needs CuPy and a CUDA device")
    import cupy

    values = np.ascontiguousarray(values, dtype=np.float64)  # the kernel reads raw pointers
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] < 0 or offsets[-1] > values.size \
            or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must be non-decreasing within [0, {values.size}], got {offsets!r}")
    B = offsets.size - 1
    d_values = cupy.asarray(values)
    d_offsets = cupy.asarray(offsets)
    scratch = cupy.empty_like(d_values)
    idx = cupy.full(B, -1, dtype=cupy.int64)
    alpha = cupy.full(B, np.nan)
    D = cupy.full(B, np.nan)
    if B:
        _kernel()((B,), (THREADS,), (d_values, d_offsets, scratch, np.int32(unique), np.int32(fixed),
                                     np.float64(lo_val), np.float64(hi_val), np.int64(min_tail),
                                     np.float64(bias), idx, alpha, D))
    result = cupy.asnumpy(idx), cupy.asnumpy(alpha), cupy.asnumpy(D)
    del d_values, d_offsets, scratch, idx, alpha, D
    release_gpu_pools()
    return result
