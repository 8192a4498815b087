"""Flax msgpack checkpoints against the arrays written and against zooscope.analyze of the equivalent torch model.
Weights compared exactly; metrics to 1e-6 relative.

The files: written by the real ``flax.serialization.to_bytes`` (JAX arrays, chunked) and shipped in ``tests/data``
with the numpy-written reference arrays (``tests/data/make_flax_fixtures.py``, flax 0.12.8 / jax 0.10.2: rerun it
to check a newer Flax), so they are tested without Flax; and written here by msgpack with flax's ndarray encoding
(ext type 1 = packb((shape, dtype name, bytes))).
"""
from pathlib import Path

import numpy as np
import pytest

msgpack = pytest.importorskip("msgpack")
torch = pytest.importorskip("torch")

import zooscope  # noqa: E402
from zooscope.pipelines.layers import plan_layers  # noqa: E402
from zooscope.pipelines.readers import CheckpointError, open_checkpoint  # noqa: E402

METRICS = ["alpha", "D", "xmin", "lambda_max", "log_norm", "log_spectral_norm", "alpha_weighted", "stable_rank",
           "entropy", "num_evals", "rf", "N", "M"]


DATA = Path(__file__).parent / "data"


def _reference(group: str) -> dict:
    """The tree ``group`` (``state`` or ``bf16``) of ``flax_state.npz`` (numpy-written), nested again; 0-d arrays
    become Python ints as in the tree Flax serialised."""
    tree: dict = {}
    with np.load(DATA / "flax_state.npz") as npz:
        for key in npz.files:
            head, *path = key.split("/")
            if head != group:
                continue
            node = tree
            for name in path[:-1]:
                node = node.setdefault(name, {})
            value = npz[key]
            node[path[-1]] = int(value) if value.ndim == 0 else value
    return tree


def _state() -> dict:
    return _reference("state")


def _spec_bytes(state) -> bytes:
    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")), use_bin_type=True))
        return x
    return msgpack.packb(state, default=ext, strict_types=True)


@pytest.fixture(params=["flax", "msgpack"])
def written(request, tmp_path):
    state = _state()
    if request.param == "flax":  # Flax's own bytes (kernels stored as chunked arrays), shipped
        return DATA / "flax_state.msgpack", state
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(_spec_bytes(state))
    return path, state


def test_arrays_in_torch_layout(written):
    path, state = written
    p = state["params"]
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "flax"
        assert ckpt.module_types() == {"params.Dense_0": "Dense", "params.Conv_0": "Conv",
                                       "params.Embed_0": "Embedding", "params.attn.query": "DenseGeneral"}
        np.testing.assert_array_equal(ckpt.read("params.Dense_0.weight"), p["Dense_0"]["kernel"].T)
        np.testing.assert_array_equal(ckpt.read("params.Conv_0.weight"), p["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(ckpt.read("params.Embed_0.weight"), p["Embed_0"]["embedding"].astype(np.float32))
        assert ckpt.dtype("params.Embed_0.weight") == "float16" and ckpt.shape("params.Conv_0.weight") == (24, 8, 3, 3)
        np.testing.assert_array_equal(ckpt.read("params.Dense_0.bias"), p["Dense_0"]["bias"])
        # optimizer moments keep their names: never analysed as layers
        assert "opt_state.0.mu.Dense_0.kernel" in ckpt.keys()
        plan = {i.name: i for i in plan_layers(ckpt)}
        assert plan["params.attn.query"].skip_reason == "3-D weight of a DenseGeneral module"


def test_metrics_equal_the_torch_model(written):
    path, state = written
    p = state["params"]
    net = torch.nn.Module()
    net.dense = torch.nn.Linear(64, 48)
    net.conv = torch.nn.Conv2d(8, 24, 3)
    with torch.no_grad():
        net.dense.weight.copy_(torch.from_numpy(p["Dense_0"]["kernel"].T.copy()))
        net.conv.weight.copy_(torch.from_numpy(p["Conv_0"]["kernel"].transpose(3, 2, 0, 1).copy()))
    ours = zooscope.analyze(str(path)).set_index("name")
    theirs = zooscope.analyze(net).set_index("name")
    for mine, torch_name in (("params.Dense_0", "dense"), ("params.Conv_0", "conv")):
        np.testing.assert_allclose(ours.loc[mine, METRICS].to_numpy(float),
                                   theirs.loc[torch_name, METRICS].to_numpy(float), rtol=1e-6, err_msg=mine)


def test_bad_msgpack_files(tmp_path):
    data = _spec_bytes(_state())
    (tmp_path / "cut.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.msgpack.*truncated"):
        open_checkpoint(tmp_path / "cut.msgpack")
    (tmp_path / "list.msgpack").write_bytes(msgpack.packb([1, 2, 3]))
    with pytest.raises(CheckpointError, match="list.msgpack.*root is not a map"):
        open_checkpoint(tmp_path / "list.msgpack")


def test_bfloat16_written_by_jax():
    """A bfloat16 JAX array as Flax stores it (dtype name ``bfloat16``): read widened to float32, exactly."""
    kernel = _reference("bf16")["params"]["Dense_0"]["kernel"]
    with open_checkpoint(DATA / "flax_bf16.msgpack") as ckpt:
        assert ckpt.keys() == ["params.Dense_0.weight"] and ckpt.dtype("params.Dense_0.weight") == "bfloat16"
        np.testing.assert_array_equal(ckpt.read("params.Dense_0.weight"), kernel.T)
    assert kernel.dtype == np.float32 and np.array_equal(kernel.view(np.uint32) & 0xFFFF, np.zeros_like(
        kernel, np.uint32))  # the reference holds bfloat16 values
