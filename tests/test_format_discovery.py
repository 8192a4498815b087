"""The new formats in discovery, hashing and a scan: a directory holding an ONNX model with external data, a
GGUF file and a Flax msgpack file is three models, each hashed over all its files and scanned into the store
with the layers zooscope.analyze finds in it."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
gguf = pytest.importorskip("gguf")
msgpack = pytest.importorskip("msgpack")

import zooscope  # noqa: E402
from zooscope.engine.scan import scan  # noqa: E402
from zooscope.engine.store import ZooStore  # noqa: E402
from zooscope.pipelines.readers import content_hash, discover, is_checkpoint_file  # noqa: E402


def _onnx(path, w):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W")])
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="onnx_weights.bin",
                    size_threshold=0)


@pytest.fixture
def zoo(tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "zoo"
    d.mkdir()
    _onnx(d / "net.onnx", rng.standard_t(3, (48, 32)).astype(np.float32))
    writer = gguf.GGUFWriter(str(d / "llm.gguf"), "llama")
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rng.standard_t(3, (64, 256)).astype(np.float32),
                                                                 gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kernel = rng.standard_t(3, (40, 24)).astype(np.float32)
    packed = msgpack.ExtType(1, msgpack.packb((kernel.shape, "float32", kernel.tobytes()), use_bin_type=True))
    (d / "flax.msgpack").write_bytes(msgpack.packb({"params": {"Dense_0": {"kernel": packed}}}))
    return d


def test_discover_and_hash(zoo):
    assert all(is_checkpoint_file(zoo / n) for n in ("net.onnx", "llm.gguf", "flax.msgpack"))
    found = discover(zoo)
    assert [(s.model_id, s.path.rsplit("/", 1)[-1]) for s in found] == [
        ("flax", "flax.msgpack"), ("llm", "llm.gguf"), ("net", "net.onnx")]  # onnx_weights.bin is net.onnx's
    before = content_hash(zoo / "net.onnx")
    data = (zoo / "onnx_weights.bin").read_bytes()
    (zoo / "onnx_weights.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_hash(zoo / "net.onnx") != before


def test_scan_stores_the_layers_analyze_finds(zoo, tmp_path):
    report = scan([zoo], tmp_path / "zoo.zarr", progress=False)
    assert (report.n_ok, report.n_error) == (3, 0), report.failed
    with ZooStore.open(str(tmp_path / "zoo.zarr")) as store:
        models = store.models().set_index("model_id")
        layers = store.layers()
        for model_id, file, name in (("net", "net.onnx", "W"), ("llm", "llm.gguf", "blk.0.attn_q"),
                                     ("flax", "flax.msgpack", "params.Dense_0")):
            row = layers[layers["model_row"] == models.index.get_loc(model_id)]
            direct = zooscope.analyze(str(zoo / file))
            assert list(row["name"]) == list(direct["name"]) == [name]
            np.testing.assert_allclose(row["alpha"].to_numpy(), direct["alpha"].to_numpy(), rtol=1e-12)
