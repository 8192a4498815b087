"""Generator of hostile and edge-case checkpoints (no checked-in binaries): ``build(root)`` writes them and returns
what each one is and what zooscope must do with it.

Every case is a file, directory, FIFO or link under ``root``; ``Case.expect`` is ``"error"`` (opening or reading it
raises ``CheckpointError`` naming the file, and the tensor when ``tensor`` is set) or ``"ok"`` (it opens and reads;
analysis gives rows with a clear per-layer status). Pickle payloads, if they ever ran, would create
``root / MARKER``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MARKER = "PAYLOAD_RAN"


@dataclass(frozen=True)
class Case:
    name: str  # file or directory name under root (bytes names are written with os.fsencode)
    expect: str  # "error" | "ok"
    tensor: str | None = None  # the tensor the error must name
    why: str = ""


def _st_bytes(header: dict | list | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_ST_CODES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int8"): "I8", np.dtype("float64"): "F64"}


def _st_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    header, data, offset = {}, b"", 0
    for key, arr in tensors.items():
        raw = arr.tobytes()
        header[key] = {"dtype": _ST_CODES[arr.dtype],
                       "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return _st_bytes(header, data)


def good_tensors(seed: int) -> dict[str, np.ndarray]:
    """A small MLP with heavy-tailed weights: every layer analysable."""
    rng = np.random.default_rng(seed)
    return {f"fc{i}.weight": rng.standard_t(3, size=(48, 32)).astype(np.float32) for i in range(3)}


class _Payload:
    """Unpickling this calls ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _pickle_calling(func, *args) -> bytes:
    """A legacy (non-zip) pickle of a dict whose value calls ``func(*args)`` when unpickled."""
    return pickle.dumps({"fc.weight": [[0.0, 0.0], [0.0, 0.0]], "evil": _Payload(func, *args)}, protocol=2)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _truncations(name: str, data: bytes, cuts: dict[str, int], root: Path, suffix: str) -> list[Case]:
    cases = []
    for label, at in cuts.items():
        fname = f"{name}_cut_{label}{suffix}"
        _write(root / fname, data[:at])
        cases.append(Case(fname, "error", why=f"truncated at {label} (byte {at} of {len(data)})"))
    return cases


def build(root: str | os.PathLike) -> list[Case]:
    """Write every case under ``root`` (created); return the cases."""
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = str(root / MARKER)
    cases: list[Case] = []
    good = good_tensors(1)

    # ---- safetensors: structural truncations of a good file
    st = _st_tensors(good)
    (n,) = struct.unpack("<Q", st[:8])
    cases += _truncations("st", st, {"empty": 0, "len4": 4, "len8": 8, "header_mid": 8 + n // 2,
                                     "header_end": 8 + n, "data_mid": 8 + n + (len(st) - 8 - n) // 2,
                                     "last_byte": len(st) - 1}, root, ".safetensors")
    f32 = np.ones(24, np.float32).tobytes()

    def st_case(name, header, data=f32, tensor="w", length=None, why=""):
        _write(root / f"{name}.safetensors", _st_bytes(header, data, length))
        cases.append(Case(f"{name}.safetensors", "error", tensor, why))

    st_case("st_header_len_2e63", {"w": {}}, length=1 << 63, tensor=None, why="header length beyond the file")
    st_case("st_json_nesting_bomb", "[" * 200_000 + "]" * 200_000, tensor=None, why="JSON nesting bomb")
    st_case("st_json_duplicate_keys",
            '{"w": {"dtype": "F32", "shape": [24], "data_offsets": [0, 96]}, '
            '"w": {"dtype": "F32", "shape": [24], "data_offsets": [0, 96]}}', tensor=None, why="duplicate keys")
    st_case("st_header_not_object", [1, 2, 3], tensor=None, why="header is a list")
    st_case("st_header_not_utf8", b"\xff\xfe{}", tensor=None, why="header not UTF-8")
    st_case("st_negative_dims", {"w": {"dtype": "F32", "shape": [-4, -6], "data_offsets": [0, 96]}},
            why="negative dims whose product matches")
    st_case("st_string_float_dims", {"w": {"dtype": "F32", "shape": ["24", 16.9], "data_offsets": [0, 96]}},
            why="non-integer dims")
    st_case("st_bool_dims", {"w": {"dtype": "F32", "shape": [True, 24], "data_offsets": [0, 96]}},
            why="boolean dims")
    st_case("st_overlap", {"w": {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]},
                           "v": {"dtype": "F32", "shape": [4, 4], "data_offsets": [32, 96]}},
            tensor="v", why="overlapping tensors")
    st_case("st_offsets_out_of_file", {"w": {"dtype": "F32", "shape": [4, 6], "data_offsets": [96, 192]}},
            why="offsets beyond the file")
    st_case("st_offsets_negative", {"w": {"dtype": "F32", "shape": [4, 6], "data_offsets": [-96, 0]}},
            why="negative offsets")
    st_case("st_offsets_reversed", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [96, 0]}},
            why="end before start")
    st_case("st_huge_shape", {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 1 << 82]}},
            why="huge shape claim")
    st_case("st_dtype_unknown", {"w": {"dtype": "F128", "shape": [24], "data_offsets": [0, 96]}}, why="dtype")
    st_case("st_dtype_unhashable", {"w": {"dtype": ["F32"], "shape": [24], "data_offsets": [0, 96]}},
            why="dtype is a list")
    st_case("st_entry_not_object", {"w": "F32"}, why="entry is a string")

    # ---- safetensors and npz edge cases that are weights: they open, analysis decides per layer
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(40, 30))
    nan = w.astype(np.float32)
    nan[3, 4], nan[5, 6] = np.nan, np.inf
    edge = {
        "st_fp16": _st_tensors({"fc.weight": w.astype(np.float16)}),
        "st_int8": _st_tensors({"fc.weight": (w * 10).clip(-127, 127).astype(np.int8)}),
        "st_nan_inf": _st_tensors({"fc.weight": nan, "ok.weight": w.astype(np.float32) * 2}),
        "st_1x1": _st_tensors({"fc.weight": np.ones((1, 1), np.float32)}),
        "st_1x100000": _st_tensors({"fc.weight": rng.standard_normal((1, 100_000)).astype(np.float32)}),
        "st_0_rows": _st_tensors({"fc.weight": np.zeros((0, 10), np.float32),
                                  "v.weight": np.zeros((3, 0), np.float32)}),
        "st_surrogate_key": _st_bytes({"fc\ud800.weight": {"dtype": "F32", "shape": [40, 30],
                                                           "data_offsets": [0, 4800]}},
                                      w.astype(np.float32).tobytes()),
    }
    bf16 = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    edge["st_bf16"] = _st_bytes({"fc.weight": {"dtype": "BF16", "shape": [40, 30], "data_offsets": [0, bf16.nbytes]}},
                                bf16.tobytes())
    for name, data in edge.items():
        _write(root / f"{name}.safetensors", data)
        cases.append(Case(f"{name}.safetensors", "ok", why="edge-case weights"))
    zero_bytes = root / "empty_weights.safetensors"
    _write(zero_bytes, _st_tensors({"fc.weight": np.zeros((0,), np.float32)}))
    cases.append(Case(zero_bytes.name, "ok", why="a 0-byte tensor"))

    # ---- torch: truncations, refused pickles, nesting
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in good.items()}, buf)
    pt = buf.getvalue()
    cases += _truncations("pt_zip", pt, {"local_header": 30, "half": len(pt) // 2, "no_eocd": len(pt) - 22,
                                         "last_byte": len(pt) - 1}, root, ".pt")
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in good.items()}, buf, _use_new_zipfile_serialization=False)
    legacy = buf.getvalue()
    cases += _truncations("pt_legacy", legacy, {"magic": 2, "half": len(legacy) // 2, "last_byte": len(legacy) - 1},
                          root, ".pt")
    payloads = {
        "os_system": (os.system, f"touch {marker}"),
        "exec": (exec, f"open({marker!r}, 'w').close()"),
        "eval": (eval, f"open({marker!r}, 'w').close()"),
        "import_module": (__import__("importlib").import_module, "antigravity"),
        "subprocess": (__import__("subprocess").check_call, ["touch", marker]),
        "popen": (os.popen, f"touch {marker}"),
    }
    for label, (func, *args) in payloads.items():
        _write(root / f"pickle_{label}.pt", _pickle_calling(func, *args))
        cases.append(Case(f"pickle_{label}.pt", "error", why=f"legacy pickle calling {label}"))
        buf = io.BytesIO()
        torch.save({"fc.weight": torch.ones(2, 2), "evil": _Payload(func, *args)}, buf)
        _write(root / f"zip_{label}.pt", buf.getvalue())
        cases.append(Case(f"zip_{label}.pt", "error", why=f"torch zip whose pickle calls {label}"))
    nested: dict = {"w": torch.ones(2, 2)}
    for _ in range(20_000):
        nested = {"n": nested}
    buf = io.BytesIO()
    import sys
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200_000)
    try:
        torch.save(nested, buf, _use_new_zipfile_serialization=False)
    finally:
        sys.setrecursionlimit(limit)
    _write(root / "pt_nested_20000.pt", buf.getvalue())
    cases.append(Case("pt_nested_20000.pt", "error", why="20,000 nested dicts"))
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(3, 4), buf)
    _write(root / "pt_whole_module.pt", buf.getvalue())
    cases.append(Case("pt_whole_module.pt", "error", why="a pickled nn.Module"))
    _write(root / "pt_garbage.bin", b"GARBAGE!" * 64)
    cases.append(Case("pt_garbage.bin", "error", why="neither zip nor pickle"))

    # ---- npz: object/structured arrays, bombs, lies, truncation
    def npz_case(name, arrays, tensor, why):
        with zipfile.ZipFile(root / f"{name}.npz", "w", zipfile.ZIP_DEFLATED) as z:
            for key, arr in arrays.items():
                with z.open(f"{key}.npy", "w") as fh:
                    np.lib.format.write_array(fh, arr, allow_pickle=True)
        cases.append(Case(f"{name}.npz", "error", tensor, why))

    npz_case("npz_object", {"w": np.ones((4, 4)), "obj": np.array([{"a": 1}, None], dtype=object)}, "obj",
             "object array")
    npz_case("npz_structured", {"rec": np.zeros(4, dtype=[("a", "<f4"), ("b", "<i4")])}, "rec", "structured")
    with zipfile.ZipFile(root / "npz_zip_bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("w.npy", "w", force_zip64=True) as fh:  # 96 MiB of zeros: about 100 KB compressed
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False,
                                                      "shape": (3072, 4096)})
            block = bytes(1 << 20)
            for _ in range(96):
                fh.write(block)
    cases.append(Case("npz_zip_bomb.npz", "error", "w", "zip bomb: 96 MiB from ~100 KB"))
    with zipfile.ZipFile(root / "npz_lying_shape.npz", "w") as z:
        with z.open("w.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False,
                                                      "shape": (1 << 20, 1 << 20)})
            fh.write(bytes(64))
    cases.append(Case("npz_lying_shape.npz", "error", "w", "header claims 8 TiB"))
    buf = io.BytesIO()
    np.savez(buf, **good)
    npz = buf.getvalue()
    cases += _truncations("npz", npz, {"half": len(npz) // 2, "no_eocd": len(npz) - 22}, root, ".npz")

    # ---- Hugging Face directories: confinement, bombs, special files
    secret = root.parent / f"{root.name}-outside-secret.safetensors"
    _write(secret, _st_tensors(good))

    def hf_case(name, weight_map, tensor=None, why="", index_text=None):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "model.safetensors", _st_tensors({"a.weight": good["fc0.weight"]}))
        text = index_text if index_text is not None else json.dumps({"weight_map": weight_map})
        (d / "model.safetensors.index.json").write_text(text)
        cases.append(Case(name, "error", tensor, why))
        return d

    hf_case("hf_dotdot", {"a.weight": "model.safetensors", "b.weight": f"../{secret.name}"}, why="../ shard")
    hf_case("hf_absolute", {"a.weight": "model.safetensors", "b.weight": "/etc/passwd"}, why="absolute shard")
    hf_case("hf_dev_zero", {"a.weight": "model.safetensors", "b.weight": "/dev/zero"}, why="/dev/zero shard")
    d = hf_case("hf_symlink_out", {"a.weight": "model.safetensors", "b.weight": "link.safetensors"},
                why="shard symlinked out of the directory")
    os.symlink(secret, d / "link.safetensors")
    d = hf_case("hf_fifo_shard", {"a.weight": "model.safetensors", "b.weight": "pipe.safetensors"}, tensor="b.weight",
                why="a FIFO as a shard")
    os.mkfifo(d / "pipe.safetensors")
    d = hf_case("hf_dev_link", {"a.weight": "model.safetensors", "b.weight": "zero.safetensors"},
                why="a link to /dev/zero inside the directory")
    os.symlink("/dev/zero", d / "zero.safetensors")
    hf_case("hf_index_bomb", {}, why="JSON nesting bomb", index_text="[" * 200_000 + "]" * 200_000)
    hf_case("hf_weight_map_list", {}, why="weight_map not a mapping", index_text='{"weight_map": ["a", "b"]}')
    hf_case("hf_missing_shard", {"a.weight": "model.safetensors", "b.weight": "gone.safetensors"},
            tensor="b.weight", why="shard file missing")

    # ---- special entries in a scanned directory
    os.mkfifo(root / "fifo.safetensors")
    cases.append(Case("fifo.safetensors", "error", why="a FIFO"))
    os.symlink("loop.npz", root / "loop.npz")
    cases.append(Case("loop.npz", "error", why="a symlink loop"))
    os.symlink("/dev/zero", root / "dev_zero.pt")
    cases.append(Case("dev_zero.pt", "error", why="a link to a device"))
    weird = os.fsencode(str(root)) + b"/non_utf8_\xff\xfe.safetensors"
    with open(weird, "wb") as fh:
        fh.write(_st_tensors(good_tensors(9)))
    cases.append(Case(os.fsdecode(b"non_utf8_\xff\xfe.safetensors"), "ok", why="a non-UTF-8 file name"))
    return cases


def write_good(root: str | os.PathLike) -> dict[str, Path]:
    """Two good models beside the hostile ones: a safetensors file and a torch file with a ``model_state_dict``
    wrapper (the layout of training scripts)."""
    import torch

    from safetensors.numpy import save_file

    root = Path(root)
    a, b = good_tensors(11), good_tensors(12)
    save_file(a, str(root / "good_a.safetensors"))
    torch.save({"epoch": 3, "model_state_dict": {k: torch.from_numpy(v) for k, v in b.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": []}}, root / "good_b.pt")
    return {"good_a": root / "good_a.safetensors", "good_b": root / "good_b.pt"}
