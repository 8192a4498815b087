"""Shared pytest configuration: GPU tests skip cleanly on machines without one."""
import pytest

from zooscope.kernels.backends import gpu_available

requires_gpu = pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU (CuPy or torch.cuda)")
