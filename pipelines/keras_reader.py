"""Keras weights read with h5py, one tensor at a time, without TensorFlow or Keras (extra ``keras``).

Files: a Keras 3 ``.keras`` zip (``config.json`` + ``model.weights.h5``; the h5 member is read in place when the
zip stores it uncompressed, as Keras does), a Keras 3 ``.weights.h5``, and a Keras 2 / legacy ``.h5``
(``model.save`` or ``save_weights``: ``model_weights/<layer>/<layer>/kernel:0`` groups, ``layer_names`` and
``weight_names`` attributes, the model config in the ``model_config`` attribute).

Keys are layer paths joined with ``.`` (``sub.inner_d.weight``). The kernels of ``Dense``, ``Conv1D``, ``Conv2D``
and the ``Embedding`` table become ``<layer>.weight`` in PyTorch's layout, so that ``layers.plan_layers`` treats
them as it treats the equivalent ``nn.Module``:

- Dense kernel ``(in, out)`` -> ``(out, in)`` (``nn.Linear``),
- Conv1D kernel ``(k, in, out)`` -> ``(out, in, k)`` (``nn.Conv1d``),
- Conv2D kernel ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)`` (``nn.Conv2d``),
- Embedding ``(vocab, dim)`` unchanged (``nn.Embedding``).

These are transposes, so every singular value and every kernel-position slice is WeightWatcher's (its Keras path
analyses ``W[i, j, :, :]`` of the Keras Conv2D kernel, the transpose of our ``W[:, :, i, j]``). Their biases are
``<layer>.bias``; every other variable keeps its Keras name (``<layer>.<var>`` for Keras 2, ``<layer>.vars.<i>``
for Keras 3, which stores no variable names) and is not analysed. Layer classes come from the model config
(``module_types``); a Keras 3 weights file without a config falls back to its group names (``dense_1`` -> Dense).
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from zooscope.pipelines.readers import Checkpoint, CheckpointError, _Meta, _numpy_out, _single, require_extra

#: Keras class -> (kernel rank, axes that turn the Keras kernel into PyTorch's layout).
_KERNEL_LAYOUT: dict[str, tuple[int, tuple[int, ...]]] = {
    "Dense": (2, (1, 0)),
    "Conv1D": (3, (2, 1, 0)),
    "Conv2D": (4, (3, 2, 0, 1)),
    "Embedding": (2, (0, 1)),
}
#: Keras 3 group names (class name in snake case, ``_<n>`` suffixes stripped) of the supported classes.
_GROUP_CLASS = {"dense": "Dense", "conv1d": "Conv1D", "conv2d": "Conv2D", "embedding": "Embedding"}
_KERAS_MEMBER = "model.weights.h5"


class _Window(io.RawIOBase):
    """Read-only file object over bytes ``[start, start + size)`` of a file (an uncompressed zip member)."""

    def __init__(self, path: str, start: int, size: int):
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        want = max(0, min(len(buffer), self._size - self._pos))
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(memoryview(buffer)[:want])
        self._pos += got
        return got

    def close(self) -> None:
        self._fh.close()
        super().close()


def _zip_member(path: str, zf: zipfile.ZipFile, name: str) -> io.IOBase:
    """A seekable file object for a zip member: in place when stored uncompressed, else zipfile's stream."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return zf.open(info)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(path, None, f"corrupt zip: no local header for {name}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return _Window(path, info.header_offset + 30 + name_len + extra_len, info.file_size)


def _config_classes(config: Any) -> dict[str, str]:
    """Layer name -> Keras class name, for every layer (nested models too) in a model config."""
    found: dict[str, str] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            cfg = obj.get("config")
            if isinstance(obj.get("class_name"), str) and isinstance(cfg, dict) and isinstance(cfg.get("name"), str) \
                    and "dtype_policies" not in str(obj.get("module", "")) and "Policy" not in obj["class_name"]:
                found.setdefault(cfg["name"], obj["class_name"])
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(config)
    return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _KerasShard:
    """One Keras file: the h5 file stays open; each ``read`` reads one dataset."""

    def __init__(self, path: Path):
        h5py = require_extra("h5py", "keras", path, "Keras")
        self.path = str(path)
        self._handle: io.IOBase | None = None
        config: Any = None
        try:
            if zipfile.is_zipfile(self.path):
                with zipfile.ZipFile(self.path) as zf:
                    names = set(zf.namelist())
                    if _KERAS_MEMBER not in names:
                        raise CheckpointError(self.path, None, f"not a Keras 3 archive: no {_KERAS_MEMBER} inside")
                    if "config.json" in names:
                        config = json.loads(zf.read("config.json"))
                    self._handle = _zip_member(self.path, zf, _KERAS_MEMBER)
                self._h5 = h5py.File(self._handle, "r")
            else:
                self._h5 = h5py.File(self.path, "r")
        except CheckpointError:
            self.close()
            raise
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            self.close()
            raise CheckpointError(self.path, None, f"cannot open as a Keras/HDF5 file: {exc}") from exc
        if config is None and "model_config" in self._h5.attrs:
            config = json.loads(_text(self._h5.attrs["model_config"]))
        self._classes = _config_classes(config) if config is not None else {}
        # key -> (dataset path, axes to PyTorch layout or None); module path -> class name
        self._entries: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        self.module_types: dict[str, str] = {}
        try:
            if "model_weights" in self._h5 or "layer_names" in self._h5.attrs:
                self._index_keras2()
            elif "layers" in self._h5 or "vars" in self._h5:
                self._index_keras3()
            else:
                raise CheckpointError(self.path, None, "HDF5 file without Keras weights (no model_weights, "
                                                       "layer_names or layers group)")
        except BaseException:
            self.close()
            raise

    # --- indexing ---------------------------------------------------------------------------------------------

    def _add_layer(self, layer_path: list[str], cls: str | None, variables: list[tuple[str, Any]]) -> None:
        """Register one layer's variables ``(keras variable name or index, dataset)`` in file order."""
        prefix = ".".join(layer_path)
        if cls is not None:
            self.module_types[prefix] = cls
        layout = _KERNEL_LAYOUT.get(cls or "")
        for i, (var, ds) in enumerate(variables):
            key, axes = f"{prefix}.{var}", None
            if layout is not None and ds.ndim == layout[0] and var in ("kernel", "embeddings", "vars.0"):
                key, axes = f"{prefix}.weight", layout[1]
            elif layout is not None and cls != "Embedding" and var in ("bias", "vars.1") and ds.ndim == 1:
                key = f"{prefix}.bias"
            if key in self._entries:
                raise CheckpointError(self.path, key, "two variables map to this key")
            self._entries[key] = (ds.name, axes)

    def _index_keras2(self) -> None:
        root = self._h5["model_weights"] if "model_weights" in self._h5 else self._h5
        for layer_name in (_text(n) for n in root.attrs.get("layer_names", [])):
            group = root[layer_name]
            by_layer: dict[tuple[str, ...], list[tuple[str, Any]]] = {}
            for weight_name in (_text(n) for n in group.attrs.get("weight_names", [])):
                parts = weight_name.split(":")[0].split("/")
                path = tuple(parts[:-1]) or (layer_name,)
                by_layer.setdefault(path, []).append((parts[-1], group[weight_name]))
            for path, variables in by_layer.items():
                self._add_layer(list(path), self._classes.get(path[-1]), variables)

    def _index_keras3(self) -> None:
        found: list[tuple[list[str], str | None, list[tuple[str, Any]]]] = []

        def walk(group: Any, layer_path: list[str]) -> None:
            for child_name in group.get("layers", {}):
                child = group["layers"][child_name]
                name = _text(child["vars"].attrs.get("name", child_name)) if "vars" in child else child_name
                variables = [(f"vars.{i}", child["vars"][i]) for i in sorted(child.get("vars", {}), key=int)]
                cls = self._classes.get(name) or _GROUP_CLASS.get(re.sub(r"_\d+$", "", child_name))
                if variables:
                    found.append(([*layer_path, name], cls, variables))
                walk(child, [*layer_path, name])

        walk(self._h5, [])
        order = {name: i for i, name in enumerate(self._classes)}  # config order, when there is a config
        found.sort(key=lambda item: tuple(order.get(n, len(order)) for n in item[0]))
        for layer_path, cls, variables in found:
            self._add_layer(layer_path, cls, variables)

    # --- the shard protocol ----------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def meta(self, key: str) -> _Meta:
        name, axes = self._entries[key]
        ds = self._h5[name]
        shape = tuple(int(s) for s in ds.shape)
        if axes is not None:
            shape = tuple(shape[a] for a in axes)
        return _Meta(shape, ds.dtype.name, math.prod(shape) * ds.dtype.itemsize)

    def read(self, key: str) -> np.ndarray:
        name, axes = self._entries[key]
        try:
            arr = np.asarray(self._h5[name][()])
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.path, key, f"cannot read dataset {name}: {exc}") from exc
        if arr.dtype.kind not in "fiu":
            raise CheckpointError(self.path, key, f"unsupported dtype {arr.dtype}")
        arr = _numpy_out(arr)
        return np.ascontiguousarray(arr.transpose(axes)) if axes is not None else arr

    def close(self) -> None:
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            h5.close()
        if self._handle is not None:
            self._handle.close()


def open_keras(path: Path) -> Checkpoint:
    """A ``.keras`` / ``.h5`` Keras file as a :class:`Checkpoint` (format ``keras``)."""
    shard = _KerasShard(path)
    return _single(str(path), "keras", shard, shard.module_types)
