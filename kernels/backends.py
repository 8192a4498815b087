"""Which compute devices exist. GPU libraries are imported lazily, never at module import."""
from __future__ import annotations

import functools
import os
import sys

#: Device nodes of which at least one exists on a Linux machine with a GPU driver that torch or CuPy can use:
#: NVIDIA's, WSL2's (``/dev/dxg``) and ROCm's (``/dev/kfd``; torch.cuda and CuPy run on ROCm builds too).
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


class BackendUnavailable(RuntimeError):
    """The requested backend needs a library or device that this machine lacks."""


def _no_gpu_driver() -> bool:
    """True on Linux when no GPU device node exists: no GPU, known without importing torch or CuPy (seconds)."""
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DEVICE_NODES)


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _no_gpu_driver():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@functools.cache
def torch_cuda_available() -> bool:
    """True when torch imports and ``torch.cuda.is_available()``."""
    if _no_gpu_driver():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def gpu_available() -> bool:
    """True when any GPU backend (CuPy or torch.cuda) can run."""
    return cupy_available() or torch_cuda_available()
