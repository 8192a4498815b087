"""GGUF files written by gguf's own GGUFWriter, read lazily and dequantized in row blocks; the values are compared
exactly with gguf's reference dequantizer on the whole tensor, and unquantized types with the arrays written."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from zooscope.pipelines import gguf_reader  # noqa: E402
from zooscope.pipelines.layers import plan_layers  # noqa: E402
from zooscope.pipelines.readers import CheckpointError, open_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
SHAPE = (48, 512)  # numpy (rows, columns): ggml stores it as ne = [512, 48]
# Q4_K / Q6_K have no quantizer in gguf: random blocks with finite fp16 scales at their byte offsets
RAW_BLOCKS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def _tensors() -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(SHAPE).astype(np.float32)
    out = {"blk.0.f32.weight": (a, Q.F32), "blk.0.f16.weight": (a.astype(np.float16), Q.F16)}
    for name, qtype in (("bf16", Q.BF16), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        out[f"blk.0.{name}.weight"] = (gguf.quants.quantize(a, qtype), qtype)
    for qtype, scale_offsets in RAW_BLOCKS.items():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (SHAPE[0], SHAPE[1] // block, size), dtype=np.uint8)
        for off in scale_offsets:
            raw[:, :, off: off + 2] = rng.uniform(0.01, 0.1, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
        out[f"blk.0.{qtype.name.lower()}.weight"] = (raw.reshape(SHAPE[0], -1), qtype)
    out["token_embd.weight"] = (rng.standard_normal((300, 64)).astype(np.float32), Q.F32)
    out["blk.0.ffn_gate_exps.weight"] = (rng.standard_normal((4, 32, 64)).astype(np.float32), Q.F32)
    out["blk.0.attn_norm.weight"] = (rng.standard_normal(64).astype(np.float32), Q.F32)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    tensors = _tensors()
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (arr, qtype) in tensors.items():
        writer.add_tensor(name, arr, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def test_shapes_are_numpy_order(written):
    path, tensors = written
    reader = gguf.GGUFReader(str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "gguf" and ckpt.keys() == list(tensors)
        for t in reader.tensors:
            expected = tensors[t.name][0].shape if t.tensor_type in (Q.F32, Q.F16) else SHAPE
            assert ckpt.shape(t.name) == tuple(expected) == tuple(int(d) for d in t.shape[::-1])
            assert ckpt.nbytes(t.name) == t.n_bytes
        assert ckpt.dtype("blk.0.f16.weight") == "float16" and ckpt.dtype("blk.0.q4_k.weight") == "float32"


def test_dequantized_exactly_as_gguf_in_row_blocks(written, monkeypatch):
    path, tensors = written
    monkeypatch.setattr(gguf_reader, "_ROWS_BYTES", 1000)  # several blocks of rows per tensor
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(data.nbytes) or real(data, qtype))
    reader = gguf.GGUFReader(str(path))
    with open_checkpoint(path) as ckpt:
        for t in reader.tensors:
            got = ckpt.read(t.name)
            assert got.shape == ckpt.shape(t.name) and got.dtype == np.float32
            np.testing.assert_array_equal(got, real(t.data, t.tensor_type).reshape(got.shape), err_msg=t.name)
    assert calls and max(calls) <= 2 * 1000 and len(calls) > len(RAW_BLOCKS) + 3  # never a whole quantized tensor
    with open_checkpoint(path) as ckpt:
        np.testing.assert_array_equal(ckpt.read("blk.0.f32.weight"), tensors["blk.0.f32.weight"][0])
        np.testing.assert_array_equal(ckpt.read("blk.0.f16.weight"), tensors["blk.0.f16.weight"][0].astype(np.float32))
        a = tensors["blk.0.f32.weight"][0]
        np.testing.assert_allclose(ckpt.read("blk.0.bf16.weight"), a, rtol=2.0 ** -8)
        np.testing.assert_allclose(ckpt.read("blk.0.q8_0.weight"), a, atol=np.abs(a).max() / 127)


def test_layer_plan(written):
    with open_checkpoint(written[0]) as ckpt:
        plan = {info.name: info for info in plan_layers(ckpt)}
    assert plan["token_embd"].layer_type == "embedding"
    assert plan["blk.0.q4_k"].layer_type == "dense" and plan["blk.0.q4_k"].skip_reason is None
    assert (plan["blk.0.q6_k"].N, plan["blk.0.q6_k"].M) == (512, 48)
    assert plan["blk.0.ffn_gate_exps"].skip_reason == "3-D weight of a Experts module"
    assert plan["blk.0.attn_norm"].skip_reason.startswith("1-D tensor")


def test_bad_gguf_and_missing_extra(tmp_path, monkeypatch, written):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="bad.gguf.*cannot parse as a GGUF file"):
        open_checkpoint(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(written[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        open_checkpoint(truncated)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(CheckpointError, match=r"model.gguf.*pip install 'zooscope\[gguf\]'"):
        open_checkpoint(written[0])
