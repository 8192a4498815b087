"""ONNX files from torch.onnx.export (and one built with onnx.helper) against the torch weights and
zooscope.analyze of the torch module. Weights compared exactly; metrics to 1e-6 relative."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope.pipelines.readers import CheckpointError, content_hash, model_files, open_checkpoint  # noqa: E402

RTOL = 1e-6
METRICS = ["alpha", "D", "xmin", "sigma", "num_pl_spikes", "lambda_max", "norm", "log_norm", "log_spectral_norm",
           "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "num_evals", "rf", "N", "M"]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 24, 3)
        self.conv1d = torch.nn.Conv1d(6, 16, 3)
        self.fc1 = torch.nn.Linear(24, 64)
        self.fc2 = torch.nn.Linear(64, 40)

    def forward(self, x, s):
        y = self.conv(x).mean(dim=(2, 3)) + self.conv1d(s).mean(dim=2).sum()
        return self.fc2(torch.relu(self.fc1(y)))


def _export(model, args, path):
    torch.onnx.export(model, args, str(path), dynamo=False)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = heavy_tailed_(_Net(), seed=3).eval()
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    return net, _export(net, (torch.randn(2, 8, 10, 10), torch.randn(2, 6, 12)), path)


def test_gemm_and_conv_weights_are_the_torch_weights(exported):
    net, path = exported
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "onnx"
        for key, param in net.state_dict().items():
            assert ckpt.shape(key) == tuple(param.shape)
            np.testing.assert_array_equal(ckpt.read(key), param.numpy())
        types = ckpt.module_types()
        assert {k: types[k] for k in ("conv", "conv1d", "fc1", "fc2")} == {
            "conv": "Conv", "conv1d": "Conv", "fc1": "Linear", "fc2": "Linear"}


def test_metrics_equal_the_torch_model(exported):
    net, path = exported
    ours = zooscope.analyze(str(path)).set_index("name")
    theirs = zooscope.analyze(net).set_index("name")
    assert sorted(ours.index) == sorted(theirs.index) == ["conv", "conv1d", "fc1", "fc2"]
    for column in METRICS:
        np.testing.assert_allclose(ours.loc[theirs.index, column].to_numpy(float), theirs[column].to_numpy(float),
                                   rtol=RTOL, err_msg=column)


def test_matmul_weight_is_transposed_to_out_in(tmp_path):
    """A Linear on a 3-D input exports as MatMul with the (in, out) transpose of the weight as initializer."""
    fc = heavy_tailed_(torch.nn.Linear(16, 40, bias=False), seed=4)
    path = _export(fc, (torch.randn(2, 5, 16),), tmp_path / "matmul.onnx")
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node] == ["MatMul"]
    assert list(graph.initializer[0].dims) == [16, 40]
    with open_checkpoint(path) as ckpt:
        (key,) = ckpt.keys()
        assert key.endswith(".weight") and ckpt.module_types()[key[: -len(".weight")]] == "Linear"
        assert ckpt.shape(key) == (40, 16)
        np.testing.assert_array_equal(ckpt.read(key), fc.weight.detach().numpy())


def _gemm_model(path, w, trans_b, external):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[1] if trans_b else w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=trans_b)
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_and_external_data(tmp_path, trans_b):
    w_torch = np.random.default_rng(0).standard_normal((30, 12)).astype(np.float32)  # (out, in)
    stored = w_torch if trans_b else w_torch.T
    path = _gemm_model(tmp_path / "gemm.onnx", np.ascontiguousarray(stored), trans_b, external=True)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == ["W.weight"] and ckpt.shape("W.weight") == (30, 12)
        np.testing.assert_array_equal(ckpt.read("W.weight"), w_torch)
    assert [f.name for f in model_files(path)] == ["gemm.onnx", "weights.bin"]
    before = content_hash(path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")  # same graph file, other weights
    assert content_hash(path) != before
    data.write_bytes(data.read_bytes()[:100])
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match="gemm.onnx.*W.weight"):
        ckpt.read("W.weight")


def test_bad_onnx_file_and_missing_extra(tmp_path, monkeypatch, exported):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="bad.onnx.*cannot parse as an ONNX model"):
        open_checkpoint(bad)
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(CheckpointError, match=r"net.onnx.*pip install 'zooscope\[onnx\]'"):
        open_checkpoint(exported[1])
