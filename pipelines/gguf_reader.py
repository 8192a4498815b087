"""GGUF files (llama.cpp's format) read through the ``gguf`` package's memory map (extra ``gguf``).

``gguf.GGUFReader`` parses the header and maps the file; nothing is read until ``read(key)``, which dequantizes
that one tensor, ``_ROWS_BYTES`` of stored rows at a time, into a float32 array (F64/F32 and integer tensors come
back as stored, F16/BF16 widened to float32 exactly). Every type ``gguf.quants.dequantize`` implements is read
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K ... Q8_K, the IQ types, ...).

Shapes: GGUF stores dimensions in ggml order (``ne[0]`` is the contiguous one), the reverse of numpy's;
``shape(key)`` is numpy's, e.g. a ``(out, in)`` PyTorch Linear weight written by ``GGUFWriter`` reads back
``(out, in)``. ``dtype(key)``: ``float32``/``float16``/``bfloat16``/``float64``/integers for unquantized tensors,
``float32`` for quantized ones (what ``read`` returns; the ggml type is ``quant_type(key)``); ``nbytes(key)``
counts the stored (quantized) bytes. ``module_types``: ``Embedding`` for ``*token_embd`` tensors, ``Experts``
for 3-D (mixture-of-experts) weights, which are not convolutions and are therefore skipped, else ``Linear``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from zooscope.pipelines.readers import Checkpoint, CheckpointError, _Meta, _single, require_extra

#: Stored bytes dequantized per step (bounds the temporary arrays gguf.quants makes).
_ROWS_BYTES = 16 << 20
_PLAIN = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8",
          "I16": "int16", "I32": "int32", "I64": "int64"}


class _GgufShard:
    """One ``.gguf`` file, memory-mapped by ``gguf.GGUFReader``."""

    def __init__(self, path: Path):
        self.path = str(path)
        self._gguf = require_extra("gguf", "gguf", path, "GGUF")
        try:
            reader = self._gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # ValueError for a bad magic/version, IndexError/struct errors when truncated
            raise CheckpointError(self.path, None, f"cannot parse as a GGUF file: {exc}") from exc
        self._tensors: dict[str, Any] = {t.name: t for t in reader.tensors}
        self.module_types: dict[str, str] = {}
        for name, t in self._tensors.items():
            if len(t.shape) >= 2 and "." in name:
                prefix = name.rsplit(".", 1)[0]
                self.module_types[prefix] = ("Embedding" if prefix.endswith("token_embd") else
                                             "Experts" if len(t.shape) == 3 else "Linear")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def quant_type(self, key: str) -> str:
        """The ggml type name of a tensor (``Q4_K``, ``F16``, ...)."""
        return self._tensors[key].tensor_type.name

    def meta(self, key: str) -> _Meta:
        t = self._tensors[key]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return _Meta(shape, _PLAIN.get(t.tensor_type.name, "float32"), int(t.n_bytes))

    def read(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        shape, qtype = self.meta(key).shape, t.tensor_type
        if qtype.name in _PLAIN and qtype.name != "BF16":
            arr = np.array(t.data, copy=True).reshape(shape)
            return arr.astype(np.float32) if arr.dtype == np.float16 else arr
        data = t.data.reshape(-1, t.data.shape[-1])  # stored rows of whole blocks
        out = np.empty((data.shape[0], shape[-1] if shape else 1), dtype=np.float32)
        step = max(1, _ROWS_BYTES // max(1, data.shape[1]))
        try:
            for start in range(0, data.shape[0], step):
                out[start: start + step] = self._gguf.quants.dequantize(data[start: start + step], qtype)
        except NotImplementedError as exc:
            raise CheckpointError(self.path, key, f"cannot dequantize ggml type {qtype.name}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.path, key, f"read failed (truncated file?): {exc}") from exc
        return out.reshape(shape)

    def close(self) -> None:
        self._tensors = {}


def open_gguf(path: Path) -> Checkpoint:
    """A ``.gguf`` file as a :class:`Checkpoint` (format ``gguf``)."""
    shard = _GgufShard(path)
    if not shard.keys():
        raise CheckpointError(path, None, "no tensors in the GGUF file")
    return _single(str(path), "gguf", shard, shard.module_types)
