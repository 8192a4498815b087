"""Eigenvectors of layer Gram matrices and WeightWatcher 0.7.7's localization metrics of each eigenvector.

Every function works on a whole batch of eigenvectors at once: ``V`` is ``(..., n, k)`` with one vector per column
(as ``np.linalg.eigh`` returns them) and a metric comes back as ``(..., k)``. The metrics depend on ``|v|`` only,
so an eigenvector's sign (arbitrary) never changes them; the eigenvectors of a repeated eigenvalue are any basis
of its eigenspace, and their metrics are not defined by the matrix alone.
"""
from __future__ import annotations

import numpy as np

#: WeightWatcher's ``discrete_entropy`` bins and the density floor it adds (``EPSILON`` off CUDA machines).
ENTROPY_BINS = 100
ENTROPY_EPSILON = 1e-10


def gram_eigenvectors(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``(B, M)`` (ascending) and unit eigenvectors ``(B, M, M)`` (columns) of the Gram matrix of each
    ``(N, M)`` matrix (N >= M) of a ``(B, N, M)`` stack, in fp64: ``WᵀW``, or ``W·Wᵀ`` for a square ``W`` (the
    side WeightWatcher takes, ``W.shape[0] <= W.shape[1]``, for a matrix in PyTorch's ``(out, in)`` layout)."""
    W = np.asarray(stack, dtype=np.float64)
    if W.ndim != 3 or W.shape[1] < W.shape[2]:
        raise ValueError(f"expected a (B, N, M) stack with N >= M, got shape {W.shape}")
    Wt = W.transpose(0, 2, 1)
    return np.linalg.eigh(W @ Wt if W.shape[1] == W.shape[2] else Wt @ W)


def localization_ratio(V: np.ndarray) -> np.ndarray:
    """``‖v‖₁ / ‖v‖∞`` of each column of ``V`` (WeightWatcher's ``localization_ratio``): from 1 (one nonzero
    component) to n (all components of equal size)."""
    A = _columns_last(V)
    return A.sum(axis=-1) / A.max(axis=-1)


def participation_ratio(V: np.ndarray) -> np.ndarray:
    """``‖v‖₂ / ‖v‖₄`` of each column of ``V`` (WeightWatcher's ``participation_ratio``): from 1 to ``n**(1/4)``."""
    A = _columns_last(V)
    return np.sqrt((A * A).sum(axis=-1)) / np.sqrt(np.sqrt((A ** 4).sum(axis=-1)))


def discrete_entropy(V: np.ndarray, bins: int = ENTROPY_BINS, epsilon: float = ENTROPY_EPSILON) -> np.ndarray:
    """WeightWatcher's ``discrete_entropy`` of each column of ``V``: the Shannon entropy (nats) of the ``bins``-bin
    density histogram of ``|v| − mean|v|``, floored by ``epsilon`` and normalised to sum to one.

    The histogram is NumPy's (``np.histogram(x, bins, density=True)``: equal bins from min to max, ±0.5 around a
    constant vector, the last bin closed), computed for every column at once with the same bin assignment."""
    A = _columns_last(V)
    A = A - A.mean(axis=-1, keepdims=True)
    lo, hi = A.min(axis=-1, keepdims=True), A.max(axis=-1, keepdims=True)
    flat = lo == hi
    lo, hi = np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi)
    edges = np.linspace(lo, hi, bins + 1, axis=-1)[..., 0, :]  # (..., k, bins + 1), as np.linspace(lo, hi) per column
    index = (((A - lo) / (hi - lo)) * bins).astype(np.intp)
    index[index == bins] -= 1
    index -= A < np.take_along_axis(edges, index, axis=-1)  # within an ulp of an edge, as np.histogram
    index += (A >= np.take_along_axis(edges, index + 1, axis=-1)) & (index != bins - 1)
    columns = np.arange(A[..., 0].size).reshape(A.shape[:-1] + (1,))
    counts = np.bincount((columns * bins + index).ravel(), minlength=columns.size * bins)
    counts = counts.reshape(A.shape[:-1] + (bins,)).astype(np.float64)
    density = counts / np.diff(edges, axis=-1) / counts.sum(axis=-1, keepdims=True)
    p = (density + epsilon) / np.sqrt(2 * np.pi)
    p /= p.sum(axis=-1, keepdims=True)
    return -(p * np.log(p)).sum(axis=-1)


def eigenvector_metrics(V: np.ndarray) -> dict[str, np.ndarray]:
    """WeightWatcher's three localization metrics of each column of ``V``, under its column names:
    ``vec_entropy`` (``discrete_entropy``), ``loc_ratio``, ``part_ratio``; each ``(..., k)``."""
    return {"vec_entropy": discrete_entropy(V), "loc_ratio": localization_ratio(V),
            "part_ratio": participation_ratio(V)}


def _columns_last(V: np.ndarray) -> np.ndarray:
    """``|V|`` with each column as a contiguous last axis ``(..., k, n)`` (sums then run as over a 1-D vector)."""
    V = np.asarray(V, dtype=np.float64)
    if V.ndim < 2 or V.shape[-2] == 0:
        raise ValueError(f"expected eigenvectors as columns of an (..., n, k) array with n >= 1, got {V.shape}")
    return np.ascontiguousarray(np.abs(np.swapaxes(V, -1, -2)))
