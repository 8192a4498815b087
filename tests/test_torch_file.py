"""The torch-free reader of torch state-dict files (pipelines/torch_file.py) against torch.load itself.

Every tensor read without torch must be bitwise what ``torch.load(weights_only=True)`` gives (half types widened
to float32, as the reader always did), for both of torch.save's layouts; what it does not handle goes to torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from zooscope.pipelines import torch_file
from zooscope.pipelines.readers import CheckpointError, open_checkpoint

LAYOUTS = {"zip": True, "legacy": False}


def _expected(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(obj, torch.Tensor):
        yield prefix[:-1], obj


def _state_dicts() -> dict[str, dict]:
    """State dicts with every readable dtype, views, shared storages, 0-d and empty tensors, nesting, Parameters."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 14, generator=g, dtype=torch.float64)
    big = torch.randn(40, 30, generator=g)
    dtypes = {f"w_{str(d)[6:]}": (torch.randn(6, 5, generator=g) * 50).to(d)
              for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                        torch.int16, torch.int8, torch.uint8)}
    views = {"transposed": base.t(), "column_slice": base[:, 3:7], "every_other": base[1::2, ::3],
             "offset_row": base[5], "scalar_view": base[2, 2], "same_storage_again": base[:4],
             "big_tail_slice": big[-3:, 10:20], "expanded": torch.randn(1, 5, generator=g).expand(4, 5),
             "permuted": torch.randn(2, 3, 4, 5, generator=g).permute(2, 0, 3, 1)}
    linear = torch.nn.Linear(7, 3)
    return {
        "dtypes": dtypes,
        "views_and_shared_storage": views,
        "scalars_and_empty": {"zero_d": torch.tensor(3.5), "step": torch.tensor(7), "empty": torch.zeros(0, 4),
                              "half_scalar": torch.tensor(1.25, dtype=torch.float16)},
        "nested_training_checkpoint": {"epoch": 3, "lr": 0.1, "tags": ["a", ("b", 2)], "model_state_dict":
                                       {"enc": {"fc": {"weight": big[:5], "bias": big[0, :5]}}, "head": base}},
        "parameters": dict(linear.named_parameters()),  # nn.Parameter pickles via _rebuild_parameter
        "hf_bin": linear.state_dict(),  # an OrderedDict with _metadata, what transformers writes to .bin
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(_state_dicts()))
def test_values_are_bitwise_those_of_torch_load(tmp_path, case, layout):
    path = tmp_path / f"{case}.pt"
    torch.save(_state_dicts()[case], path, _use_new_zipfile_serialization=LAYOUTS[layout])
    obj = torch_file.load(str(path))  # the fast path itself, not the fallback
    assert any(isinstance(v, torch_file.StoredTensor) for v in _walk(obj))
    reference = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in reference:
        reference = reference["model_state_dict"]
    expected = dict(_flat(reference))
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == list(expected)
        for key, t in expected.items():
            got = ckpt.read(key)
            want = _expected(t)
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key
            assert ckpt.dtype(key) == str(t.dtype).removeprefix("torch.")
            assert ckpt.nbytes(key) == t.numel() * t.element_size()


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    else:
        yield obj


def test_big_endian_zip_records(tmp_path):
    """A zip whose byteorder record says big: storages are byte-swapped on reading (as torch.load does)."""
    state = {k: v for k, v in _state_dicts()["dtypes"].items() if k != "w_bfloat16"}
    state["w_bfloat16"] = torch.randn(3, 4).to(torch.bfloat16)
    little = tmp_path / "little.pt"
    torch.save(state, little)
    itemsize = {t.storage.key: torch_file.STORAGES[t.storage.kind][1] for t in torch_file.load(str(little)).values()}
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            folder, _, name = info.filename.rpartition("/")
            if name == "byteorder":
                data = b"big"
            elif folder.endswith("/data"):
                data = np.frombuffer(data, f"u{itemsize[name]}").byteswap().tobytes()
            dst.writestr(info.filename, data)
    with open_checkpoint(big) as ckpt:
        for key, t in state.items():
            assert ckpt.read(key).tobytes() == _expected(t).tobytes(), key
    assert torch.equal(torch.load(big, weights_only=True)["w_int32"], state["w_int32"])  # torch reads it the same


def test_what_the_fast_path_does_not_handle_goes_to_torch(tmp_path):
    """torch.Size and a set are allowed by torch's weights_only loader, not by torch_file: torch reads the file."""
    path = tmp_path / "extras.pt"
    w = torch.randn(3, 4)
    torch.save({"w": w, "shape": torch.Size([3, 4]), "seen": {1, 2}}, path)
    with pytest.raises(torch_file.NotHandled, match="torch.Size"):
        torch_file.load(str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.read("w").tobytes() == w.numpy().tobytes()
    negative = tmp_path / "negative_view.pt"  # a tensor whose neg bit is set: torch's metadata, not ours
    torch.save({"w": torch._neg_view(w)}, negative)
    with pytest.raises(torch_file.NotHandled, match="neg"):
        torch_file.load(str(negative))
    with open_checkpoint(negative) as ckpt:
        assert ckpt.read("w").tobytes() == (-w).numpy().tobytes()


class Note:
    """A class a program registers with torch.serialization.add_safe_globals."""

    def __init__(self, text: str = ""):
        self.text = text


def test_globals_registered_with_torch_go_to_torch(tmp_path):
    path = tmp_path / "noted.pt"
    w = torch.randn(2, 3)
    torch.save({"w": w, "note": Note("hi")}, path)
    with pytest.raises(torch_file.Refused, match=r"GLOBAL \S*test_torch_file\.Note"):
        torch_file.load(str(path))
    with torch.serialization.safe_globals([Note]):
        with pytest.raises(torch_file.NotHandled):
            torch_file.load(str(path))
        with open_checkpoint(path) as ckpt:
            assert ckpt.read("w").tobytes() == w.numpy().tobytes()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo PAYLOAD_RAN",))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_refused_global_is_named_and_nothing_runs(tmp_path, layout, capfd):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2, 2), "evil": _Payload()}, path, _use_new_zipfile_serialization=LAYOUTS[layout])
    with pytest.raises(torch_file.Refused, match=r"GLOBAL (posix|nt)\.system"):
        torch_file.load(str(path))
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to unpickle \(nothing was run\): GLOBAL "):
        open_checkpoint(path)
    assert "PAYLOAD_RAN" not in capfd.readouterr().out


def _rewrite_record(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info)))


def test_corrupt_records_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(4, 5)}, good)
    short = tmp_path / "short_storage.pt"
    _rewrite_record(good, short, lambda name, data: data[:-4] if "/data/" in name else data)
    with pytest.raises(CheckpointError, match=r"short_storage\.pt: cannot load as a torch state dict: storage record "
                                              r"data/0 has 76 bytes, its 20 elements of float32 need 80"):
        open_checkpoint(short)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(4, 5)}, legacy, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(legacy.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot load as a torch state dict: truncated file"):
        open_checkpoint(cut)


def test_records_refuse_build_but_pickle_by_their_fields(tmp_path):
    """The pickle BUILD opcode cannot set a record's fields past the checks (torch then decides); copying works."""
    import copy
    import pickle

    path = tmp_path / "built.pt"
    torch.save({"w": torch.randn(4, 5)}, path)
    record = torch_file.load(str(path))["w"]
    evil = tmp_path / "evil_build.pt"
    # after the tensor's REDUCE: BUILD with {'offset': 10**9} (EMPTY_DICT, SHORT_BINUNICODE, INT, SETITEM, BUILD)
    build = b"}\x8c\x06offsetJ\x00\xca\x9a;sb"
    _rewrite_record(path, evil, lambda name, data: _with_build(data, build) if name.endswith("data.pkl") else data)
    with pytest.raises(pickle.UnpicklingError, match="BUILD on a StoredTensor record"):
        torch_file.load(str(evil))
    for clone in (pickle.loads(pickle.dumps(record)), copy.deepcopy(record)):
        assert (clone.shape, clone.strides, clone.offset) == (record.shape, record.strides, record.offset)
        assert clone.read(str(path)).tobytes() == record.read(str(path)).tobytes()


def _with_build(data: bytes, build: bytes) -> bytes:
    """data.pkl with ``build`` inserted after the REDUCE that calls _rebuild_tensor_v2 (the pickle's last 'R')."""
    at = data.rindex(b"R")
    return data[:at + 1] + build + data[at + 1:]


def test_view_beyond_its_storage_is_refused(tmp_path):
    """A tensor record whose strides reach past its storage (a hand-made pickle) is an error, not a wild read."""
    path = tmp_path / "reach.pt"
    torch.save({"w": torch.randn(4, 5)}, path)
    _rewrite_record(path, tmp_path / "reach2.pt",
                    lambda name, data: data.replace(b"K\x05K\x01\x86", b"K\x09K\x01\x86") if name.endswith("data.pkl")
                    else data)  # stride (5, 1) -> (9, 1)
    with pytest.raises(CheckpointError, match=r"reaches beyond its storage 0 of 20 elements"):
        open_checkpoint(tmp_path / "reach2.pt")


def test_fresh_process_analyzes_a_torch_file_without_importing_torch(tmp_path):
    """`zooscope analyze FILE.pth` (both layouts) and a refused pickle never import torch."""
    g = torch.Generator().manual_seed(1)
    state = {f"fc{i}.weight": torch.randn(48, 32, generator=g) for i in range(2)}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2, 2), "evil": _Payload()}, tmp_path / "evil.pt")
    script = ("import sys\nfrom zooscope.cli import main\nfrom zooscope.pipelines.readers import CheckpointError, "
              "open_checkpoint\n"
              "codes = [main(['analyze', sys.argv[1] + f, '--columns', 'name,alpha']) for f in ('/zip.pth', "
              "'/legacy.pth')]\n"
              "try:\n    open_checkpoint(sys.argv[1] + '/evil.pt')\nexcept CheckpointError:\n    codes.append(-1)\n"
              "print('RESULT', codes, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert "RESULT [0, 0, -1] False" in out
    assert out.count("fc1") == 2
