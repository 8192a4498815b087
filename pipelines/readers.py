"""Read checkpoints lazily, one tensor at a time.

Sources: a ``.safetensors`` file (header parsed here, each tensor read with one seek + read), a Hugging Face
directory (``model.safetensors.index.json`` / ``model[-0000k-of-0000n].safetensors`` /
``pytorch_model[-0000k-of-0000n].bin`` with ``pytorch_model.bin.index.json`` when present; shards opened on first
use), a PyTorch state-dict file ``.pt/.pth/.bin`` (a plain state dict read without torch, one tensor at a time, by
``torch_file``; anything else by ``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive),
``.npz``, and in memory a ``torch.nn.Module`` or a dict of tensors/arrays. Keras (``.keras``/``.h5``), ONNX
(``.onnx``), GGUF (``.gguf``) and Flax (``.msgpack``) files are read by their own modules (``FORMAT_READERS``), each
needing an optional extra.

``read`` returns float16/bfloat16 tensors as float32 arrays and float32/float64/integer tensors unchanged; bool,
complex and float8 tensors are refused with a :class:`CheckpointError`. Every problem with the input (missing,
unreadable, truncated, unknown format, unsupported dtype) is a :class:`CheckpointError` naming the file and, when
known, the tensor.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import struct
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zooscope.pipelines import torch_file

#: Formats read by their own modules (``pipelines/<module>.py``, each an optional extra): suffix -> (module, opener).
FORMAT_READERS = {
    ".keras": ("keras_reader", "open_keras"), ".h5": ("keras_reader", "open_keras"),
    ".onnx": ("onnx_reader", "open_onnx"), ".gguf": ("gguf_reader", "open_gguf"),
    ".msgpack": ("flax_reader", "open_flax"),
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz", *FORMAT_READERS)
_ST_SHARD = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_BIN_SHARD = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")
_ST_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_HASH_BLOCK = 8 << 20
#: A PEFT LoRA adapter directory: this config next to one of the weight files (``pipelines.derived``).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# safetensors dtype code -> (our dtype name, little-endian numpy storage dtype or None when unsupported)
_ST_DTYPES: dict[str, tuple[str, str | None]] = {
    "F64": ("float64", "<f8"), "F32": ("float32", "<f4"), "F16": ("float16", "<f2"), "BF16": ("bfloat16", "<u2"),
    "I64": ("int64", "<i8"), "I32": ("int32", "<i4"), "I16": ("int16", "<i2"), "I8": ("int8", "i1"),
    "U64": ("uint64", "<u8"), "U32": ("uint32", "<u4"), "U16": ("uint16", "<u2"), "U8": ("uint8", "u1"),
    "BOOL": ("bool", None), "F8_E4M3": ("float8_e4m3fn", None), "F8_E5M2": ("float8_e5m2", None),
    "C64": ("complex64", None),
}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}
_READABLE = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
             "uint64", "uint32", "uint16", "uint8"}
#: the largest safetensors header accepted (the safetensors library's own limit), and the largest index json
MAX_HEADER_BYTES = 100_000_000
MAX_INDEX_BYTES = 64 << 20
#: a safetensors file of at most this many bytes is read whole, once (a zoo of small models: one read per file)
WHOLE_READ_BYTES = 1 << 20
#: an ``.npz`` member whose declared size exceeds this many times its compressed size (and ``NPZ_BOMB_MIN_BYTES``)
#: is refused before it is decompressed: a zip bomb, not weights (real weights compress less than 10x)
NPZ_MAX_RATIO = 1000
NPZ_BOMB_MIN_BYTES = 64 << 20
#: wrapper keys of training checkpoints whose value is the model's state dict, in the order they are tried
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
#: nesting depth of dicts in a torch state dict beyond which it is refused (real ones nest a few levels)
MAX_NESTING = 100


def safe_text(text: str) -> str:
    """``text`` made encodable as UTF-8: lone surrogates (undecodable file-name bytes, ``\\ud800`` in a key) become
    backslash escapes. What the store and every message use for names from files."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: what an error message may show of a file's content."""
    text = safe_text(repr(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


class CheckpointError(ValueError):
    """A checkpoint (file ``path``, optionally tensor ``tensor``) cannot be read as asked.

    The message is UTF-8 safe (undecodable bytes of a name shown as backslash escapes)."""

    def __init__(self, path: str | os.PathLike | None, tensor: str | None, message: str):
        self.path = "" if path is None else str(path)
        self.tensor = tensor
        self.message = message
        parts = [self.path] if self.path else []
        parts += [f"tensor '{tensor}'"] if tensor else []
        super().__init__(safe_text(": ".join([*parts, message])))

    def __reduce__(self):  # keep the three fields when pickled (Dask sends errors between processes)
        return (type(self), (self.path, self.tensor, self.message))


@dataclass(frozen=True)
class ModelSource:
    """One model found by :func:`discover`: ``path`` (file or HF directory) and a stable ``model_id``."""

    path: str
    model_id: str


@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def require_extra(module: str, extra: str, path: str | os.PathLike, what: str) -> Any:
    """Import the optional dependency ``module`` of a reader, or raise a :class:`CheckpointError` naming the
    file and the extra (``pip install 'zooscope[extra]'``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CheckpointError(path, None, f"reading {what} files needs the optional package '{module}': "
                                          f"pip install 'zooscope[{extra}]'") from exc


def _require_regular(path: str | os.PathLike, st: os.stat_result | None = None) -> os.stat_result:
    """``path``'s ``stat`` (``st`` when already known); raise ``CheckpointError`` unless it is a regular file (checked
    without opening it: a FIFO or device would block or never end)."""
    if st is None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CheckpointError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise CheckpointError(path, None, f"refused: {kind}, not a regular file")
    return st


def _unique_pairs(path: str, what: str):
    """A JSON ``object_pairs_hook`` that refuses duplicate keys as ``CheckpointError``."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            dup = next(k for k, _ in items if k in seen or seen.add(k))
            raise CheckpointError(path, None, f"corrupt {what}: key {short_repr(dup)} appears twice")
        return out

    return pairs


def _loads_json(raw: bytes | str, path: str, what: str) -> Any:
    """JSON with duplicate keys and nesting bombs refused as ``CheckpointError``."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_pairs(path, what))
    except RecursionError as exc:
        raise CheckpointError(path, None, f"corrupt {what}: nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, None, f"corrupt {what}: {short_repr(str(exc), 120)}") from exc


def _int_list(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (JSON integers only: no floats, strings or bools), else None."""
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


def _check_readable(path: str, key: str, dtype: str) -> None:
    if dtype not in _READABLE:
        raise CheckpointError(path, key, f"unsupported dtype {dtype} (readable: floating point and integer tensors)")


def _numpy_out(arr: np.ndarray) -> np.ndarray:
    """float16 -> float32; other numeric dtypes unchanged (in native byte order)."""
    return arr.astype(np.float32 if arr.dtype.kind == "f" and arr.itemsize == 2 else arr.dtype.newbyteorder("="),
                      copy=False)


def _from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A tensor read as stored (bfloat16 as its uint16 bit patterns) -> what ``read`` returns."""
    if dtype == "bfloat16":  # bfloat16 is the upper half of a float32: exact widening
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return _numpy_out(raw)


# ---------------------------------------------------------------------------------------------------------------
# shards: one file (or one in-memory mapping) holding some of a model's tensors


#: parsed safetensors headers by ``_header_key``: the same-shaped models of a zoo share one header
_HEADER_CACHE: dict[tuple[str, str, int, int], dict[str, tuple[str, tuple[int, ...], int, int]]] = {}
_HEADER_CACHE_SIZE, _HEADER_CACHE_BYTES = 256, 1 << 16  # entries kept, and the largest header kept
_METADATA_KEY = '"__metadata__":'
_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs("", "safetensors header"))


def _header_key(raw: bytes, size: int) -> tuple[str, str, int, int] | None:
    """The cache key of a safetensors header ``raw`` of a file of ``size`` bytes: the header's text before and
    after the value of its ``__metadata__`` key (the files of a zoo often differ only there: a seed, a step), the
    header's length and the file size. The metadata value itself is checked here as JSON without duplicate keys,
    as the whole header's parse checks it. None (not cached) for a header that is not UTF-8 or whose metadata is
    not such a value right after its key: the whole parse then says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    start = text.find(_METADATA_KEY)
    if start < 0:
        return text, "", len(raw), size
    start += len(_METADATA_KEY)
    try:
        _, end = _METADATA_DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return text[:start], text[end:], len(raw), size


def _safetensors_entries(raw: bytes, size: int, p: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """The checked entries ``{key: (dtype code, shape, start, end)}`` of a safetensors header ``raw`` in a file of
    ``size`` bytes (``p``: its path, for errors); a header seen before with the same file size, up to its
    ``__metadata__`` value (``_header_key``), is not parsed again. The returned dict is shared: never modify it."""
    cache_key = _header_key(raw, size) if len(raw) <= _HEADER_CACHE_BYTES else None
    cached = _HEADER_CACHE.get(cache_key) if cache_key is not None else None
    if cached is not None:
        return cached
    base = 8 + len(raw)
    header = _loads_json(raw, p, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(p, None, "corrupt safetensors header: not a JSON object")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(p, key, f"corrupt safetensors header entry {short_repr(info)}")
        code, shape, offsets = info.get("dtype"), _int_list(info.get("shape")), _int_list(info.get("data_offsets"))
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise CheckpointError(p, key, f"unknown safetensors dtype {short_repr(code)}")
        if shape is None:
            raise CheckpointError(p, key, f"corrupt safetensors header: shape {short_repr(info.get('shape'))} "
                                          "is not a list of non-negative integers")
        if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise CheckpointError(p, key, "corrupt safetensors header: data_offsets "
                                          f"{short_repr(info.get('data_offsets'))} is not a pair of non-negative "
                                          "integers [start, end] with start <= end")
        start, end = offsets
        if end - start != math.prod(shape) * _ST_ITEMSIZE[code]:
            raise CheckpointError(p, key, f"corrupt safetensors header: offsets {start}..{end} do not fit shape "
                                          f"{short_repr(list(shape))} of {code}")
        if base + end > size:
            raise CheckpointError(p, key, f"truncated file: the tensor ends at byte {base + end} "
                                          f"but the file has {size} bytes")
        entries[key] = (code, shape, start, end)
    spans = sorted((start, end, key) for key, (_, _, start, end) in entries.items() if end > start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(p, b, "corrupt safetensors header: its bytes overlap those of tensor "
                                        f"{short_repr(a)}")
    if cache_key is not None:
        if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[cache_key] = entries
    return entries


class _SafetensorsShard:
    """A ``.safetensors`` file; the header is parsed and checked against the file size on first use."""

    def __init__(self, path: Path):
        self.path = str(path)
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] | None = None
        self._base = 0
        self._whole: bytes | None = None  # the file's bytes, when it is at most WHOLE_READ_BYTES

    def _header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        if self._entries is not None:
            return self._entries
        p = self.path
        size = _require_regular(p).st_size
        try:
            with open(p, "rb") as fh:
                if size <= WHOLE_READ_BYTES:  # one read serves the header and every tensor
                    self._whole = fh.read()
                    size = len(self._whole)
                    fh = io.BytesIO(self._whole)
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(p, None, f"not a safetensors file: only {size} bytes")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CheckpointError(p, None, f"truncated or not a safetensors file: header of {n} bytes "
                                                   f"but the file has {size} bytes")
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(p, None, f"safetensors header of {n} bytes exceeds the limit of "
                                                   f"{MAX_HEADER_BYTES}")
                raw = fh.read(n)
        except OSError as exc:
            raise CheckpointError(p, None, f"cannot read: {exc.strerror or exc}") from exc
        self._base = 8 + n
        self._entries = _safetensors_entries(raw, size, p)
        return self._entries

    def keys(self) -> list[str]:
        return list(self._header())

    def __contains__(self, key: str) -> bool:
        return key in self._header()

    def meta(self, key: str) -> _Meta:
        code, shape, start, end = self._header()[key]
        return _Meta(shape, _ST_DTYPES[code][0], end - start)

    def read(self, key: str) -> np.ndarray:
        code, shape, start, end = self._header()[key]
        name, storage = _ST_DTYPES[code]
        _check_readable(self.path, key, name)
        out = np.empty(shape, dtype=storage)
        if self._whole is not None:
            memoryview(out.reshape(-1)).cast("B")[:] = memoryview(self._whole)[self._base + start: self._base + end]
            return _from_storage(out, name)
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._base + start)
                got = fh.readinto(memoryview(out.reshape(-1)).cast("B"))
        except OSError as exc:
            raise CheckpointError(self.path, key, f"read failed: {exc.strerror or exc}") from exc
        if got != end - start:
            raise CheckpointError(self.path, key, f"truncated file: read {got} of {end - start} bytes")
        return _from_storage(out, name)

    def close(self) -> None:
        pass


def _flatten_tensors(obj: Any, path: str, prefix: str = "", depth: int = 0) -> Iterable[tuple[str, Any]]:
    """(dotted key, value) for every tensor/array in nested mappings; other values are skipped."""
    if isinstance(obj, Mapping):
        if depth > MAX_NESTING:
            raise CheckpointError(path, safe_text(prefix[:60]) or None,
                                  f"dicts nested more than {MAX_NESTING} levels deep: not a state dict")
        for k, v in obj.items():
            yield from _flatten_tensors(v, path, f"{prefix}{k}.", depth + 1)
    elif isinstance(obj, (np.ndarray, torch_file.StoredTensor)) or _is_torch_tensor(obj):
        yield prefix[:-1], obj


def _unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint dict (its ``STATE_DICT_KEYS`` entry, e.g. ``model_state_dict``)."""
    seen = set()
    while isinstance(obj, Mapping) and id(obj) not in seen:  # a pickle can make a dict its own "state_dict"
        seen.add(id(obj))
        inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _torch_dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


class _MappingShard:
    """Tensors/arrays held in a mapping (an in-memory source, a loaded torch file, or the ``StoredTensor`` records of
    a torch file, each read on demand)."""

    def __init__(self, path: str, tensors: Mapping[str, Any], copy: bool):
        self.path = path
        self._tensors = dict(_flatten_tensors(_unwrap(tensors), path))
        self._copy = copy

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def meta(self, key: str) -> _Meta:
        t = self._tensors[key]
        if isinstance(t, np.ndarray):
            return _Meta(tuple(t.shape), t.dtype.name, int(t.nbytes))
        if isinstance(t, torch_file.StoredTensor):
            return _Meta(t.shape, t.dtype, t.nbytes)
        return _Meta(tuple(t.shape), _torch_dtype_name(t), t.numel() * t.element_size())

    def read(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        dtype = self.meta(key).dtype
        _check_readable(self.path, key, dtype)
        if isinstance(t, np.ndarray):
            out = _numpy_out(t)
            return out.copy() if self._copy and out is t else out
        if isinstance(t, torch_file.StoredTensor):
            try:
                return _from_storage(t.read(self.path), dtype)
            except (OSError, EOFError) as exc:
                raise CheckpointError(self.path, key, f"read failed: {getattr(exc, 'strerror', None) or exc}") \
                    from exc
        t = t.detach().cpu().resolve_neg()  # a negative view (its neg bit) has no numpy() of its own
        if t.is_sparse:
            t = t.to_dense()
        if dtype in ("float16", "bfloat16"):
            return t.float().numpy()
        return t.numpy().copy() if self._copy else t.numpy()

    def close(self) -> None:
        self._tensors = {}


#: First byte of a pickle of protocol 2 or later (torch's legacy, non-zip format, is protocol 2).
_PICKLE_PROTO = b"\x80"


def _torch_load_error(exc: Exception) -> str:
    """The part of a ``torch.load`` error a user needs: for a refused pickle, the global it refused (not torch's
    advice to load with ``weights_only=False``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    refused = (re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", text)
               or re.search(r"^\s*(.*\bGLOBAL\b.*?)(?:\. |\n|$)", text, re.M))
    if refused or "Weights only load failed" in text:
        detail = refused.group(1).strip() if refused else "an object that is not a tensor"
        return f"refused to unpickle (weights_only=True, nothing was run): {short_repr(detail, 200)[1:-1]}"
    return short_repr(text.splitlines()[0], 160)[1:-1] if text else type(exc).__name__


def _load_torch_file(path: Path, loaded_as: str) -> _MappingShard:
    """A torch state-dict file: a plain state dict is read by ``torch_file`` (torch is not imported, tensors are
    read one at a time); anything else by ``torch.load(weights_only=True)``, memory-mapped for zip archives, fully
    loaded for the legacy format."""
    p = str(path)
    _require_regular(p)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(p, None, f"cannot read: {exc.strerror or exc}") from exc
    is_zip = zipfile.is_zipfile(p)
    if magic == b"PK\x03\x04" and not is_zip:
        raise CheckpointError(p, None, "truncated or corrupt torch zip archive (no central directory)")
    if not is_zip and not magic.startswith(_PICKLE_PROTO):
        raise CheckpointError(p, None, f"not a torch checkpoint: neither a zip archive nor a pickle "
                                       f"(starts with {magic!r})")
    obj = _load_torch_fast(p, loaded_as)
    if obj is None:
        obj = _torch_load(p, loaded_as, mmap=is_zip)
    if not isinstance(obj, Mapping):
        kind = "Tensor" if isinstance(obj, torch_file.StoredTensor) else type(obj).__name__
        raise CheckpointError(p, None, f"expected a state dict, found {kind}")
    shard = _MappingShard(p, obj, copy=False)
    if not shard.keys():
        raise CheckpointError(p, None, "no tensors found in the state dict")
    return shard


def _load_torch_fast(p: str, loaded_as: str) -> Any:
    """The object of a torch file with ``StoredTensor`` leaves, or None when ``torch.load`` must read it (a global
    torch may allow, an unusual record, a pickle ``torch_file`` cannot read: torch then decides, with its own
    message)."""
    try:
        return torch_file.load(p)
    except torch_file.Refused as exc:
        raise CheckpointError(p, None, f"refused to unpickle (nothing was run): {short_repr(str(exc), 200)[1:-1]} "
                                       "is not an allowed global (weights_only)") from exc
    except torch_file.Corrupt as exc:
        raise CheckpointError(p, None, f"cannot load as a torch {loaded_as}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(p, None, f"cannot read: {exc.strerror or exc}") from exc
    except Exception:  # NotHandled, or a pickle error: torch.load(weights_only=True) gives its verdict
        return None


def _torch_load(p: str, loaded_as: str, mmap: bool) -> Any:
    """``torch.load(p, weights_only=True)``; an nn.Module or a failure is a ``CheckpointError``."""
    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except RecursionError as exc:
        raise CheckpointError(p, None, f"cannot load as a torch {loaded_as}: objects nested too deeply") from exc
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(p, None, f"cannot load as a torch {loaded_as}: {_torch_load_error(exc)}") from exc
    if isinstance(obj, torch.nn.Module):
        raise CheckpointError(p, None, f"expected a state dict, found {type(obj).__name__}")
    return obj


class _NpzShard:
    """An ``.npz`` archive: headers read per member, arrays loaded per member (no pickles)."""

    def __init__(self, path: Path):
        self.path = str(path)
        _require_regular(self.path)
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(self.path, None, f"cannot open as .npz (truncated or corrupt?): "
                                                   f"{short_repr(str(exc), 120)[1:-1]}") from exc
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise CheckpointError(self.path, None, "not an .npz archive (a single .npy array?)")
        self._meta: dict[str, _Meta] = {}
        try:
            for key in self._npz.files:  # headers only: object/structured arrays and zip bombs refused up front
                self.meta(key)
        except BaseException:
            self._npz.close()
            raise

    def keys(self) -> list[str]:
        return list(self._npz.files)

    def __contains__(self, key: str) -> bool:
        return key in self._npz.files

    def meta(self, key: str) -> _Meta:
        if key not in self._meta:
            if key not in self._npz.files:
                raise KeyError(key)
            names = self._npz.zip.namelist()
            member = self._npz.zip.getinfo(f"{key}.npy" if f"{key}.npy" in names else key)
            try:
                with self._npz.zip.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = reader(fh)
            except Exception as exc:
                raise CheckpointError(self.path, key, f"corrupt .npy header: {short_repr(str(exc), 120)[1:-1]}") \
                    from exc
            if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
                raise CheckpointError(self.path, key, f"unsupported array dtype {short_repr(str(dtype))}: object "
                                                      "and structured arrays are not weights")
            nbytes = math.prod(shape) * dtype.itemsize
            if member.file_size < nbytes:
                raise CheckpointError(self.path, key, f"corrupt archive: member of {member.file_size} bytes holds "
                                                      f"a {nbytes}-byte array")
            if member.file_size > max(NPZ_BOMB_MIN_BYTES, NPZ_MAX_RATIO * member.compress_size):
                raise CheckpointError(self.path, key, f"refused: {member.file_size} bytes compressed into "
                                                      f"{member.compress_size} (over {NPZ_MAX_RATIO}x: a zip bomb?)")
            self._meta[key] = _Meta(tuple(shape), dtype.name, nbytes)
        return self._meta[key]

    def read(self, key: str) -> np.ndarray:
        _check_readable(self.path, key, self.meta(key).dtype)
        try:
            arr = self._npz[key]
        except Exception as exc:
            raise CheckpointError(self.path, key, f"cannot read: {short_repr(str(exc), 120)[1:-1]}") from exc
        return _numpy_out(arr)

    def close(self) -> None:
        self._npz.close()


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint: keys in checkpoint order, each mapped to a shard that is opened on first use


class Checkpoint:
    """A model's tensors, read one at a time. Use as a context manager or call :meth:`close`.

    ``path``: the file or directory (or ``<in-memory ...>``); ``format``: ``safetensors``, ``torch``, ``npz``,
    ``module`` or ``dict``. Keys are in checkpoint order: a file's own order; for a sharded directory, shard by
    shard in sorted shard-name order (keys in index order within a shard when an index json exists).
    """

    def __init__(self, path: str, fmt: str, key_shard: dict[str, str], opener, module_types: dict[str, str]):
        self.path = path
        self.format = fmt
        self._key_shard = key_shard
        self._opener = opener
        self._shards: dict[str, Any] = {}
        self._module_types = module_types

    def _shard(self, key: str):
        try:
            file = self._key_shard[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None
        try:
            if file not in self._shards:
                self._shards[file] = self._opener(file)
            shard = self._shards[file]
            present = key in shard
        except CheckpointError as err:  # a shard that cannot be opened: name the tensor that was asked for
            raise CheckpointError(err.path, err.tensor or key, err.message) from err
        if not present:
            raise CheckpointError(file, key, "listed in the index json but missing from the shard")
        return shard

    def keys(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self._key_shard)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shard(key).meta(key).shape

    def dtype(self, key: str) -> str:
        """Stored dtype name: ``float32``, ``bfloat16``, ``float16``, ``int64``, ..."""
        return self._shard(key).meta(key).dtype

    def nbytes(self, key: str) -> int:
        """Bytes the tensor occupies in the checkpoint (stored dtype)."""
        return self._shard(key).meta(key).nbytes

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array (float16/bfloat16 widened to float32)."""
        return self._shard(key).read(key)

    def module_types(self) -> dict[str, str]:
        """Module path -> class name (``{'fc1': 'Linear', '': 'MLP'}``); only for ``nn.Module`` sources."""
        return dict(self._module_types)

    def shard_of(self, key: str) -> str:
        """The file holding ``key`` (``path`` for single-file and in-memory sources)."""
        try:
            return self._key_shard[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, format={self.format!r}, {len(self._key_shard)} tensors)"


def _single(path: str, fmt: str, shard, module_types: dict[str, str] | None = None) -> Checkpoint:
    ckpt = Checkpoint(path, fmt, {k: shard.path for k in shard.keys()}, None, module_types or {})
    ckpt._shards[shard.path] = shard
    return ckpt


def hf_layout(directory: str | os.PathLike) -> tuple[str, list[Path], Path | None] | None:
    """``(format, shard files, index json or None)`` of a Hugging Face model directory, else None.

    Recognised, first match wins: ``model.safetensors.index.json``; ``model.safetensors`` or
    ``model-0000k-of-0000n.safetensors``; ``pytorch_model.bin.index.json``; ``pytorch_model[-0000k-of-0000n].bin``.
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    names = sorted(p.name for p in d.iterdir() if p.is_file())
    for fmt, index, pattern in (("safetensors", _ST_INDEX, _ST_SHARD), ("torch", _BIN_INDEX, _BIN_SHARD)):
        if index in names:
            weight_map = _weight_map(d / index)
            return fmt, [_confined(d, f, d / index) for f in sorted(set(weight_map.values()))], d / index
        shards = [d / n for n in names if pattern.match(n)]
        if shards:
            return fmt, shards, None
    return None


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of an HF index json, size and structure checked."""
    _require_regular(index)
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(index, None, f"index json larger than {MAX_INDEX_BYTES} bytes")
        raw = index.read_bytes()
    except OSError as exc:
        raise CheckpointError(index, None, f"cannot read: {exc.strerror or exc}") from exc
    doc = _loads_json(raw, str(index), "index json")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(index, None, "corrupt index json: 'weight_map' is not a mapping of tensor name -> "
                                           "shard file name")
    return weight_map


def _confined(d: Path, name: str, index: Path) -> Path:
    """``d / name`` for a shard file name of an index json: a plain name inside ``d`` (no ``..``, no absolute path,
    no symlink leading out of ``d``)."""
    if not name or "\0" in name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(index, None, f"refused shard path {short_repr(name)}: shards must be files inside "
                                           "the model directory")
    path = d / name
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(d)):
        raise CheckpointError(index, None, f"refused shard path {short_repr(name)}: it leads out of the model "
                                           "directory (symlink)")
    return path


def _open_dir(d: Path) -> Checkpoint:
    layout = hf_layout(d)
    if layout is None:
        raise CheckpointError(d, None, "not a model directory: no model.safetensors[.index.json] or "
                                       "pytorch_model*.bin")
    fmt, shards, index = layout
    opener = _SafetensorsShard if fmt == "safetensors" else (lambda f: _load_torch_file(Path(f), "shard"))
    if index is not None:
        weight_map = _weight_map(index)
        by_shard: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            by_shard.setdefault(file, []).append(key)
        key_shard = {k: str(d / f) for f in sorted(by_shard) for k in by_shard[f]}
        return Checkpoint(str(d), fmt, key_shard, opener, {})
    ckpt = Checkpoint(str(d), fmt, {}, opener, {})
    try:
        for f in shards:
            shard = opener(f)
            ckpt._shards[str(f)] = shard
            ckpt._key_shard.update({k: str(f) for k in shard.keys()})
    except BaseException:  # release the shards already opened (memory-mapped torch files)
        ckpt.close()
        raise
    return ckpt


def open_checkpoint(source: Any) -> Checkpoint:
    """Open a checkpoint file, HF directory, ``torch.nn.Module`` or dict of tensors/arrays for per-tensor reads.

    Raises :class:`CheckpointError` for a missing, unreadable, truncated or unknown-format source.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(source, torch.nn.Module):
        name = f"<in-memory {type(source).__name__}>"
        types = {path: type(m).__name__ for path, m in source.named_modules()}
        return _single(name, "module", _MappingShard(name, source.state_dict(), copy=True), types)
    if isinstance(source, Mapping):
        return _single("<in-memory dict>", "dict", _MappingShard("<in-memory dict>", source, copy=True))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot open a checkpoint from {type(source).__name__}: expected a path, an nn.Module "
                        "or a dict of tensors")
    path = Path(source)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(path, None, "no such file or directory") from None
    except OSError:
        st = None  # _require_regular says why
    if st is not None and stat.S_ISDIR(st.st_mode):
        return _open_dir(path)
    _require_regular(path, st)
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, None, "permission denied")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        shard = _SafetensorsShard(path)
        shard.keys()  # parse and check the header now
        return _single(str(path), "safetensors", shard)
    if suffix in (".pt", ".pth", ".bin"):
        return _single(str(path), "torch", _load_torch_file(path, "state dict"))
    if suffix == ".npz":
        return _single(str(path), "npz", _NpzShard(path))
    if suffix in FORMAT_READERS:
        return getattr(_format_module(suffix), FORMAT_READERS[suffix][1])(path)
    raise CheckpointError(path, None, f"unknown checkpoint format {suffix or '(no suffix)'!r}: expected one of "
                                      f"{', '.join(CHECKPOINT_SUFFIXES)} or a Hugging Face model directory")


def _format_module(suffix: str):
    import importlib

    return importlib.import_module(f"zooscope.pipelines.{FORMAT_READERS[suffix][0]}")


# ---------------------------------------------------------------------------------------------------------------
# discovery and hashing


def is_checkpoint_file(path: str | os.PathLike) -> bool:
    """True for a regular file with a checkpoint suffix (``CHECKPOINT_SUFFIXES``)."""
    p = Path(path)
    return p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()


def _is_model_dir(d: Path) -> bool:
    try:
        return hf_layout(d) is not None
    except CheckpointError:  # an unreadable index json still marks a model directory; opening it will fail
        return True


def _model_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.resolve().name)
    return (rel if path.is_dir() else rel.with_suffix("")).as_posix()


def discover(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[ModelSource]:
    """Expand files and directories into models, sorted by path.

    A file is one model (``model_id`` = its stem; any suffix, so that an unknown format becomes an error row
    later). An ONNX model's external-data files are part of it, not models. A Hugging Face directory (see
    :func:`hf_layout`) is one model (``model_id`` = its name). Any other
    directory is searched recursively (hidden entries skipped) for checkpoint files and HF directories, each one
    model with ``model_id`` = path relative to that directory, without suffix. ``model_id``s that collide keep
    their suffix, and if they still collide, become the full path. A missing path raises :class:`CheckpointError`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[str, str] = {}  # path -> model_id
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise CheckpointError(root, None, "no such file or directory")
        if root.is_file() or _is_model_dir(root):
            found.setdefault(str(root), _model_id(root, root))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for n in list(dirnames):
                if _is_model_dir(here / n):
                    found.setdefault(str(here / n), _model_id(here / n, root))
                    dirnames.remove(n)
            # FIFOs, devices, broken links too: they become error rows, never opened. Ids by string operations
            # (a zoo directory holds 100k files): the path relative to root, without its suffix
            folder, prefix = str(here), "" if here == root else here.relative_to(root).as_posix() + "/"
            for n in sorted(filenames):
                stem, suffix = os.path.splitext(n)
                if not n.startswith(".") and suffix.lower() in CHECKPOINT_SUFFIXES:
                    found.setdefault(n if folder == "." else os.path.join(folder, n), prefix + stem)
    for onnx_path in [p for p in found if p.lower().endswith(".onnx")]:  # its external-data files are no models
        try:
            for data_file in _format_module(".onnx").external_files(Path(onnx_path)):
                found.pop(str(data_file), None)
        except CheckpointError:  # onnx not installed or the model unreadable: opening it will say so
            pass
    counts: dict[str, int] = {}
    for mid in found.values():
        counts[mid] = counts.get(mid, 0) + 1
    renamed = {p: (mid if counts[mid] == 1 else mid + Path(p).suffix) for p, mid in found.items()}
    counts = {}
    for mid in renamed.values():
        counts[mid] = counts.get(mid, 0) + 1
    return [ModelSource(p, mid if counts[mid] == 1 else p) for p, mid in sorted(renamed.items())]


def adapter_files(directory: str | os.PathLike) -> list[Path] | None:
    """``[adapter_config.json, adapter weights]`` of a PEFT LoRA adapter directory, else None."""
    d = Path(directory)
    weights = [d / f for f in ADAPTER_FILES if (d / f).is_file()]
    return [d / ADAPTER_CONFIG, weights[0]] if weights and (d / ADAPTER_CONFIG).is_file() else None


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model consists of: the file itself (with an ONNX model's external-data files), an HF
    directory's index json and shards, by name, or a LoRA adapter directory's config and weights."""
    p = Path(path)
    try:
        st: os.stat_result | None = os.stat(p)
    except OSError:
        st = None  # _require_regular says why
    if st is None or not stat.S_ISDIR(st.st_mode):
        _require_regular(p, st)
        suffix = p.suffix.lower()
        extra = _format_module(suffix).external_files(p) if suffix == ".onnx" else []
        return [p, *sorted(set(extra) - {p}, key=lambda f: f.name)]
    layout = hf_layout(p)
    if layout is None and adapter_files(p):
        return adapter_files(p)
    if layout is None:
        raise CheckpointError(p, None, "no such file or model directory")
    _, shards, index = layout
    files = sorted(shards + ([index] if index else []), key=lambda f: f.name)
    for f in files:
        _require_regular(f)
    return files


def content_hash(path: str | os.PathLike, files: Sequence[Path] | None = None) -> str:
    """sha256 hex of a model's bytes: a file's content, or for a directory each file's name and content in
    name order (index json and all shards), streamed in 8 MiB blocks. ``files``: ``model_files(path)``, when known."""
    files = model_files(path) if files is None else files
    named = len(files) > 1 or Path(files[0]) != Path(path)  # a directory's files are named; no stat needed
    h = hashlib.sha256()
    for f in files:
        if named:
            h.update(f.name.encode() + b"\0")
        try:
            with open(f, "rb") as fh:
                while block := fh.read(_HASH_BLOCK):
                    h.update(block)
        except OSError as exc:
            raise CheckpointError(f, None, f"cannot read: {exc.strerror or exc}") from exc
    return h.hexdigest()
