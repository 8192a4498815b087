"""Checkpoint tensors -> the weight matrices WeightWatcher analyses (spec §2-3), with its bugs fixed.

Which tensors: a key whose last component is ``weight``, ends in ``_weight`` (``in_proj_weight``) or is
``weight_orig`` (pruning); for ``.npz`` sources any array of rank >= 2. Types by rank (and by module class when
the source is an ``nn.Module``): 2-D -> ``dense`` (``conv1d`` for Hugging Face ``Conv1D``, ``embedding`` for
``Embedding`` modules or, without module classes, for embedding-like names), 3-D -> ``conv1d`` cut into ``k``
slices, 4-D -> ``conv2d`` cut into ``kh*kw`` slices ``W[:, :, i, j]`` (PyTorch layout). ``N``/``M`` are the larger/
smaller side of one slice, ``rf`` the number of kernel positions. WeightWatcher's ``conv2d_fft`` and ``fft``
transform the matrices (``layer_matrices``). See docs/DIFFERENCES.md for every deviation from WeightWatcher.
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from zooscope.pipelines.readers import Checkpoint, CheckpointError

MIN_EVALS_0775 = 10  # WeightWatcher 0.7.5.5 default (ours)
MIN_EVALS_077 = 8  # WeightWatcher 0.7.7 default: pass min_evals=MIN_EVALS_077 to match it
# module path whose last component matches this is an embedding when no module classes are known
EMBEDDING_NAME = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)$")
#: Stored dtypes (``Checkpoint.dtype``) of the tensors that are analysed.
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
#: Side of WeightWatcher's ``conv2d_fft`` grid: each (out, in) kernel is zero-padded to 32 x 32 before its FFT.
FFT_GRID = 32
#: Kernels transformed at once by ``conv2d_fft`` (bounds its complex temporaries to 64 MiB).
_FFT_CHUNK = 4096


class LayerError(CheckpointError):
    """A layer's weights cannot be analysed (NaN/Inf values, wrong shape); names the file and tensor."""


@dataclass(frozen=True)
class LayerInfo:
    """One weight tensor and how it becomes matrices.

    layer_id: position of ``key`` among all the checkpoint's keys. name: ``key`` without ``.weight``/``_weight``.
    layer_type: dense | conv1d | conv2d | embedding (``unknown`` for tensors skipped for their rank). shape: the tensor's shape. N >= M: sides of one matrix
    slice. rf: kernel positions (kh*kw for conv2d, k for a 3-D conv1d, else 1). n_slices: matrices per tensor
    (= rf). skip_reason: why the layer is not analysed, None when it is. kept: ``conv2d_fft`` layers only: the
    layer's ESD is the ``kept`` = min(kh, kw)·N·M largest eigenvalues of its ``n_slices`` = out·in FFT matrices
    (32 x 32), and ``rf`` is 1, as WeightWatcher reports them.
    """

    layer_id: int
    name: str
    key: str
    layer_type: str
    shape: tuple[int, ...]
    N: int
    M: int
    rf: int
    n_slices: int
    skip_reason: str | None = None
    kept: int | None = None

    @property
    def num_evals(self) -> int:
        """Eigenvalues of the pooled layer: M * rf (``kept`` for ``conv2d_fft``)."""
        return self.M * self.rf if self.kept is None else self.kept


def is_weight_key(key: str) -> bool:
    """True for ``*.weight``, ``weight``, ``*_weight`` and ``*.weight_orig`` keys."""
    last = key.rsplit(".", 1)[-1]
    return last == "weight" or last.endswith("_weight") or last == "weight_orig"


def layer_name(key: str) -> str:
    """The layer name of a key: ``enc.fc1.weight`` -> ``enc.fc1``, ``attn.in_proj_weight`` -> ``attn.in_proj``."""
    for suffix in (".weight_orig", ".weight", "_weight"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return key


def _module_path(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _classify(key: str, ndim: int, module_types: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """(layer_type, skip_reason) from the rank and the owning module's class (or the name)."""
    cls = (module_types or {}).get(_module_path(key))
    low = (cls or "").lower()
    if ndim < 2:
        return None, f"{ndim}-D tensor (bias/norm/scalar)"
    if ndim == 2:
        if cls is not None:
            if "embedding" in low:
                return "embedding", None
            return ("conv1d" if cls == "Conv1D" else "dense"), None
        return ("embedding" if EMBEDDING_NAME.search(_module_path(key) or key) else "dense"), None
    if ndim == 3:
        if cls is not None and "conv" not in low:
            return None, f"3-D weight of a {cls} module"
        return "conv1d", None
    if ndim == 4:
        if cls is not None and "conv" not in low:
            return None, f"4-D weight of a {cls} module"
        return "conv2d", None
    return None, f"{ndim}-D tensor not supported"


def _sides(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(N, M, rf) of one slice: N = max(out, in), M = min(out, in), rf = product of kernel sizes."""
    if len(shape) < 2:
        n = shape[0] if shape else 1
        return n, 1, 1
    rf = math.prod(shape[2:])
    return max(shape[0], shape[1]), min(shape[0], shape[1]), rf


def plan_layers(
    ckpt_or_shapes: Checkpoint | Mapping[str, tuple[int, ...]],
    *,
    min_evals: int = MIN_EVALS_0775,
    max_evals: int = 15000,
    max_N: int = 50000,
    pool: bool = True,
    module_types: Mapping[str, str] | None = None,
    conv1d_slices: bool = True,
    all_arrays: bool | None = None,
    only: Collection[str] | None = None,
    conv2d_fft: bool = False,
    fft: bool = False,
) -> list[LayerInfo]:
    """The weight tensors of a checkpoint with their matrix shapes and skip reasons, from shapes only.

    ``ckpt_or_shapes``: an open :class:`Checkpoint` (its dtypes and module classes are used too) or an ordered
    mapping key -> shape. Filters as WeightWatcher 0.7.5.5 (spec §2.4): pooled ``M*rf`` (per-slice: ``M``) outside
    ``[min_evals, max_evals]`` or ``N > max_N`` skip the layer. ``conv1d_slices=False`` skips 3-D Conv1d weights
    as WeightWatcher does. ``all_arrays`` (default: True for ``.npz`` sources) takes every rank >= 2 array, not
    only ``weight`` keys. Non-float tensors are skipped. Tensors that are not weights (biases, buffers) are left
    out; weights that are not analysed come back with ``skip_reason`` set. As WeightWatcher 0.7.7:
    ``conv2d_fft`` plans Conv2D layers as FFT matrices (``LayerInfo.kept``) filtered by ``N`` only, and ``fft``
    counts a pooled Conv2D layer's eigenvalues as ``M`` (not ``M*rf``) for the filters.
    """
    if min_evals >= max_evals:
        raise ValueError(f"min_evals={min_evals} must be below max_evals={max_evals}")
    if max_N < max_evals or max_N < min_evals:
        raise ValueError(f"max_N={max_N} must be at least max_evals={max_evals} and min_evals={min_evals}")
    is_ckpt = isinstance(ckpt_or_shapes, Checkpoint)
    keys = ckpt_or_shapes.keys() if is_ckpt else list(ckpt_or_shapes)
    if module_types is None and is_ckpt:
        module_types = ckpt_or_shapes.module_types() or None
    if all_arrays is None:
        all_arrays = is_ckpt and ckpt_or_shapes.format == "npz"
    plan = []
    for layer_id, key in enumerate(keys):
        if only is not None and key not in only:
            continue
        shape = tuple(ckpt_or_shapes.shape(key) if is_ckpt else ckpt_or_shapes[key])
        if not (is_weight_key(key) or (all_arrays and len(shape) >= 2)):
            continue
        layer_type, reason = _classify(key, len(shape), module_types)
        N, M, rf = _sides(shape)
        n_slices, kept = rf, None
        if conv2d_fft and layer_type == "conv2d":
            n_slices, kept, rf = shape[0] * shape[1], min(shape[2:]) * shape[0] * shape[1], 1
        if reason is None and is_ckpt and ckpt_or_shapes.dtype(key) not in FLOAT_DTYPES:
            reason = f"non-float dtype {ckpt_or_shapes.dtype(key)}"
        if reason is None and len(shape) == 3 and not conv1d_slices:
            reason = "3-D Conv1d weight (conv1d_slices=False, as WeightWatcher)"
        if reason is None:
            evals, what = (None, "") if kept is not None else (M, "M") if not pool else \
                (M, "M (fft=True)") if fft else (M * rf, "M*rf")
            reason = _filter_reason(N, evals, what, min_evals=min_evals, max_evals=max_evals, max_N=max_N)
        plan.append(LayerInfo(layer_id, layer_name(key), key, layer_type or "unknown", shape, N, M, rf, n_slices,
                              reason, kept))
    return plan


def _filter_reason(N: int, evals: int | None, what: str, *, min_evals: int, max_evals: int,
                   max_N: int) -> str | None:
    """Why a layer with ``evals`` eigenvalues (None: not checked) and side ``N`` is skipped, or None."""
    if evals is not None and evals < min_evals:
        return f"{what}={evals} < min_evals={min_evals}"
    if evals is not None and evals > max_evals:
        return f"{what}={evals} > max_evals={max_evals}"
    if N > max_N:
        return f"N={N} > max_N={max_N}"
    return None


def check_weights(W: np.ndarray, info: LayerInfo, source: str = "") -> None:
    """Raise :class:`LayerError` naming ``source`` and the tensor when ``W`` is not 2-4-D or has NaN/Inf values."""
    if W.ndim not in (2, 3, 4):
        raise LayerError(source, info.key, f"cannot make matrices from a {W.ndim}-D tensor")
    bad = ~np.isfinite(W)
    if bad.any():
        n_nan = int(np.isnan(W).sum())
        raise LayerError(source, info.key, f"layer '{info.name}' has {n_nan} NaN and {int(bad.sum()) - n_nan} "
                                           "Inf values")


def layer_matrices(W: np.ndarray, info: LayerInfo, *, pool: bool = True, conv2d_norm: bool = True,
                   fft: bool = False, source: str = "") -> list[np.ndarray]:
    """The matrix stacks of one weight tensor, each ``(B, N, M)`` with N >= M and C-ordered.

    A 2-D layer keeps its stored float dtype (``kernels.esd.eigenvalues`` widens it to fp64: on the device for
    GPU backends, so an fp16 matrix crosses the bus as fp16); kernel tensors are rescaled in fp64.

    Pooled: one stack with all ``n_slices`` slices, slice ``s = i*kw + j`` being ``W[:, :, i, j]`` (3-D:
    ``W[:, :, s]``). ``pool=False``: one ``(1, N, M)`` stack per slice. With ``conv2d_norm``, slices of 3-D/4-D
    (kernel) tensors are multiplied by ``1/sqrt(2)`` pooled and by ``sqrt(rf/2)`` per slice (eigenvalues x1/2,
    x rf/2; spec §3.4); 2-D layers are never rescaled. NaN/Inf raise :class:`LayerError` naming ``source`` (the
    file) and the tensor.

    WeightWatcher's transforms, in fp64: a ``conv2d_fft`` layer (``info.kept`` set) is one ``(out·in, 32, 32)``
    stack, the real part of each kernel's 2-D FFT on a 32 x 32 grid (``FFT_GRID``), x ``1/sqrt(2)`` with
    ``conv2d_norm``; ``fft`` replaces every matrix by the real part of its 2-D FFT (after the rescale).
    """
    if tuple(W.shape) != tuple(info.shape):
        raise LayerError(source, info.key, f"shape {tuple(W.shape)} does not match the planned {info.shape}")
    check_weights(W, info, source)
    if info.kept is not None:
        return [_conv2d_fft_stack(W, conv2d_norm=conv2d_norm, fft=fft)]
    if W.ndim == 2:  # one C-ordered copy at most (none for a C-ordered tall matrix)
        stacks = [np.ascontiguousarray(W if W.shape[0] >= W.shape[1] else W.T)[None]]
    else:
        stack = np.moveaxis(W.reshape(W.shape[0], W.shape[1], -1), 2, 0)  # (rf, out, in), s = i*kw + j
        if stack.shape[1] < stack.shape[2]:
            stack = stack.transpose(0, 2, 1)
        scale = (np.sqrt(0.5) if pool else np.sqrt(info.rf / 2)) if conv2d_norm else 1.0
        # one pass: widened to fp64, rescaled and made C-ordered (never a view of W)
        stack = np.multiply(stack, scale, out=np.empty(stack.shape), dtype=np.float64)
        stacks = [stack] if pool else [stack[s: s + 1] for s in range(stack.shape[0])]
    return [np.fft.fft2(s.astype(np.float64, copy=False)).real.copy() for s in stacks] if fft else stacks


def _conv2d_fft_stack(W: np.ndarray, *, conv2d_norm: bool, fft: bool) -> np.ndarray:
    """WeightWatcher's ``get_conv2d_fft`` matrices of a ``(out, in, kh, kw)`` kernel: ``(out·in, 32, 32)`` fp64, the
    real part of ``fft2`` of each zero-padded ``(kh, kw)`` kernel (applied twice with ``fft``), x 1/sqrt(2) with
    ``conv2d_norm`` (its pooled Conv2D rescale). The complex coefficients are made ``_FFT_CHUNK`` kernels at a time."""
    kernels = W.reshape(-1, *W.shape[2:])
    out = np.empty((kernels.shape[0], FFT_GRID, FFT_GRID))
    scale = np.sqrt(0.5) if conv2d_norm else 1.0
    for start in range(0, kernels.shape[0], _FFT_CHUNK):
        part = kernels[start:start + _FFT_CHUNK].astype(np.float64, copy=False)
        coefs = np.fft.fft2(part, s=(FFT_GRID, FFT_GRID))
        if fft:
            coefs = np.fft.fft2(coefs)
        np.multiply(coefs.real, scale, out=out[start:start + _FFT_CHUNK])
    return out
