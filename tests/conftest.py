"""Shared pytest configuration: GPU tests skip cleanly on machines without one."""
import pytest

from zooscope.kernels.backends import gpu_available

requires_gpu = pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU (CuPy or torch.cuda)")


@pytest.fixture(autouse=True)
def _isolated_zooscope_home(tmp_path_factory, monkeypatch):
    """No test sees a routing table saved on this machine by `zooscope bench svd --tune` (nor writes one)."""
    monkeypatch.setenv("ZOOSCOPE_HOME", str(tmp_path_factory.getbasetemp() / "zooscope-home"))


def heavy_tailed_(module, seed: int):
    """Give every weight of a torch module Student-t(3) entries (ESDs with power-law tails, as trained layers have);
    returns the module."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                chi = torch.randn((*p.shape, 3), generator=gen, dtype=torch.float64).pow(2).sum(-1)
                p.copy_((z / torch.sqrt(chi / 3.0) / np.sqrt(p.shape[-1])).to(p.dtype))
    return module
