"""Shared pytest configuration: GPU tests skip cleanly on machines without one."""
import pytest

from zooscope.kernels.backends import gpu_available

requires_gpu = pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU (CuPy or torch.cuda)")


@pytest.fixture(autouse=True)
def _isolated_zooscope_home(tmp_path_factory, monkeypatch):
    """No test sees a routing table saved on this machine by `zooscope bench svd --tune` (nor writes one)."""
    monkeypatch.setenv("ZOOSCOPE_HOME", str(tmp_path_factory.getbasetemp() / "zooscope-home"))
