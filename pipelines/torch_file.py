"""Read a PyTorch state-dict file without importing torch, one tensor at a time.

This exists for laziness and cold start only (importing torch takes seconds, and ``torch.load`` reads every
tensor up front): it is not a reimplementation of ``torch.load``. It reads what state dicts are made of and raises
:class:`NotHandled` for anything else, on which the caller falls back to ``torch.load(weights_only=True)``.

Two layouts, both written by ``torch.save``:

- zip (torch >= 1.6): records under one folder ``<prefix>/``: ``data.pkl`` (the pickled object), ``data/<key>``
  (each storage's bytes, stored uncompressed), ``byteorder`` (``little``/``big``; absent: native).
- legacy (``_use_new_zipfile_serialization=False``, older torch): five pickles in a row (magic number, protocol
  1001, system info, the object, the sorted storage keys), then per key an int64 element count and the bytes,
  both little-endian.

In both, the object's persistent ids ``('storage', <torch.XStorage>, key, location, numel[, view])`` name the
storages. The pickle is read by :class:`_Unpickler`, which resolves only the globals of ``ALLOWED``: tensors become
:class:`StoredTensor` records (storage, offset, shape, strides) whose bytes stay in the file until
:meth:`StoredTensor.read`. A global torch's ``weights_only`` loader may allow (``torch.*``, a few builtins) is
:class:`NotHandled`; any other global is :class:`Refused`, and nothing of the pickle is called.
"""
from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

#: torch storage class -> (torch dtype name, itemsize, numpy storage dtype without byte order or None: unreadable)
STORAGES: dict[str, tuple[str, int, str | None]] = {
    "DoubleStorage": ("float64", 8, "f8"), "FloatStorage": ("float32", 4, "f4"), "HalfStorage": ("float16", 2, "f2"),
    "BFloat16Storage": ("bfloat16", 2, "u2"), "LongStorage": ("int64", 8, "i8"), "IntStorage": ("int32", 4, "i4"),
    "ShortStorage": ("int16", 2, "i2"), "CharStorage": ("int8", 1, "i1"), "ByteStorage": ("uint8", 1, "u1"),
    "BoolStorage": ("bool", 1, None), "ComplexFloatStorage": ("complex64", 8, None),
    "ComplexDoubleStorage": ("complex128", 16, None),
}
#: builtins torch's weights_only loader allows besides ``torch.*`` (files naming them go to torch, not refused here)
TORCH_ALLOWED_OTHERS = frozenset({"collections.Counter", "_codecs.encode", "builtins.bytearray", "builtins.set",
                                  "builtins.complex"})
#: the largest zip ``data.pkl`` accepted (the pickle holds names and shapes, not weights)
MAX_PICKLE_BYTES = 1 << 30
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature, ..., name length, extra length


class NotHandled(Exception):
    """The file may be a valid torch checkpoint, but not one this module reads: use ``torch.load``."""


class Refused(Exception):
    """The pickle names a global that neither this module nor torch's ``weights_only`` loader allows."""


class Corrupt(Exception):
    """The file's records contradict each other (sizes, offsets, truncation)."""


class _Frozen:
    """A record of this module: the pickle ``BUILD`` opcode, which would set its attributes past the checks, is
    refused; pickling one (``copy``, Dask) rebuilds it from its fields instead."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD on a {type(self).__name__} record")

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True, eq=False)
class _StorageType(_Frozen):
    name: str  # a key of STORAGES


@dataclass(eq=False)
class _Storage(_Frozen):
    key: str
    kind: str  # a key of STORAGES
    numel: int
    byteorder: str  # "<" or ">"
    start: int = -1  # byte offset of its bytes in the file, once known


@dataclass(frozen=True, eq=False)
class StoredTensor(_Frozen):
    """A tensor in a torch file: ``shape`` elements placed by element ``strides`` from element ``offset`` of
    ``storage``; ``dtype`` is torch's name (``float32``, ``bfloat16``...)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return STORAGES[self.storage.kind][0]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements (``t.numel() * t.element_size()``)."""
        return math.prod(self.shape) * STORAGES[self.storage.kind][1]

    def read(self, path: str) -> np.ndarray:
        """The elements as a C-contiguous array in stored byte order (bfloat16 as its uint16 bit patterns),
        reading only the bytes from the first element to the last. Raises ``OSError`` or ``EOFError``."""
        dt = np.dtype(self.storage.byteorder + STORAGES[self.storage.kind][2])
        if math.prod(self.shape) == 0:
            return np.empty(self.shape, dtype=dt)
        buf = np.empty(1 + _extent(self.shape, self.strides), dtype=dt)
        with open(path, "rb") as fh:
            fh.seek(self.storage.start + self.offset * dt.itemsize)
            got = fh.readinto(memoryview(buf).cast("B"))
        if got != buf.nbytes:
            raise EOFError(f"read {got} of {buf.nbytes} bytes")
        view = np.lib.stride_tricks.as_strided(buf, self.shape, tuple(s * dt.itemsize for s in self.strides))
        return view.copy()  # C order (np.ascontiguousarray would make a 0-d tensor 1-d)


def _extent(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements between a non-empty tensor's first and last element."""
    return sum((n - 1) * s for n, s in zip(shape, strides))


def _ints(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):  # noqa: E721
        return None
    return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> StoredTensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``): the tensor's record, checked
    against its storage."""
    if metadata:  # conj/neg bits
        raise NotHandled(f"tensor metadata {str(metadata)[:60]}")
    shape, strides = _ints(size), _ints(stride)
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0 \
            or shape is None or strides is None or len(shape) != len(strides):  # noqa: E721
        raise pickle.UnpicklingError(f"tensor record ({str(storage_offset)[:20]}, {str(size)[:40]}, "
                                     f"{str(stride)[:40]}) is not (offset, size, stride) of a storage")
    if math.prod(shape) and storage_offset + _extent(shape, strides) >= storage.numel:
        raise Corrupt(f"a tensor of shape {list(shape)} with strides {list(strides)} at offset {storage_offset} "
                      f"reaches beyond its storage {storage.key} of {storage.numel} elements")
    return StoredTensor(storage, storage_offset, shape, strides)


def _rebuild_tensor(storage, storage_offset, size, stride) -> StoredTensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> StoredTensor:
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: the parameter's tensor."""
    if not isinstance(data, StoredTensor):
        raise pickle.UnpicklingError("a parameter of something that is not a tensor")
    return data


#: (module, name) -> what the global resolves to; storage classes (``torch.FloatStorage``...) resolve to markers
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _torch_allows(module: str, name: str) -> bool:
    """Whether torch's ``weights_only`` loader may resolve ``module.name`` (then torch decides, not us)."""
    full = f"{module}.{name}"
    if module == "torch" or module.startswith("torch.") or full in TORCH_ALLOWED_OTHERS:
        return True
    torch = sys.modules.get("torch")  # a global this program registered with torch.serialization.add_safe_globals
    for entry in getattr(torch.serialization, "get_safe_globals", list)() if torch is not None else ():
        obj, alias = entry if isinstance(entry, tuple) else (entry, None)
        if full in (alias, f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"):
            return True
    return False


class _Unpickler(pickle.Unpickler):
    """One pickle with the globals of ``ALLOWED`` only; storage ids become :class:`_Storage` records, made by
    ``locate(key, kind, numel)`` and shared by key (``storages``)."""

    def __init__(self, fh, locate, storages: dict[str, _Storage]):
        super().__init__(fh)
        self._locate = locate
        self._storages = storages

    def find_class(self, module: Any, name: Any) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and name in STORAGES:
            return _StorageType(name)
        if _torch_allows(module, name):
            raise NotHandled(f"global {module}.{name}")
        raise Refused(f"GLOBAL {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise NotHandled(f"persistent id {str(pid)[:60]}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, _StorageType) or (len(pid) == 6 and pid[5] is not None):
            raise NotHandled(f"storage {str(pid)[:60]} (a view, or an unknown type)")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:  # noqa: E721
            raise pickle.UnpicklingError(f"storage id {str(pid)[:60]}")
        if key not in self._storages:
            self._storages[key] = self._locate(key, kind.name, numel)
        storage = self._storages[key]
        if (kind.name, numel) != (storage.kind, storage.numel):
            raise NotHandled(f"storage {key} used as two dtypes or sizes")
        return storage


def load(path: str) -> Any:
    """The object saved in the torch file ``path``, its tensors as :class:`StoredTensor` records (none read).

    Raises :class:`NotHandled` (use ``torch.load``), :class:`Refused` (a global nobody allows; nothing was
    called), :class:`Corrupt`, ``pickle.UnpicklingError``, ``EOFError``, ``zipfile.BadZipFile`` or ``OSError``."""
    with open(path, "rb") as fh:
        size = fh.seek(0, io.SEEK_END)
        fh.seek(0)
        if fh.read(4) == b"PK\x03\x04":
            return _load_zip(fh, size)
        fh.seek(0)
        return _load_legacy(fh, size)


def _load_zip(fh, size: int) -> Any:
    with zipfile.ZipFile(fh) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        first = next(iter(infos), "")
        prefix = first.split("/", 1)[0] + "/" if "/" in first else ""
        pkl = infos.get(prefix + "data.pkl")
        if pkl is None or prefix + "constants.pkl" in infos:  # no pickle, or TorchScript: torch decides
            raise NotHandled("no data.pkl (or a TorchScript archive)")
        if pkl.file_size > MAX_PICKLE_BYTES:
            raise Corrupt(f"data.pkl of {pkl.file_size} bytes exceeds the limit of {MAX_PICKLE_BYTES}")
        raw = zf.read(pkl)
        order = infos.get(prefix + "byteorder")
        order = zf.read(order).decode("ascii", "replace").strip() if order is not None else sys.byteorder
        if order not in ("little", "big"):
            raise Corrupt(f"byteorder record says {order[:20]!r}")

        def locate(key: str, kind: str, numel: int) -> _Storage:
            storage = _Storage(key, kind, numel, "<" if order == "little" else ">")
            info = infos.get(f"{prefix}data/{key}")
            nbytes = numel * STORAGES[kind][1]
            if info is None and nbytes:
                raise Corrupt(f"storage record data/{key} is missing")
            if info is not None:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise NotHandled(f"compressed storage record data/{key}")
                if info.file_size != nbytes:
                    raise Corrupt(f"storage record data/{key} has {info.file_size} bytes, its {numel} elements of "
                                  f"{STORAGES[kind][0]} need {nbytes}")
                storage.start = _data_start(fh, info, size)
            return storage

        return _Unpickler(io.BytesIO(raw), locate, {}).load()


def _data_start(fh, info: zipfile.ZipInfo, size: int) -> int:
    """Byte offset of a stored record's data: after its local header, whose lengths may differ from the central
    directory's."""
    fh.seek(info.header_offset)
    head = fh.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise Corrupt(f"record {info.filename}: no local header at byte {info.header_offset}")
    _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > size:
        raise Corrupt(f"truncated file: record {info.filename} ends at byte {start + info.file_size} but the file "
                      f"has {size} bytes")
    return start


def _load_legacy(fh, size: int) -> Any:
    storages: dict[str, _Storage] = {}

    def locate(key: str, kind: str, numel: int) -> _Storage:
        return _Storage(key, kind, numel, "<")

    def next_pickle() -> Any:
        return _Unpickler(fh, locate, storages).load()

    if next_pickle() != LEGACY_MAGIC or next_pickle() != LEGACY_PROTOCOL:
        raise NotHandled("not torch's legacy format (magic number, protocol 1001)")
    info = next_pickle()
    if not isinstance(info, dict) or info.get("type_sizes", {}).get("long") not in (4, 8):
        raise NotHandled(f"legacy system info {str(info)[:80]}")
    obj = next_pickle()
    keys = next_pickle()
    if not isinstance(keys, list) or set(keys) != set(storages) or len(keys) != len(storages):
        raise Corrupt("the storage list does not match the storages the object uses")
    at = fh.tell()
    for key in keys:
        storage = storages[key]
        fh.seek(at)
        head = fh.read(8)
        if len(head) < 8:
            raise Corrupt(f"truncated file: storage {key} starts at byte {at} but the file has {size} bytes")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise Corrupt(f"storage {key} holds {numel} elements, the object says {storage.numel}")
        storage.start = at + 8
        at = storage.start + numel * STORAGES[storage.kind][1]
        if at > size:
            raise Corrupt(f"truncated file: storage {key} ends at byte {at} but the file has {size} bytes")
    return obj
