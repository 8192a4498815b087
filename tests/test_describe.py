"""zooscope.describe / `zooscope describe`: the layer plan from shapes only, against WeightWatcher's describe(),
and on a synthetic 70B-parameter sharded checkpoint whose tensors are never read."""
import json
import logging
import struct
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ww_module = pytest.importorskip("weightwatcher")

import zooscope  # noqa: E402
from zooscope.cli import main  # noqa: E402
from zooscope.pipelines import readers  # noqa: E402
from test_ww_compat import _cnn, _mlp  # noqa: E402


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_describe_matches_weightwatcher(make):
    """Same layers, ids, types, rf and sides; WeightWatcher's N/M swap on wide Conv2D slices (and the num_evals
    it makes from the swapped M) is its bug #1 in docs/DIFFERENCES.md."""
    model = make()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = ww_module.WeightWatcher(model=model).describe(min_evals=10).set_index("longname")
    ours = zooscope.describe(model, min_evals=10)
    ours = ours[ours["skip_reason"] == ""].set_index("name")
    assert list(ours.index) == list(theirs.index)
    for column in ("layer_id", "layer_type", "rf"):
        assert list(ours[column]) == list(theirs[column]), column
    np.testing.assert_array_equal(ours["N"], theirs[["N", "M"]].max(axis=1))
    np.testing.assert_array_equal(ours["M"], theirs[["N", "M"]].min(axis=1))
    straight = theirs["N"] >= theirs["M"]
    np.testing.assert_array_equal(ours["num_evals"][straight], theirs["num_evals"][straight])
    np.testing.assert_array_equal(ours["num_evals"], ours["M"] * ours["rf"])


def _write_header_only_shard(path, tensors):
    """A safetensors shard whose header declares ``tensors`` (name -> shape, bf16); the data is a sparse hole."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)


@pytest.fixture
def llama70b(tmp_path):
    """Llama-2-70B's tensor shapes in 4 shards with an index json (about 69e9 parameters, nothing stored)."""
    d, hidden, ffn, kv, layers, vocab = tmp_path / "llama-70b", 8192, 28672, 1024, 80, 32000
    d.mkdir()
    shards = [{} for _ in range(4)]
    shards[0]["model.embed_tokens.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[i * 4 // layers].update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,)})
    shards[3]["lm_head.weight"] = (vocab, hidden)
    weight_map = {}
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00004.safetensors"
        _write_header_only_shard(d / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    n_params = sum(int(np.prod(s)) for t in shards for s in t.values())
    assert n_params > 68e9
    return d


def test_describe_reads_no_tensor_of_a_70b_checkpoint(llama70b, monkeypatch, capsys):
    def no_read(self, key):
        raise AssertionError(f"describe read tensor {key}")

    monkeypatch.setattr(readers._SafetensorsShard, "read", no_read)
    started = time.perf_counter()
    plan = zooscope.describe(str(llama70b)).set_index("name")
    assert time.perf_counter() - started < 10
    assert len(plan) == 2 + 80 * 8
    q = plan.loc["model.layers.79.self_attn.q_proj"]
    assert (q.layer_type, q.N, q.M, q.rf, q.num_evals, q.skip_reason) == ("dense", 8192, 8192, 1, 8192, "")
    down = plan.loc["model.layers.0.mlp.down_proj"]
    assert (down.N, down.M, down.Q, down["shape"]) == (28672, 8192, 3.5, (8192, 28672))
    assert plan.loc["model.embed_tokens", "layer_type"] == "embedding"
    assert plan.loc["lm_head", "skip_reason"] == ""
    assert plan.loc["model.layers.3.input_layernorm", "skip_reason"].startswith("1-D tensor")
    assert (plan["skip_reason"] == "").sum() == 2 + 80 * 7
    small = zooscope.describe(str(llama70b), max_evals=2000, max_N=20000).set_index("name")
    assert small.loc["model.layers.0.mlp.down_proj", "skip_reason"] == "M*rf=8192 > max_evals=2000"
    assert small.loc["model.layers.0.self_attn.k_proj", "skip_reason"] == ""

    assert main(["describe", str(llama70b), "--analysed", "--max-evals", "2000"]) == 0
    out = capsys.readouterr().out
    assert "160 layers analysed, 482 weights skipped" in out and "k_proj" in out and "down_proj" not in out


def test_describe_cli_errors(tmp_path, capsys):
    assert main(["describe", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unknown option 'bogus'"):
        zooscope.describe(_mlp(), bogus=1)
