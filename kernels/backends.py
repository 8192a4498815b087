"""Which compute devices exist. GPU libraries are imported lazily, never at module import."""
from __future__ import annotations

import functools
import os
import sys

#: Device nodes of which at least one exists on a Linux machine with an NVIDIA driver (``/dev/dxg``: WSL2).
_NVIDIA_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


class BackendUnavailable(RuntimeError):
    """The requested backend needs a library or device that this machine lacks."""


def _no_nvidia_driver() -> bool:
    """True on Linux when no NVIDIA device node exists: no CUDA, known without importing torch or CuPy (seconds)."""
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _NVIDIA_DEVICE_NODES)


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    if _no_nvidia_driver():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@functools.cache
def torch_cuda_available() -> bool:
    """True when torch imports and ``torch.cuda.is_available()``."""
    if _no_nvidia_driver():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def gpu_available() -> bool:
    """True when any GPU backend (CuPy or torch.cuda) can run."""
    return cupy_available() or torch_cuda_available()
