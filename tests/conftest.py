"""Shared pytest configuration: GPU tests skip cleanly on machines without the capability they use.

One marker per capability, so that a half-equipped host (torch.cuda without CuPy, or CuPy without a CUDA torch)
skips what it cannot run instead of failing: ``requires_cupy`` (CuPy and a CUDA device), ``requires_torch_cuda``
(torch with CUDA and a device), ``requires_gpu`` (either). The reason a GPU is not usable is in the skip message.
"""
import pytest

from zooscope.kernels.backends import cupy_available, describe_device, gpu_available, torch_cuda_available

requires_gpu = pytest.mark.skipif(not gpu_available(), reason=f"needs a CUDA GPU: {describe_device()}")
requires_cupy = pytest.mark.skipif(not cupy_available(), reason=f"needs CuPy and a CUDA device: {describe_device()}")
requires_torch_cuda = pytest.mark.skipif(not torch_cuda_available(),
                                         reason=f"needs torch with CUDA and a device: {describe_device()}")


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
