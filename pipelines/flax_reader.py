"""Flax/JAX checkpoints written by ``flax.serialization`` (``to_bytes`` / ``msgpack_serialize``), read lazily.

The format is msgpack: nested maps of names, arrays as ext type 1 holding ``msgpack((shape, dtype name, raw
C-order bytes))`` (ext 3: a numpy scalar, same payload), arrays over 1 GiB split into flat chunks under a
``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": {"0": ..., ...}}`` map. Opening walks the msgpack
structure and records each array's shape, dtype and byte offsets without reading its data; ``read`` reads one
array with a seek per chunk. Only ``msgpack`` is needed (a dependency of dask.distributed), not JAX or Flax.

Keys are the map paths joined with ``.`` (``params.Dense_0.kernel``). Under ``params`` (or everywhere when the
file has no ``params`` map, e.g. ``to_bytes(params)``), a module's ``kernel`` and ``embedding`` become
``<module>.weight`` in PyTorch's layout: Dense ``(in, out)`` -> ``(out, in)``, Conv ``(k, in, out)`` ->
``(out, in, k)`` and ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``, Embed ``(vocab, dim)`` unchanged (so the
optimizer state of a TrainState is never analysed). A 3-D/4-D kernel of a module whose name does not contain
``conv`` is a ``DenseGeneral`` (e.g. attention heads) and is skipped by ``layers.plan_layers``.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zooscope.pipelines.readers import Checkpoint, CheckpointError, _Meta, _single, require_extra

_CHUNKED = "__msgpack_chunked_array__"
#: Kernel rank -> axes that turn a Flax kernel into PyTorch's layout.
_KERNEL_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}
_EXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


@dataclass
class _Array:
    """An array in the file: its pieces ``(offset, nbytes)`` in order, shape and stored dtype name."""

    shape: tuple[int, ...]
    dtype: str
    pieces: list[tuple[int, int]]


class _Scanner:
    """Walks a msgpack file, decoding maps, arrays and ext headers itself and scalars with ``msgpack``."""

    def __init__(self, path: str, msgpack: Any):
        self.path, self._msgpack = path, msgpack
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in scan()
        self.pos = 0

    def _bytes(self, n: int) -> bytes:
        self._fh.seek(self.pos)
        data = self._fh.read(n)
        if len(data) < n:
            raise CheckpointError(self.path, None, f"truncated msgpack file at byte {self.pos}")
        return data

    def _uint(self, n: int) -> int:
        value = int.from_bytes(self._bytes(n), "big")
        self.pos += n
        return value

    def _scalar(self) -> Any:
        self._fh.seek(self.pos)
        unpacker = self._msgpack.Unpacker(self._fh, raw=False, strict_map_key=False, ext_hook=lambda c, d: None,
                                          read_size=256, max_buffer_size=1 << 31)  # keys: read little ahead
        try:
            value = unpacker.unpack()
        except (self._msgpack.OutOfData, ValueError) as exc:
            raise CheckpointError(self.path, None, f"corrupt or truncated msgpack at byte {self.pos}: {exc}") \
                from exc
        self.pos += unpacker.tell()
        return value

    def value(self) -> Any:
        """The next value: dict/list for maps/arrays, :class:`_Array` for ndarray exts, else the decoded scalar."""
        head = self._bytes(1)[0]
        if 0x80 <= head <= 0x8F or head in (0xDE, 0xDF):
            self.pos += 1
            n = head & 0x0F if head <= 0x8F else self._uint(2 if head == 0xDE else 4)
            out = {}
            for _ in range(n):
                key = self.value()
                out[str(key)] = self.value()
            return out
        if 0x90 <= head <= 0x9F or head in (0xDC, 0xDD):
            self.pos += 1
            n = head & 0x0F if head <= 0x9F else self._uint(2 if head == 0xDC else 4)
            return [self.value() for _ in range(n)]
        if head in _EXT or head in (0xC7, 0xC8, 0xC9):
            self.pos += 1
            size = _EXT[head] if head in _EXT else self._uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[head])
            code = struct.unpack("b", self._bytes(1))[0]
            self.pos += 1
            start, self.pos = self.pos, self.pos + size
            return self._ndarray(start, size) if code in (1, 3) else None
        return self._scalar()

    def _ndarray(self, start: int, size: int) -> _Array:
        """Parse ``(shape, dtype, bin)`` at ``start`` reading only its header."""
        self._fh.seek(start)
        head = self._fh.read(min(size, 4096))
        unpacker = self._msgpack.Unpacker(raw=False)
        unpacker.feed(head)
        try:
            if unpacker.read_array_header() != 3:
                raise ValueError("expected (shape, dtype, data)")
            shape, dtype = tuple(int(s) for s in unpacker.unpack()), unpacker.unpack()
        except Exception as exc:
            raise CheckpointError(self.path, None, f"corrupt ndarray at byte {start}: {exc}") from exc
        at = unpacker.tell()
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(head[at] if at < len(head) else -1)
        if width is None:
            raise CheckpointError(self.path, None, f"corrupt ndarray at byte {start}: no data after the dtype")
        nbytes = int.from_bytes(head[at + 1: at + 1 + width], "big")
        offset = start + at + 1 + width
        if offset + nbytes != start + size:
            raise CheckpointError(self.path, None, f"corrupt ndarray at byte {start}: data size does not fit")
        return _Array(shape, str(dtype), [(offset, nbytes)])

    def scan(self) -> Any:
        try:
            root = self.value()
        finally:
            self._fh.close()
        return root


def _unchunk(node: dict[str, Any]) -> _Array:
    chunks = [node["chunks"][k] for k in sorted(node["chunks"], key=int)]
    shape = tuple(int(node["shape"][k]) for k in sorted(node["shape"], key=int))
    return _Array(shape, chunks[0].dtype, [p for c in chunks for p in c.pieces])


def _dtype(name: str) -> np.dtype:
    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name)


class _FlaxShard:
    """One msgpack file: the arrays' positions, read per key."""

    def __init__(self, path: Path):
        self.path = str(path)
        msgpack = require_extra("msgpack", "flax", path, "Flax msgpack")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CheckpointError(path, None, f"cannot read: {exc.strerror or exc}") from exc
        root = _Scanner(self.path, msgpack).scan()
        if not isinstance(root, dict):
            raise CheckpointError(path, None, "not a Flax checkpoint: the msgpack root is not a map")
        self._arrays: dict[str, tuple[_Array, tuple[int, ...] | None]] = {}
        self.module_types: dict[str, str] = {}
        self._walk(root, [], mapped="params" not in root)
        for array, _ in self._arrays.values():
            if array.pieces and array.pieces[-1][0] + array.pieces[-1][1] > size:
                raise CheckpointError(path, None, "truncated file")

    def _walk(self, node: Any, at: list[str], mapped: bool) -> None:
        if isinstance(node, list):
            node = {str(i): v for i, v in enumerate(node)}
        if isinstance(node, dict) and _CHUNKED in node:
            node = _unchunk(node)
        if isinstance(node, dict):
            for name, child in node.items():
                self._walk(child, [*at, name], mapped or (not at and name == "params"))
            return
        if not isinstance(node, _Array):
            return  # a step counter, a string, ...
        key, axes, module = ".".join(at), None, ".".join(at[:-1])
        if mapped and at[-1] == "kernel" and len(node.shape) in _KERNEL_AXES:
            conv = "conv" in (at[-2] if len(at) > 1 else "").lower()
            cls = "Dense" if len(node.shape) == 2 else "Conv" if conv else "DenseGeneral"
            key, axes = f"{module}.weight", _KERNEL_AXES[len(node.shape)]
            self.module_types[module] = cls
        elif mapped and at[-1] == "embedding" and len(node.shape) == 2:
            key = f"{module}.weight"
            self.module_types[module] = "Embedding"
        if key in self._arrays:
            raise CheckpointError(self.path, key, "two arrays map to this key")
        self._arrays[key] = (node, axes)

    def keys(self) -> list[str]:
        return list(self._arrays)

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def meta(self, key: str) -> _Meta:
        array, axes = self._arrays[key]
        shape = tuple(array.shape[a] for a in axes) if axes else array.shape
        try:
            itemsize = _dtype(array.dtype).itemsize
        except TypeError as exc:
            raise CheckpointError(self.path, key, f"unknown dtype {array.dtype!r}") from exc
        return _Meta(shape, array.dtype, math.prod(shape) * itemsize)

    def read(self, key: str) -> np.ndarray:
        array, axes = self._arrays[key]
        dtype = _dtype(array.dtype)
        if dtype.kind not in "fiu" and array.dtype != "bfloat16":
            raise CheckpointError(self.path, key, f"unsupported dtype {array.dtype}")
        out = np.empty(math.prod(array.shape), dtype=dtype.newbyteorder("<"))
        view, done = memoryview(out).cast("B"), 0
        with open(self.path, "rb") as fh:
            for offset, nbytes in array.pieces:
                fh.seek(offset)
                if fh.readinto(view[done: done + nbytes]) != nbytes:
                    raise CheckpointError(self.path, key, "truncated file")
                done += nbytes
        if done != out.nbytes:
            raise CheckpointError(self.path, key, f"{done} bytes stored for shape {array.shape} of {array.dtype}")
        out = out.reshape(array.shape)
        if array.dtype == "bfloat16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        elif dtype.kind == "f" and dtype.itemsize == 2:
            out = out.astype(np.float32)
        return np.ascontiguousarray(out.transpose(axes)) if axes else out.astype(out.dtype.newbyteorder("="))

    def close(self) -> None:
        self._arrays = {}


def open_flax(path: Path) -> Checkpoint:
    """A Flax ``.msgpack`` checkpoint as a :class:`Checkpoint` (format ``flax``)."""
    shard = _FlaxShard(path)
    if not shard.keys():
        raise CheckpointError(path, None, "no arrays in the Flax checkpoint")
    return _single(str(path), "flax", shard, shard.module_types)
