"""Checkpoint readers on files written here: every format, dtype widening, laziness, bad input, discovery, hashing."""
import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zooscope.pipelines import readers
from zooscope.pipelines.readers import CheckpointError, ModelSource, content_hash, discover, is_checkpoint_file, \
    open_checkpoint


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.fc1.weight": torch.randn(12, 7, generator=g).to(torch.bfloat16),
        "enc.fc1.bias": torch.randn(12, generator=g).to(torch.float16),
        "enc.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "head.weight": torch.randn(5, 12, generator=g, dtype=torch.float64),
        "step": torch.tensor([3, 4], dtype=torch.int64),
    }


def _expected(t: torch.Tensor) -> np.ndarray:
    """torch's own conversion: half types widened to float32."""
    return t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def _assert_reads(ckpt, tensors):
    assert sorted(ckpt.keys()) == sorted(tensors)
    for k, t in tensors.items():
        assert ckpt.shape(k) == tuple(t.shape)
        assert ckpt.dtype(k) == str(t.dtype).removeprefix("torch.")
        assert ckpt.nbytes(k) == t.numel() * t.element_size()
        a = ckpt.read(k)
        ref = _expected(t)
        assert a.dtype == ref.dtype and a.shape == ref.shape
        np.testing.assert_array_equal(a, ref)


def test_safetensors_file_all_dtypes(tmp_path):
    tensors = _tensors()
    f = tmp_path / "m.safetensors"
    save_file(tensors, f)
    with open_checkpoint(f) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.path == str(f)
        _assert_reads(ckpt, tensors)
        assert ckpt.read("enc.fc1.weight").dtype == np.float32  # bf16 -> float32
        assert all(ckpt.shard_of(k) == str(f) for k in ckpt.keys())
        assert ckpt.module_types() == {}
        # the independent reader agrees on every tensor, incl. bf16 (via torch)
        with safe_open(f, framework="pt") as ref:
            for k in ref.keys():
                np.testing.assert_array_equal(ckpt.read(k), _expected(ref.get_tensor(k)))


def _write_sharded_st(d, tensors, with_index=True):
    d.mkdir()
    keys = list(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, d / name)
    if with_index:
        weight_map = {k: name for name, ks in shards.items() for k in ks}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def test_sharded_safetensors_dir_reads_one_shard(tmp_path):
    tensors = _tensors()
    d = tmp_path / "hf"
    shards = _write_sharded_st(d, tensors)
    with open_checkpoint(d) as ckpt:
        _assert_reads(ckpt, tensors)
        # keys grouped by shard in shard-name order
        assert ckpt.keys() == [k for name in sorted(shards) for k in shards[name]]
        assert ckpt.shard_of("head.weight") == str(d / "model-00002-of-00002.safetensors")
    # only the shard holding a tensor is touched: with shard 2 gone, shard 1's tensors still read
    (d / "model-00002-of-00002.safetensors").unlink()
    with open_checkpoint(d) as ckpt:
        assert len(ckpt.keys()) == len(tensors)
        k1 = shards["model-00001-of-00002.safetensors"][0]
        np.testing.assert_array_equal(ckpt.read(k1), _expected(tensors[k1]))
        with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors") as err:
            ckpt.read("head.weight")
        assert err.value.tensor == "head.weight"


def test_safetensors_dir_without_index(tmp_path):
    tensors = _tensors()
    d = tmp_path / "hf"
    _write_sharded_st(d, tensors, with_index=False)
    with open_checkpoint(d) as ckpt:
        _assert_reads(ckpt, tensors)
    d1 = tmp_path / "one"
    d1.mkdir()
    save_file(tensors, d1 / "model.safetensors")
    with open_checkpoint(d1) as ckpt:
        _assert_reads(ckpt, tensors)


@pytest.mark.parametrize("with_index", [True, False])
def test_bin_shards(tmp_path, with_index):
    tensors = _tensors()
    keys = list(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:3], "pytorch_model-00002-of-00002.bin": keys[3:]}
    for name, ks in shards.items():
        torch.save({k: tensors[k] for k in ks}, tmp_path / name)
    if with_index:
        weight_map = {k: name for name, ks in shards.items() for k in ks}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "torch"
        _assert_reads(ckpt, tensors)
    if with_index:  # lazily opened shards: the missing one is only noticed when read
        (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
        with open_checkpoint(tmp_path) as ckpt:
            np.testing.assert_array_equal(ckpt.read(keys[0]), _expected(tensors[keys[0]]))
            with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
                ckpt.read(keys[3])


def test_pt_checkpoint_dict_unwrapped_and_flattened(tmp_path):
    tensors = _tensors()
    f = tmp_path / "ckpt.pth"
    torch.save({"state_dict": tensors, "epoch": 7, "lr": 0.1, "tags": ["a"]}, f)
    with open_checkpoint(f) as ckpt:
        assert ckpt.format == "torch"
        _assert_reads(ckpt, tensors)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"enc": {"fc1": {"weight": tensors["enc.fc1.weight"]}}, "head.weight": tensors["head.weight"]},
                "optimizer_name": "sgd"}, nested)
    with open_checkpoint(nested) as ckpt:
        assert ckpt.keys() == ["enc.fc1.weight", "head.weight"]
        np.testing.assert_array_equal(ckpt.read("head.weight"), tensors["head.weight"].numpy())


def test_legacy_torch_format(tmp_path):
    tensors = _tensors()
    f = tmp_path / "legacy.pt"
    torch.save(tensors, f, _use_new_zipfile_serialization=False)
    with open_checkpoint(f) as ckpt:
        _assert_reads(ckpt, tensors)


def test_torch_file_with_pickled_object_is_refused(tmp_path):
    """The message names what torch refused to unpickle, in one line (torch's own text is a paragraph)."""
    f = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(3, 4), f)
    with pytest.raises(CheckpointError, match="module.pt") as err:
        open_checkpoint(f)
    assert "weights_only" in str(err.value)
    assert "torch.nn.modules.linear.Linear" in str(err.value) and "\n" not in str(err.value)


def test_file_that_is_no_torch_checkpoint_says_so(tmp_path):
    f = tmp_path / "notes.bin"
    f.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"notes\.bin: not a torch checkpoint: neither a zip archive nor a "
                                              r"pickle \(starts with b'this'\)"):
        open_checkpoint(f)


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"W1": rng.standard_normal((20, 10)), "b1": rng.standard_normal(20).astype(np.float16),
              "conv": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    f = tmp_path / "w.npz"
    np.savez(f, **arrays)
    with open_checkpoint(f) as ckpt:
        assert ckpt.format == "npz"
        assert ckpt.keys() == list(arrays)
        for k, a in arrays.items():
            assert ckpt.shape(k) == a.shape and ckpt.dtype(k) == a.dtype.name and ckpt.nbytes(k) == a.nbytes
            np.testing.assert_array_equal(ckpt.read(k), a.astype(np.float32) if a.dtype == np.float16 else a)
        assert ckpt.read("b1").dtype == np.float32
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="obj.npz: tensor 'x': unsupported array dtype 'object'"):
        open_checkpoint(obj)  # refused at open: never a model of 0 layers


def test_module_source():
    class Conv1D(torch.nn.Module):  # the layout of Hugging Face transformers' Conv1D
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 24))

    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(30, 8),
                                 "encoder": torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16)}),
                                 "attn": torch.nn.ModuleDict({"c_attn": Conv1D()})}).half()
    with open_checkpoint(model) as ckpt:
        assert ckpt.format == "module"
        assert ckpt.keys() == list(model.state_dict())
        types = ckpt.module_types()
        assert types["encoder.fc1"] == "Linear" and types["embed"] == "Embedding" and types["attn.c_attn"] == "Conv1D"
        w = ckpt.read("encoder.fc1.weight")
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, model.encoder.fc1.weight.detach().float().numpy())
    model32 = torch.nn.Linear(4, 12)
    with open_checkpoint(model32) as ckpt:
        w = ckpt.read("weight")
        w[:] = 0  # a copy: the model's weights are untouched
        assert model32.weight.abs().sum() > 0


def test_dict_source_mixed():
    src = {"a.weight": np.ones((3, 4), np.float16), "b.weight": torch.full((2, 5), 2.0, dtype=torch.bfloat16),
           "note": "text"}
    with open_checkpoint(src) as ckpt:
        assert ckpt.keys() == ["a.weight", "b.weight"]
        assert ckpt.dtype("a.weight") == "float16" and ckpt.dtype("b.weight") == "bfloat16"
        np.testing.assert_array_equal(ckpt.read("a.weight"), np.ones((3, 4), np.float32))
        np.testing.assert_array_equal(ckpt.read("b.weight"), np.full((2, 5), 2.0, np.float32))


def _bad_files(tmp_path):
    tensors = _tensors()
    st = tmp_path / "good.safetensors"
    save_file(tensors, st)
    data = st.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "tail.safetensors").write_bytes(data[:-8])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    pt = tmp_path / "good.pt"
    torch.save(tensors, pt)
    (tmp_path / "cut.pt").write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    (tmp_path / "garbage.bin").write_bytes(b"this is not a checkpoint" * 10)
    npz = tmp_path / "good.npz"
    np.savez(npz, w=np.ones((10, 10)))
    (tmp_path / "cut.npz").write_bytes(npz.read_bytes()[:100])
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "notamodel").mkdir()
    return ["half.safetensors", "tail.safetensors", "junk.safetensors", "cut.pt", "garbage.bin", "cut.npz",
            "model.onnx", "missing.pt", "notamodel"]


def test_bad_input_names_the_file(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(CheckpointError) as err:
            with open_checkpoint(tmp_path / name) as ckpt:
                for k in ckpt.keys():
                    ckpt.read(k)
        assert err.value.path == str(tmp_path / name), name
        assert str(tmp_path / name) in str(err.value)
        assert isinstance(err.value, ValueError)


def test_truncated_safetensors_names_tensor(tmp_path):
    _bad_files(tmp_path)
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(tmp_path / "tail.safetensors")
    assert err.value.tensor is not None and err.value.tensor in str(err.value)


def _count_header_parses(monkeypatch) -> list[str]:
    """The paths of the headers parsed from now on (JSON parses of the readers), starting from an empty cache."""
    calls = []
    real_loads = readers._loads_json

    def counting(*args):
        calls.append(args[1])
        return real_loads(*args)

    readers._HEADER_CACHE.clear()
    monkeypatch.setattr(readers, "_loads_json", counting)
    return calls


def test_same_header_parsed_once_and_still_checked_against_each_file(tmp_path, monkeypatch):
    """Models of a zoo share one parsed header; a file with that header but fewer bytes is still truncated, and
    each file reads its own tensors."""
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file({k: v for k, v in _tensors(seed).items() if k != "step"}, paths[-1])
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(paths[0].read_bytes()[:-8])
    calls = _count_header_parses(monkeypatch)
    for seed, path in enumerate(paths):
        with open_checkpoint(path) as ckpt:
            for key, tensor in _tensors(seed).items():
                if key != "step":
                    np.testing.assert_array_equal(ckpt.read(key), _expected(tensor))
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(truncated)
    assert calls == [str(paths[0]), str(truncated)]  # parsed once for the three same-sized files
    assert err.value.path == str(truncated)


def test_header_cache_ignores_metadata_values_but_still_checks_them(tmp_path, monkeypatch):
    """Files that differ only in their ``__metadata__`` (a zoo's seeds) share one parsed header; metadata that the
    whole parse refuses (duplicate keys, not JSON) is refused as well when a file of that layout was parsed."""
    tensors = {k: v for k, v in _tensors(0).items() if k != "step"}
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file(tensors, paths[-1], metadata={"seed": f"{seed:03d}"})
    template = paths[0].read_bytes()
    assert template.count(b'{"seed":"000"}') == 1
    bad = {"appears twice": '{"s":0, "s":1}', "corrupt safetensors header": '{"seed": 0000}'}  # as long as the seed
    calls = _count_header_parses(monkeypatch)
    for path in paths:
        with open_checkpoint(path) as ckpt:
            for key, tensor in tensors.items():
                np.testing.assert_array_equal(ckpt.read(key), _expected(tensor))
    assert calls == [str(paths[0])]
    for i, (message, metadata) in enumerate(bad.items()):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(template.replace(b'{"seed":"000"}', metadata.encode()))
        with pytest.raises(CheckpointError, match=message) as err:
            open_checkpoint(path)
        assert err.value.path == str(path)


def test_unsupported_dtype_names_tensor(tmp_path):
    f = tmp_path / "b.safetensors"
    save_file({"mask.weight": torch.ones(3, 3, dtype=torch.bool), "w.weight": torch.ones(3, 3)}, f)
    with open_checkpoint(f) as ckpt:
        assert ckpt.dtype("mask.weight") == "bool"
        np.testing.assert_array_equal(ckpt.read("w.weight"), np.ones((3, 3), np.float32))
        with pytest.raises(CheckpointError, match="mask.weight.*unsupported dtype bool") as err:
            ckpt.read("mask.weight")
    assert err.value.tensor == "mask.weight"


def test_checkpoint_error_pickles():
    e = CheckpointError("/x/y.pt", "fc.weight", "boom")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.tensor, e2.message, str(e2)) == (e.path, e.tensor, e.message, str(e))
    assert "/x/y.pt" in str(e) and "fc.weight" in str(e)


def test_discover_mixed_directory(tmp_path):
    tensors = _tensors()
    root = tmp_path / "zoo"
    root.mkdir()
    save_file(tensors, root / "a.safetensors")
    (root / "sub").mkdir()
    torch.save(tensors, root / "sub" / "b.pt")
    np.savez(root / "sub" / "c.npz", w=np.ones((3, 3)))
    _write_sharded_st(root / "hf", tensors)
    (root / "deep" / "er").mkdir(parents=True)
    torch.save(tensors, root / "deep" / "er" / "pytorch_model.bin")
    torch.save(tensors, root / "deep" / "d.pth")
    (root / "notes.txt").write_text("hello")
    (root / "config.json").write_text("{}")
    (root / ".cache").mkdir()
    torch.save(tensors, root / ".cache" / "hidden.pt")
    found = discover([root])
    assert found == sorted(found, key=lambda s: s.path)
    assert {s.model_id: s.path for s in found} == {
        "a": str(root / "a.safetensors"), "sub/b": str(root / "sub" / "b.pt"), "sub/c": str(root / "sub" / "c.npz"),
        "hf": str(root / "hf"), "deep/er": str(root / "deep" / "er"), "deep/d": str(root / "deep" / "d.pth")}
    assert discover([root]) == found  # deterministic
    # a file or an HF dir given directly; an unknown-format file given directly is kept (it fails on open)
    assert discover([root / "sub" / "b.pt", root / "hf", root / "notes.txt"]) == [
        ModelSource(str(root / "hf"), "hf"), ModelSource(str(root / "notes.txt"), "notes"),
        ModelSource(str(root / "sub" / "b.pt"), "b")]
    # colliding ids keep their suffix
    np.savez(root / "a.npz", w=np.ones((3, 3)))
    ids = {s.model_id for s in discover(root)}
    assert {"a.safetensors", "a.npz"} <= ids and "a" not in ids
    with pytest.raises(CheckpointError, match="missing"):
        discover([root / "missing"])
    assert is_checkpoint_file(root / "a.npz") and not is_checkpoint_file(root / "notes.txt")
    assert not is_checkpoint_file(root / "hf")


def test_content_hash(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file(_tensors(), f)
    data = bytearray(f.read_bytes())
    assert content_hash(f) == hashlib.sha256(data).hexdigest()
    shutil.copy(f, tmp_path / "copy.safetensors")
    assert content_hash(tmp_path / "copy.safetensors") == content_hash(f)
    data[len(data) - 3] ^= 1
    (tmp_path / "copy.safetensors").write_bytes(data)
    assert content_hash(tmp_path / "copy.safetensors") != content_hash(f)
    one = tmp_path / "one-file-dir"  # an HF directory of one file: the file's name is hashed with its bytes
    one.mkdir()
    shutil.copy(tmp_path / "copy.safetensors", one / "model.safetensors")
    assert content_hash(one) == hashlib.sha256(b"model.safetensors\0" + bytes(data)).hexdigest()
    d = tmp_path / "hf"
    _write_sharded_st(d, _tensors())
    h = content_hash(d)
    assert h == content_hash(d) and len(h) == 64
    shard = d / "model-00002-of-00002.safetensors"
    b = bytearray(shard.read_bytes())
    b[-1] ^= 0xFF
    shard.write_bytes(b)
    assert content_hash(d) != h


def test_corrupt_index_weight_map_and_offsets_name_the_file(tmp_path):
    d = tmp_path / "hf"
    _write_sharded_st(d, _tensors())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json.*weight_map"):
        open_checkpoint(d)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, "eight"]}}).encode()
    bad = tmp_path / "offsets.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"offsets\.safetensors: tensor 'w': corrupt safetensors header"):
        open_checkpoint(bad)
