"""ONNX models: the initializers of Gemm, MatMul, Conv and Gather nodes as layer weights (extra ``onnx``).

The graph is loaded without external data (``onnx.load(load_external_data=False)``); a tensor stored in an
external-data file is read on ``read`` from its own file, offset and length only. Tensors stored inside the
``.onnx`` file are held in memory by protobuf with the graph (protobuf cannot parse lazily), but ``read`` still
converts one tensor at a time.

Keys and layouts (PyTorch's, so that ``layers.plan_layers`` treats a weight as it treats the ``nn.Module``):

- Gemm ``B`` with ``transB=1`` is ``(out, in)`` as stored; with ``transB=0`` it is ``(in, out)`` and is transposed.
- MatMul ``X @ W`` with ``W`` the initializer: ``(in, out)``, transposed to ``(out, in)``; ``W @ X``: ``(out, in)``.
- Conv weights are ``(out, in/groups, *kernel)`` already; Gather ``data`` (an embedding table) is ``(vocab, dim)``.

Such a weight is keyed ``<initializer name>`` when the name already ends in ``weight`` (``fc1.weight``, as
``torch.onnx.export`` names them), else ``<initializer name>.weight``; every other initializer keeps its own name.
``module_types`` gives each weight's module: ``Linear`` (Gemm/MatMul), ``Conv`` or ``Embedding`` (Gather).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from zooscope.pipelines.layers import is_weight_key
from zooscope.pipelines.readers import Checkpoint, CheckpointError, _Meta, _numpy_out, _single, require_extra

_MODULE = {"Gemm": "Linear", "MatMul": "Linear", "Conv": "Conv", "Gather": "Embedding"}


def _load_graph(path: Path) -> Any:
    onnx = require_extra("onnx", "onnx", path, "ONNX")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CheckpointError(path, None, f"cannot parse as an ONNX model: {exc}") from exc


def _weight_layouts(graph: Any) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (module class, transpose to PyTorch's (out, in)) for the weights of layer nodes."""
    inits = {t.name for t in graph.initializer}
    found: dict[str, tuple[str, bool]] = {}
    for node in graph.node:
        op, inputs = node.op_type, list(node.input)
        attrs = {a.name: a.i for a in node.attribute}
        if op == "Gemm" and len(inputs) > 1 and inputs[1] in inits:
            found.setdefault(inputs[1], ("Linear", not attrs.get("transB", 0)))
        elif op == "MatMul" and len(inputs) == 2:
            if inputs[1] in inits:
                found.setdefault(inputs[1], ("Linear", True))
            elif inputs[0] in inits:
                found.setdefault(inputs[0], ("Linear", False))
        elif op == "Conv" and len(inputs) > 1 and inputs[1] in inits:
            found.setdefault(inputs[1], ("Conv", False))
        elif op == "Gather" and inputs and inputs[0] in inits:
            found.setdefault(inputs[0], ("Embedding", False))
    return found


class _OnnxShard:
    """The initializers of one ONNX graph."""

    def __init__(self, path: Path):
        self.path = str(path)
        self._onnx = require_extra("onnx", "onnx", path, "ONNX")
        model = _load_graph(path)
        self._base = os.path.dirname(os.path.abspath(self.path))
        layouts = _weight_layouts(model.graph)
        self._tensors: dict[str, tuple[Any, bool]] = {}
        self.module_types: dict[str, str] = {}
        for tensor in model.graph.initializer:
            cls, transpose = layouts.get(tensor.name, (None, False))
            key = tensor.name
            if cls is not None and len(tensor.dims) >= 2:
                key = tensor.name if is_weight_key(tensor.name) else f"{tensor.name}.weight"
                self.module_types[key.rsplit(".", 1)[0] if "." in key else ""] = cls
            else:
                transpose = False
            if key in self._tensors:
                raise CheckpointError(self.path, key, "two initializers map to this key")
            self._tensors[key] = (tensor, transpose and len(tensor.dims) == 2)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def meta(self, key: str) -> _Meta:
        tensor, transpose = self._tensors[key]
        shape = tuple(int(d) for d in tensor.dims)
        shape = shape[::-1] if transpose else shape
        try:
            dtype = np.dtype(self._onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(self.path, key, f"unknown ONNX data type {tensor.data_type}") from exc
        return _Meta(shape, dtype.name, math.prod(shape) * dtype.itemsize)

    def read(self, key: str) -> np.ndarray:
        tensor, transpose = self._tensors[key]
        dtype = self.meta(key).dtype
        if dtype != "bfloat16" and np.dtype(dtype).kind not in "fiu":
            raise CheckpointError(self.path, key, f"unsupported dtype {dtype}")
        try:
            arr = self._onnx.numpy_helper.to_array(tensor, base_dir=self._base)
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.path, key, f"cannot read (external data missing or truncated?): {exc}") \
                from exc
        arr = arr.astype(np.float32) if dtype == "bfloat16" else _numpy_out(arr)
        return np.ascontiguousarray(arr.T) if transpose else arr

    def close(self) -> None:
        self._tensors = {}


def open_onnx(path: Path) -> Checkpoint:
    """An ``.onnx`` model as a :class:`Checkpoint` (format ``onnx``)."""
    shard = _OnnxShard(path)
    return _single(str(path), "onnx", shard, shard.module_types)


def external_files(path: Path) -> list[Path]:
    """The external-data files an ``.onnx`` model's tensors live in (for content hashing)."""
    model = _load_graph(path)
    base = Path(path).parent
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.add(base / location)
    return sorted(files)
