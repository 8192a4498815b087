"""Which compute devices exist, and why a GPU is not used. GPU libraries are imported lazily, never at module import.

Every probe runs once per process (cached) and logs, on the ``zooscope.kernels.backends`` logger, why a GPU is
not used: at INFO when that is the normal state of the machine (no GPU device node, ``CUDA_VISIBLE_DEVICES`` hiding
every GPU), at WARNING when a GPU is there but cannot be used (library missing, driver or runtime error).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

#: Device nodes of which at least one exists on a Linux machine with a GPU driver that torch or CuPy can use:
#: NVIDIA's, WSL2's (``/dev/dxg``) and ROCm's (``/dev/kfd``; torch.cuda and CuPy run on ROCm builds too).
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")

POOL_KEEP_BYTES = 256 << 20
""":func:`release_gpu_pools` hands a caching allocator's free blocks back to the driver above this many bytes."""

_log = logging.getLogger(__name__)
_POOLS: dict[int, ThreadPoolExecutor] = {}  # threads -> the process's pool for row blocks (``map_row_blocks``)
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: its pools start afresh
    os.register_at_fork(after_in_child=_POOLS.clear)


class BackendUnavailable(RuntimeError):
    """The requested backend needs a library or device that this machine lacks."""


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. under taskset or a batch job)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def kernel_threads() -> int:
    """Threads this process's CPU kernels may use: ``NUMBA_NUM_THREADS`` when set (a local Dask worker's share of
    the cores, ``engine.cluster.local_worker_specs``), else every available core."""
    try:
        return max(1, int(os.environ["NUMBA_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available_cores()


ROW_BLOCK_MIN_ENTRIES = 1 << 16
"""Arrays of fewer entries in all are solved in one call: handing them to threads costs more than it saves."""


def block_threads(rows: int, entries: int) -> int:
    """Threads :func:`map_row_blocks` gives an array of ``rows`` rows and ``entries`` entries in all:
    ``kernel_threads()``, at most one per row, and 1 below ``ROW_BLOCK_MIN_ENTRIES``."""
    return 1 if entries < ROW_BLOCK_MIN_ENTRIES else max(1, min(kernel_threads(), rows))


def one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS and LAPACK single-threaded inside (``threadpoolctl``), as on a Dask worker (``OMP_NUM_THREADS=1``).

    OpenBLAS's threaded ``syrk``, ``syevd`` and ``getrf`` of matrices of side ≥ ~256 round differently from its
    single-threaded ones. CPU eigensolvers run in here, so a matrix's eigenvalues are the same bits whatever the
    process's thread settings (``zooscope analyze``, an in-process scan, a worker); they get their parallelism
    from :func:`map_row_blocks` instead. threadpoolctl lets one thread at a time control OpenBLAS's process-wide
    setting (the first to set it, usually the main thread); a limit asked for by another thread meanwhile is
    ignored, so the guarantee holds for solvers called from that thread (and on workers, where BLAS starts
    single-threaded)."""
    return _blas_controller("scipy.linalg" in sys.modules).limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=None)
def _blas_controller(scipy_linalg_loaded: bool):
    """threadpoolctl's view of the BLAS libraries loaded: numpy's, and scipy's once ``scipy.linalg`` is imported
    (finding them costs ~1 ms; limiting them through a kept controller ~20 µs)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def map_row_blocks(func: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``func(x)`` for a ``func`` that treats the rows (axis 0) of ``x`` on their own and releases the GIL (a
    LAPACK gufunc, ``np.sort`` along another axis): ``x`` is split into ``block_threads`` row blocks solved at once
    on the process's pool, and the results are concatenated, bit for bit those of one call."""
    threads = block_threads(len(x), x.size)
    if threads < 2:
        return func(x)
    return np.concatenate(list(_pool(threads).map(func, np.array_split(x, threads))))


def map_threads(func: Callable, items: list, entries: int) -> list:
    """``[func(item) for item in items]`` for a ``func`` that spends its time in LAPACK, outside the GIL: on
    ``block_threads`` threads of the process's pool, ``entries`` being the size of all the work's arrays."""
    threads = block_threads(len(items), entries)
    return [func(item) for item in items] if threads < 2 else list(_pool(threads).map(func, items))


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="zooscope-rows")
    return _POOLS[threads]


def _no_gpu_driver() -> bool:
    """True on Linux when no GPU device node exists: no GPU, known without importing torch or CuPy (seconds)."""
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DEVICE_NODES)


def gpus_hidden() -> bool:
    """True when ``CUDA_VISIBLE_DEVICES`` is set to hide every GPU (``""`` or ``-1``), as CPU workers have it."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def _common_reason() -> str | None:
    """Why no GPU library needs to be asked at all (None: ask them)."""
    if gpus_hidden():
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    if _no_gpu_driver():
        return f"no GPU device node ({', '.join(_GPU_DEVICE_NODES)})"
    return None


@functools.cache
def _probe_cupy() -> tuple[bool, str]:
    """(usable, device name or the reason it is not)."""
    reason = _common_reason()
    if reason is not None:
        _log.info("CuPy not used: %s", reason)
        return False, reason
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - any import failure (missing, wrong CUDA build) is a reason
        reason = f"CuPy import failed ({type(exc).__name__}: {exc})"
        _log.warning("GPU device node present but %s", reason)
        return False, reason
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return _not_used("CuPy", "the CUDA runtime sees no device")
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception as exc:  # noqa: BLE001 - driver/runtime errors come as several exception types
        return _not_used("CuPy", f"CUDA driver/runtime error ({type(exc).__name__}: {exc})")
    return True, name


@functools.cache
def _probe_torch_cuda() -> tuple[bool, str]:
    """(usable, device name or the reason it is not)."""
    reason = _common_reason()
    if reason is not None:
        _log.info("torch.cuda not used: %s", reason)
        return False, reason
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return _not_used("torch.cuda", f"torch import failed ({type(exc).__name__}: {exc})")
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return _not_used("torch.cuda", f"torch {torch.__version__} is a CPU-only build")
    try:
        if not torch.cuda.is_available():
            torch.cuda.init()  # raises with the driver's message where is_available() only says False
            return _not_used("torch.cuda", "torch.cuda.is_available() is False")
        return True, torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        return _not_used("torch.cuda", f"CUDA driver/runtime error ({type(exc).__name__}: {exc})")


def _not_used(library: str, reason: str) -> tuple[bool, str]:
    _log.warning("GPU device node present but %s is not usable: %s", library, reason)
    return False, reason


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (checked once; the reason it does not is logged)."""
    return _probe_cupy()[0]


def torch_cuda_available() -> bool:
    """True when torch has CUDA and a device (checked once; the reason it does not is logged)."""
    return _probe_torch_cuda()[0]


def gpu_available() -> bool:
    """True when any GPU backend (CuPy or torch.cuda) can run."""
    return cupy_available() or torch_cuda_available()


def clear_cache() -> None:
    """Forget the probes' results (after changing ``CUDA_VISIBLE_DEVICES`` in this process, e.g. in tests)."""
    _probe_cupy.cache_clear()
    _probe_torch_cuda.cache_clear()
    device_key.cache_clear()


def visible_gpus() -> list[str]:
    """The GPUs this process may hand to workers, as ``CUDA_VISIBLE_DEVICES`` entries (``["0", "1"]``, or the
    entries of this process's own ``CUDA_VISIBLE_DEVICES``, e.g. ``["2", "3"]`` or UUIDs); ``[]`` without a GPU.

    Counted by torch or CuPy only when a GPU device node exists (no library import on machines without one).
    """
    if not gpu_available():
        return []
    if cupy_available():
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    else:
        import torch

        count = torch.cuda.device_count()
    own = os.environ.get("CUDA_VISIBLE_DEVICES")
    if own is not None:
        entries = [e.strip() for e in own.split(",") if e.strip()]
        return entries[:count]
    return [str(i) for i in range(count)]


def _cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name on Linux), else ``platform.processor()`` or the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def device_key() -> str:
    """The device that eigenvalue routes run on in this process: ``"cuda:<GPU 0's name>"`` when a GPU backend is
    usable, else ``"cpu:<CPU model>"``. Routing tables are measured and looked up under this key."""
    if cupy_available():
        return f"cuda:{_probe_cupy()[1]}"
    if torch_cuda_available():
        return f"cuda:{_probe_torch_cuda()[1]}"
    return f"cpu:{_cpu_name()}"


def describe_device() -> str:
    """One line for people: the device this process computes on, with the GPU libraries that can use it, or why no
    GPU is used (e.g. ``"GPU NVIDIA H100 80GB HBM3 (CuPy, torch.cuda)"``,
    ``"CPU Intel(R) Xeon(R) ... (16 cores); no GPU: no GPU device node (/dev/nvidiactl, ...)"``)."""
    if gpu_available():
        libraries = [name for name, ok in (("CuPy", cupy_available()), ("torch.cuda", torch_cuda_available())) if ok]
        notes = [f"{name}: {probe()[1]}" for name, probe in (("CuPy", _probe_cupy), ("torch.cuda", _probe_torch_cuda))
                 if not probe()[0]]
        return (f"GPU {device_key().removeprefix('cuda:')} ({', '.join(libraries)})"
                + (f"; not usable: {'; '.join(notes)}" if notes else ""))
    cupy_reason, torch_reason = _probe_cupy()[1], _probe_torch_cuda()[1]
    why = cupy_reason if cupy_reason == torch_reason else f"CuPy: {cupy_reason}; torch.cuda: {torch_reason}"
    return f"CPU {_cpu_name()} ({os.cpu_count()} cores); no GPU: {why}"


def release_gpu_pools(keep_bytes: int = POOL_KEEP_BYTES) -> None:
    """Hand the free blocks of CuPy's and torch's caching allocators back to the driver when they hold more than
    ``keep_bytes``, so that the two pools of one worker do not each keep the largest bucket's memory.

    Only libraries already imported and usable are touched (never imports one, never creates a CUDA context).
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None and cupy_available():
        pool = cupy.get_default_memory_pool()
        if pool.total_bytes() - pool.used_bytes() > keep_bytes:
            pool.free_all_blocks()
        pinned = cupy.get_default_pinned_memory_pool()
        if pinned.n_free_blocks():
            pinned.free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch_cuda_available():
        if torch.cuda.memory_reserved() - torch.cuda.memory_allocated() > keep_bytes:
            torch.cuda.empty_cache()
