"""Which compute devices exist. GPU libraries are imported lazily, never at module import."""
from __future__ import annotations

import functools


class BackendUnavailable(RuntimeError):
    """The requested backend needs a library or device that this machine lacks."""


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@functools.cache
def torch_cuda_available() -> bool:
    """True when torch imports and ``torch.cuda.is_available()``."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def gpu_available() -> bool:
    """True when any GPU backend (CuPy or torch.cuda) can run."""
    return cupy_available() or torch_cuda_available()
