"""Composite layers spanning several tensors of one model: WeightWatcher 0.7.7's ``intra`` and ``stacked`` options.

``intra``: one matrix per pair of consecutive analysed layers ``A`` (layer l) and ``B`` (layer l+1),
``X = B·A / (‖A‖_F·‖B‖_F)`` in PyTorch's ``(out, in)`` layout, kernel tensors by their first kernel position
``W[:, :, 0, 0]``; a pair whose sizes do not chain (``B``'s input size is not ``A``'s output size) is skipped.
With ``sparsify`` (WeightWatcher's default) a random 0/1 matrix ``S`` of side ``h`` (the shared size) sits between
them, ``X = B·S·A / (‖A‖·‖B‖ + √‖S‖_F)``, to mimic the ReLU between the layers. The ESD of such a layer is the
*singular values* of ``X`` (WeightWatcher: "for intra-layer fits, we need the singular values of X"), at most the
second layer's ``M·rf`` largest (WeightWatcher's ``num_components``; for a dense second layer the product's rank).

``stacked``: every analysed layer's matrix (kernel positions side by side), each standardised as
``(W − median(W)) / MAD(W)`` (MAD per column, as ``scipy.stats.median_abs_deviation`` computes by default),
zero-padded on the right to the widest, stacked vertically into one matrix whose eigenvalues are analysed as one
layer.

WeightWatcher's own pairing (``ww_align=True``) multiplies matrices by any side they share, which for square or
repeated sizes is not the composition of the two layers; see docs/DIFFERENCES.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zooscope.pipelines.layers import LayerError, LayerInfo

#: name of the stacked layer's row
STACKED_NAME = "stacked"
#: separator of the two layer names in an intra row's name (``fc1 X fc2``, as WeightWatcher's ``"1 X 3"``)
INTRA_SEPARATOR = " X "


def first_matrix(W: np.ndarray, info: LayerInfo, *, ww_layout: bool = False) -> np.ndarray:
    """The matrix of a layer that ``intra`` multiplies, fp64: a 2-D weight as ``(out, in)`` (a Hugging Face
    ``Conv1D``, stored ``(in, out)``, transposed), a kernel tensor's first position ``W[:, :, 0, 0]``.
    ``ww_layout``: as WeightWatcher holds it instead (2-D weights as stored; kernel slices transposed to N >= M)."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim == 2:
        return W.T if info.layer_type == "conv1d" and not ww_layout else W
    first = W.reshape(W.shape[0], W.shape[1], -1)[:, :, 0]
    return first.T if ww_layout and first.shape[0] < first.shape[1] else first


def _ww_align(W0: np.ndarray, W1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WeightWatcher's ``align_mats``: transpose each so that ``W0.shape[1] == W1.shape[0]`` is the largest side
    the two share (a side that occurs twice among the four); unchanged when they share none."""
    shapes = [W0.shape[0], W0.shape[1], W1.shape[0], W1.shape[1]]
    for side in set(shapes):
        shapes.remove(side)
    if not shapes:
        return W0, W1
    shared = max(shapes)
    return (W0 if W0.shape[1] == shared else W0.T), (W1 if W1.shape[0] == shared else W1.T)


def sparsify_mask(seed: Sequence[int], h: int) -> np.ndarray:
    """WeightWatcher's ``sparsify`` matrix: ``h x h`` entries 0 or 1 with probability 1/2, fp64, drawn from
    ``numpy.random.default_rng(seed)`` (WeightWatcher draws from the unseeded global generator)."""
    return np.random.default_rng(list(seed)).integers(0, 2, size=(h, h)).astype(np.float64)


def intra_matrix(A: np.ndarray, B: np.ndarray, *, mask_seed: Sequence[int] | None = None,
                 ww_align: bool = False) -> np.ndarray | None:
    """``X = B·A / (‖A‖_F·‖B‖_F)`` of two consecutive layers' ``first_matrix``; None when they do not chain.

    mask_seed: put WeightWatcher's ``sparsify`` mask ``S = sparsify_mask(mask_seed, h)`` between them:
        ``X = B·S·A / (‖A‖·‖B‖ + √‖S‖_F)``. ww_align: pair as WeightWatcher does (``W0 = A``, ``W1 = B``
        transposed to share their largest common side, ``X = W0·[S]·W1``), ``A`` and ``B`` in its layout.
    """
    left, right = _ww_align(A, B) if ww_align else (B, A)
    if left.shape[1] != right.shape[0]:
        return None
    norm = np.linalg.norm(A) * np.linalg.norm(B)
    if mask_seed is None:
        return left @ right / norm
    mask = sparsify_mask(mask_seed, right.shape[0])
    return left @ mask @ right / (norm + np.sqrt(np.linalg.norm(mask)))


def stacked_block(W: np.ndarray, info: LayerInfo) -> np.ndarray:
    """A layer's part of the stacked matrix, fp64: a 2-D weight as stored, a kernel tensor's slices (each turned
    to N >= M, in order ``s = i*kw + j``) side by side, ``(N, rf*M)``, as WeightWatcher's stacked iterator builds
    them (unscaled: the standardisation makes any scale irrelevant)."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim == 2:
        return W
    slices = np.moveaxis(W.reshape(W.shape[0], W.shape[1], -1), 2, 0)
    if slices.shape[1] < slices.shape[2]:
        slices = slices.transpose(0, 2, 1)
    return np.hstack(list(slices))


def stacked_shape(blocks: list[np.ndarray]) -> tuple[int, int]:
    """``(N, M)`` of the stacked matrix of ``blocks``: N >= M."""
    rows, width = sum(b.shape[0] for b in blocks), max(b.shape[1] for b in blocks)
    return (rows, width) if rows >= width else (width, rows)


def stacked_matrix(blocks: list[np.ndarray], names: list[str], source: str = "") -> np.ndarray:
    """The stacked layer's matrix (N >= M) of the layers' ``stacked_block``s (``names``: their layer names): each
    standardised by ``(W − median) / MAD`` per column, zero-padded on the right to the widest, stacked vertically,
    transposed if wider than tall. A constant column (MAD 0) raises ``LayerError`` naming ``source`` and the layer
    (WeightWatcher divides by zero)."""
    from scipy import stats  # here, not at import: scipy.stats costs half a second of every cold start

    width = max(b.shape[1] for b in blocks)
    padded = []
    for name, block in zip(names, blocks):
        mad = stats.median_abs_deviation(block)
        if not np.all(mad > 0):
            raise LayerError(source, name, f"stacked layer: layer '{name}' has a constant column (median absolute "
                                           "deviation 0), which cannot be standardised")
        padded.append(np.pad((block - np.median(block)) / mad, ((0, 0), (0, width - block.shape[1]))))
    W = np.vstack(padded)
    return W if W.shape[0] >= W.shape[1] else W.T


def composite_info(layer_id: int, name: str, layer_type: str, X: np.ndarray, rf: int) -> LayerInfo:
    """The ``LayerInfo`` of a composite row: ``N``/``M`` are the sides of ``X``, ``rf`` as given (WeightWatcher
    keeps the second layer's ``rf`` for an intra row, 1 for the stacked layer)."""
    return LayerInfo(layer_id, name, name, layer_type, tuple(X.shape), max(X.shape), min(X.shape), rf, 1)
