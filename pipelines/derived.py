"""Checkpoints derived from others: a fine-tune minus its base, LoRA adapters (alone or merged), and Keras-layout
kernels turned into PyTorch's.

``open_derived(path, base=..., peft=...)`` returns a :class:`Checkpoint` whose ``read(key)`` gives the derived
tensor, so every analysis that takes a checkpoint takes these too. Keys are matched by name.
``with_channels(ckpt, channels)`` applies WeightWatcher's ``channels`` option (``KernelLayoutCheckpoint``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from zooscope.pipelines.flax_reader import _KERNEL_AXES
from zooscope.pipelines.readers import ADAPTER_CONFIG, ADAPTER_FILES, Checkpoint, CheckpointError, open_checkpoint

#: PEFT's saved LoRA keys: ``base_model.model.<name>.lora_A.weight`` (an adapter name may follow ``lora_A``).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
#: Formats whose readers know how their files store kernels (and return PyTorch's layout): WeightWatcher's
#: ``channels`` of each, 'first' = (kh, kw, in, out), 'last' = (out, in, kh, kw). Other formats (safetensors,
#: torch, npz, dict) store whatever was saved.
NATIVE_CHANNELS = {"module": "last", "onnx": "last", "gguf": "last", "keras": "first", "flax": "first"}


class _Derived(Checkpoint):
    """A checkpoint over other open checkpoints; closing it closes them."""

    def __init__(self, path: str, fmt: str, parts: list[Checkpoint], module_types: dict[str, str]):
        super().__init__(path, fmt, {}, None, module_types)
        self._parts = parts

    def close(self) -> None:
        for part in self._parts:
            part.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self.keys())} tensors)"


class DeltaCheckpoint(_Derived):
    """``model − base`` tensor by tensor (WeightWatcher's ``base_model=``); other keys read from ``model``.

    Every float tensor of ``model`` must exist in ``base`` with the same shape (checked when opened, from
    shapes only); a missing key or a shape mismatch is a :class:`CheckpointError` naming both files.
    """

    def __init__(self, model: Checkpoint, base: Checkpoint):
        super().__init__(model.path, "delta", [model, base], model.module_types())
        self.model, self.base = model, base
        base_keys = set(base.keys())
        for key in model.keys():
            if not model.dtype(key).startswith(("float", "bfloat")):
                continue
            if key not in base_keys:
                raise CheckpointError(model.path, key, f"no tensor of that name in the base model {base.path}")
            if tuple(model.shape(key)) != tuple(base.shape(key)):
                raise CheckpointError(model.path, key, f"shape {tuple(model.shape(key))} differs from "
                                                       f"{tuple(base.shape(key))} in the base model {base.path}")

    def keys(self) -> list[str]:
        return self.model.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.model.shape(key)

    def dtype(self, key: str) -> str:
        return self.model.dtype(key)

    def nbytes(self, key: str) -> int:
        return self.model.nbytes(key)

    def shard_of(self, key: str) -> str:
        return self.model.shard_of(key)

    def read(self, key: str) -> np.ndarray:
        """``W − W_base`` for float tensors (in the dtype ``model.read`` returns), else ``model``'s tensor."""
        w = self.model.read(key)
        if not self.model.dtype(key).startswith(("float", "bfloat")):
            return w
        return np.subtract(w, self.base.read(key), dtype=w.dtype)


def _adapter_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(directory, None, "not a LoRA adapter directory: no adapter_config.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(cfg_path, None, f"unreadable adapter config: {exc}") from exc
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(cfg_path, None, f"peft_type {cfg.get('peft_type')!r} is not LORA: only LoRA "
                                              "adapters are supported")
    if cfg.get("alpha_pattern"):
        raise CheckpointError(cfg_path, None, "alpha_pattern (per-layer lora_alpha) is not supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise CheckpointError(cfg_path, None, f"{field!r} must be a positive number, got {cfg.get(field)!r}")
    return cfg


class LoraCheckpoint(_Derived):
    """A PEFT LoRA adapter's weight updates, per adapted layer ``<name>.weight``.

    Alone (``base=None``): ``ΔW = B·A·scale`` with shape (out, in); merged with ``base``: ``W_base + ΔW`` for
    adapted layers (summed in float64, returned in the dtype ``base.read`` gives) and the base's tensors for all
    others (PEFT's ``merge_and_unload``). ``scale`` is
    ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` the rank of that layer's A
    (so ``rank_pattern`` is honoured); ``fan_in_fan_out`` adapters (GPT-2 ``Conv1D``) give ``ΔWᵀ``.
    Only 2-D ``lora_A``/``lora_B`` pairs (Linear, Conv1D) are supported.
    """

    def __init__(self, directory: str | os.PathLike, base: Checkpoint | None = None):
        d = Path(directory)
        cfg = _adapter_config(d)
        files = [d / f for f in ADAPTER_FILES if (d / f).is_file()]
        if not files:
            raise CheckpointError(d, None, f"no {' or '.join(ADAPTER_FILES)} next to {ADAPTER_CONFIG}")
        adapter = open_checkpoint(files[0])
        parts = [adapter] + ([base] if base is not None else [])
        super().__init__(str(d), "lora", parts, base.module_types() if base is not None else {})
        self.adapter, self.base = adapter, base
        try:
            self._pair_up(cfg)
        except BaseException:
            adapter.close()
            raise

    def _pair_up(self, cfg: dict[str, Any]) -> None:
        """Read the scale settings and match every ``lora_A`` with its ``lora_B`` (and base layer), from shapes."""
        adapter, base = self.adapter, self.base
        base_keys = set(base.keys()) if base is not None else set()
        self._alpha = float(cfg["lora_alpha"])
        self._rslora = bool(cfg.get("use_rslora", False))
        self._transpose = bool(cfg.get("fan_in_fan_out", False))
        pairs: dict[str, dict[str, str]] = {}
        for key in adapter.keys():
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise CheckpointError(adapter.path, key, "LoRA embedding / DoRA weights are not supported")
            m = _LORA_KEY.match(key)
            if m:
                pairs.setdefault(m["name"] + ".weight", {})[m["ab"]] = key
        self._pairs: dict[str, tuple[str, str]] = {}
        for key, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(adapter.path, next(iter(ab.values())), "lora_A without lora_B or vice versa")
            a_shape, b_shape = adapter.shape(ab["A"]), adapter.shape(ab["B"])
            if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
                raise CheckpointError(adapter.path, ab["B"], f"lora_B {tuple(b_shape)} · lora_A {tuple(a_shape)} "
                                                             "is not a product of 2-D matrices")
            self._pairs[key] = (ab["A"], ab["B"])
            if base is not None:
                if key not in base_keys:
                    raise CheckpointError(adapter.path, ab["A"], f"adapted layer {key!r} not in the base model "
                                                                 f"{base.path}")
                if tuple(base.shape(key)) != self._delta_shape(key):
                    raise CheckpointError(adapter.path, ab["A"], f"LoRA update shape {self._delta_shape(key)} "
                                                                 f"differs from {tuple(base.shape(key))} of "
                                                                 f"{key!r} in the base model {base.path}")
        if not self._pairs:
            raise CheckpointError(adapter.path, None, "no lora_A/lora_B weights")

    def _delta_shape(self, key: str) -> tuple[int, int]:
        a, b = self._pairs[key]
        shape = (self.adapter.shape(b)[0], self.adapter.shape(a)[1])
        return shape[::-1] if self._transpose else shape

    def keys(self) -> list[str]:
        return self.base.keys() if self.base is not None else list(self._pairs)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.base is not None:
            return self.base.shape(key)
        if key not in self._pairs:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return self._delta_shape(key)

    def dtype(self, key: str) -> str:
        """The base's dtype; ``float64`` for an update alone (what :meth:`read` returns)."""
        return self.base.dtype(key) if self.base is not None else "float64"

    def nbytes(self, key: str) -> int:
        return self.base.nbytes(key) if self.base is not None else int(np.prod(self.shape(key))) * 8

    def shard_of(self, key: str) -> str:
        if key in self._pairs:
            return self.adapter.path
        return self.base.shard_of(key)

    def delta(self, key: str) -> np.ndarray:
        """``B·A·scale`` (transposed for ``fan_in_fan_out``) of one adapted layer, float64, shape (out, in)."""
        a_key, b_key = self._pairs[key]
        a = np.asarray(self.adapter.read(a_key), dtype=np.float64)
        b = np.asarray(self.adapter.read(b_key), dtype=np.float64)
        r = a.shape[0]
        scale = self._alpha / (math.sqrt(r) if self._rslora else r)
        product = (b @ a) * scale
        return product.T if self._transpose else product

    def read(self, key: str) -> np.ndarray:
        if self.base is None:
            if key not in self._pairs:
                raise KeyError(f"{self.path}: no tensor {key!r}")
            return self.delta(key)
        w = self.base.read(key)
        if key not in self._pairs:
            return w
        return (np.asarray(w, dtype=np.float64) + self.delta(key)).astype(w.dtype)  # merged, in the base's dtype


def open_derived(path: Any, base: Any = None, peft: bool = False) -> Checkpoint:
    """Open ``path`` as ``open_checkpoint`` does, or a checkpoint derived from it.

    base: a checkpoint (path, ``nn.Module`` or dict) to subtract (``peft=False``: reads give ``W − W_base``) or,
        with ``peft=True``, to merge the adapter into (reads give ``W_base + B·A·scale``).
    peft: ``path`` is a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors/.bin).
    """
    if not peft:
        model = open_checkpoint(path)
        if base is None:
            return model
        opened = [model]
        try:
            opened.append(open_checkpoint(base))
            return DeltaCheckpoint(model, opened[1])
        except BaseException:
            for ckpt in opened:
                ckpt.close()
            raise
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise CheckpointError(path if isinstance(path, (str, os.PathLike)) else None, None,
                              "peft=True needs a LoRA adapter directory (adapter_config.json + adapter_model.*)")
    base_ckpt = open_checkpoint(base) if base is not None else None
    try:
        return LoraCheckpoint(path, base_ckpt)
    except BaseException:
        if base_ckpt is not None:
            base_ckpt.close()
        raise


def derived_hash(model_hash: str, base_hash: str | None = None, peft: bool = False) -> str:
    """The content hash of what ``open_derived(path, base, peft)`` reads, from the hashes of its files (sha256 hex):
    ``model_hash`` itself for a plain checkpoint, else a hash of both hashes and the kind of derivation, so that
    one file against two bases, or with and without ``peft``, are two contents."""
    if base_hash is None and not peft:
        return model_hash
    kind = "lora" if peft else "delta"
    return hashlib.sha256(f"zooscope-derived {kind} {model_hash} {base_hash or '-'}".encode()).hexdigest()
class KernelLayoutCheckpoint(_Derived):
    """``ckpt`` with every 3-D/4-D tensor read as a Keras-layout kernel, ``(k, in, out)`` / ``(kh, kw, in, out)``,
    and returned in PyTorch's ``(out, in, k)`` / ``(out, in, kh, kw)`` (WeightWatcher's ``channels='first'``)."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt.path, ckpt.format, [ckpt], ckpt.module_types())
        self.inner = ckpt

    def _axes(self, key: str) -> tuple[int, ...] | None:
        rank = len(self.inner.shape(key))
        return _KERNEL_AXES[rank] if rank in (3, 4) else None

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        shape, axes = tuple(self.inner.shape(key)), self._axes(key)
        return tuple(shape[a] for a in axes) if axes else shape

    def dtype(self, key: str) -> str:
        return self.inner.dtype(key)

    def nbytes(self, key: str) -> int:
        return self.inner.nbytes(key)

    def shard_of(self, key: str) -> str:
        return self.inner.shard_of(key)

    def read(self, key: str) -> np.ndarray:
        w, axes = self.inner.read(key), self._axes(key)
        return np.ascontiguousarray(w.transpose(axes)) if axes else w


def _stored_format(ckpt: Checkpoint) -> str:
    """The format whose layout a checkpoint's tensors have (a delta's model's, a merged adapter's base's)."""
    if isinstance(ckpt, DeltaCheckpoint):
        return _stored_format(ckpt.model)
    if isinstance(ckpt, LoraCheckpoint) and ckpt.base is not None:
        return _stored_format(ckpt.base)
    return ckpt.format


def with_channels(ckpt: Checkpoint, channels: str | None) -> Checkpoint:
    """``ckpt`` read with WeightWatcher's ``channels``: None and ``'last'`` as stored; ``'first'`` transposes the
    Keras-layout kernels of formats without a layout of their own (``KernelLayoutCheckpoint``). For a format whose
    reader knows its layout (``NATIVE_CHANNELS``: already returned in PyTorch's) the value must be that layout,
    else :class:`CheckpointError`."""
    if channels is None:
        return ckpt
    native = NATIVE_CHANNELS.get(_stored_format(ckpt))
    if native is not None and channels != native:
        raise CheckpointError(ckpt.path, None, f"channels={channels!r} contradicts the {_stored_format(ckpt)} "
                                               f"format, whose kernels are stored channels={native!r}")
    return KernelLayoutCheckpoint(ckpt) if channels == "first" and native is None else ckpt
