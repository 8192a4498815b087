"""Keras 3 files (written by Keras itself, torch backend) read with h5py, against Keras' own API and against
zooscope.analyze / WeightWatcher on the equivalent torch model.

Tolerances: weights are compared exactly (the reader only transposes); metrics to 1e-6 relative.
"""
import logging
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch")
pytest.importorskip("h5py")
keras = pytest.importorskip("keras")
ww_module = pytest.importorskip("weightwatcher")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope.pipelines.layers import layer_matrices, plan_layers  # noqa: E402
from zooscope.pipelines.readers import CheckpointError, open_checkpoint  # noqa: E402

RTOL = 1e-6
METRICS = ["alpha", "D", "xmin", "sigma", "num_pl_spikes", "lambda_max", "norm", "log_norm", "log_spectral_norm",
           "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "num_evals", "rf", "N", "M"]
# Keras kernel -> PyTorch weight, written independently of the reader: Dense (in,out), Conv1D (k,in,out),
# Conv2D (kh,kw,in,out), Embedding (vocab,dim)
TO_TORCH = {"fc": lambda k: k.T, "conv1": lambda k: k.transpose(2, 1, 0), "conv2": lambda k: k.transpose(3, 2, 0, 1),
            "embed": lambda k: k}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(200, 32)
        self.conv2 = torch.nn.Conv2d(8, 24, 3)
        self.conv1 = torch.nn.Conv1d(12, 20, 3)
        self.fc = torch.nn.Linear(64, 48)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch model, Keras model with the same weights, {suffix: file written by Keras})."""
    net = heavy_tailed_(_Net(), seed=7)
    inputs = [keras.Input((10,), dtype="int32"), keras.Input((12, 12, 8)), keras.Input((16, 12)), keras.Input((64,))]
    layers = [keras.layers.Embedding(200, 32, name="embed"), keras.layers.Conv2D(24, 3, name="conv2"),
              keras.layers.Conv1D(20, 3, name="conv1"), keras.layers.Dense(48, name="fc")]
    model = keras.Model(inputs, [layer(x) for layer, x in zip(layers, inputs)])
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    model.get_layer("embed").set_weights([sd["embed.weight"]])
    model.get_layer("conv2").set_weights([sd["conv2.weight"].transpose(2, 3, 1, 0), sd["conv2.bias"]])
    model.get_layer("conv1").set_weights([sd["conv1.weight"].transpose(2, 1, 0), sd["conv1.bias"]])
    model.get_layer("fc").set_weights([sd["fc.weight"].T, sd["fc.bias"]])
    d = tmp_path_factory.mktemp("keras")
    files = {".keras": d / "net.keras", ".h5": d / "net.h5", ".weights.h5": d / "net.weights.h5"}
    model.save(files[".keras"])
    model.save(files[".h5"])
    model.save_weights(files[".weights.h5"])
    return net, model, files


@pytest.mark.parametrize("kind", [".keras", ".h5", ".weights.h5"])
def test_weights_equal_keras_api_in_torch_layout(models, kind):
    net, model, files = models
    with open_checkpoint(files[kind]) as ckpt:
        assert ckpt.format == "keras"
        types = ckpt.module_types()
        assert {k: types[k] for k in TO_TORCH} == {"fc": "Dense", "conv1": "Conv1D", "conv2": "Conv2D",
                                                   "embed": "Embedding"}
        for name, to_torch in TO_TORCH.items():
            kernel = model.get_layer(name).get_weights()[0]  # Keras' own API
            got = ckpt.read(f"{name}.weight")
            assert ckpt.shape(f"{name}.weight") == got.shape == net.get_parameter(f"{name}.weight").shape
            np.testing.assert_array_equal(got, to_torch(kernel))
            np.testing.assert_array_equal(got, net.get_parameter(f"{name}.weight").detach().numpy())
        np.testing.assert_array_equal(ckpt.read("fc.bias"), model.get_layer("fc").get_weights()[1])
        plan = {info.name: info for info in plan_layers(ckpt)}
        assert {n: plan[n].layer_type for n in TO_TORCH} == {"fc": "dense", "conv1": "conv1d", "conv2": "conv2d",
                                                             "embed": "embedding"}
        # Conv2D slices: WeightWatcher's Keras path takes kernel[i, j, :, :] (in, out): the transpose of our
        # (out, in) slice, in the same order
        kernel = model.get_layer("conv2").get_weights()[0]
        (stack,) = layer_matrices(ckpt.read("conv2.weight"), plan["conv2"], conv2d_norm=False)
        np.testing.assert_array_equal(stack, np.stack([kernel[i, j].T for i in range(3) for j in range(3)]))


@pytest.mark.parametrize("kind", [".keras", ".h5"])
def test_metrics_equal_the_torch_model(models, kind):
    net, _, files = models
    ours = zooscope.analyze(str(files[kind])).set_index("name")
    theirs = zooscope.analyze(net).set_index("name")
    assert sorted(ours.index) == sorted(theirs.index) == sorted(TO_TORCH)
    for column in METRICS:
        np.testing.assert_allclose(ours.loc[theirs.index, column].to_numpy(float), theirs[column].to_numpy(float),
                                   rtol=RTOL, err_msg=column)


def test_metrics_equal_weightwatcher_on_the_torch_model(models):
    """WeightWatcher on the equivalent torch model (its Keras path needs TensorFlow); Conv1D left out: WeightWatcher
    does not slice 3-D kernels (docs/DIFFERENCES.md)."""
    net, _, files = models
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = ww_module.WeightWatcher(model=net).analyze(min_evals=10).set_index("longname")
    ours = zooscope.analyze(str(files[".keras"]), ww_compat=True).set_index("longname")
    names = ["embed", "conv2", "fc"]
    for column in ["alpha", "D", "xmin", "lambda_max", "log_norm", "log_spectral_norm", "alpha_weighted",
                   "stable_rank", "num_evals", "rf"]:
        np.testing.assert_allclose(ours.loc[names, column].to_numpy(float),
                                   theirs.loc[names, column].to_numpy(float), rtol=RTOL, err_msg=column)


def test_bad_and_unreadable_keras_files(tmp_path, monkeypatch, models):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"not a zip, not hdf5")
    with pytest.raises(CheckpointError, match="broken.keras.*cannot open as a Keras/HDF5 file"):
        open_checkpoint(bad)
    import zipfile
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as zf:
        zf.writestr("config.json", "{}")
    with pytest.raises(CheckpointError, match="no model.weights.h5"):
        open_checkpoint(tmp_path / "empty.keras")
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)
    with pytest.raises(CheckpointError, match=r"net.keras.*pip install 'zooscope\[keras\]'"):
        open_checkpoint(models[2][".keras"])
