"""The few smallest eigenvalues of WᵀW, accurate relative to themselves, by inverse subspace iteration.

The Gram route (``kernels.esd``) computes every eigenvalue of H = WᵀW with an absolute error of about
``(N + M)·eps·λmax`` (``esd.gram_rounding``): the smallest eigenvalues of an ill-conditioned matrix come out
with large relative errors. Trained attention matrices typically have one or two such eigenvalues among
hundreds. Instead of a whole SVD, this module re-solves only those: it takes a square matrix ``A`` with the
singular values of W (W itself when square, else the R factor of its QR decomposition), iterates a small block
on ``(AᵀA)⁻¹`` with A's inverse, and takes the singular values of ``A·Q`` (Rayleigh–Ritz).

Each value is certified by the quadratic residual bound for the lowest Ritz values (Knyazev; Parlett, *The
Symmetric Eigenvalue Problem*, §11): for the k lowest Ritz pairs (θᵢ, zᵢ) of H with block residual
``R = H·Z − Z·diag(θ)`` and θₖ below the (k+1)-th eigenvalue λₖ₊₁, ``0 ≤ θᵢ − λᵢ ≤ ‖R‖²/(λₖ₊₁ − θᵢ)``. The
caller supplies a lower bound on λₖ₊₁ (a Gram eigenvalue that is accurate). Rounding is added where it enters:
``√M·eps·σmax·σᵢ`` to each column of R (R = (AᵀU − Z·diag(σ))·diag(σ) since A·Z = U·diag(σ)), and
``2·σᵢ·√M·eps·σmax`` to each θᵢ (the error of the singular values of A·Q, as in LAPACK's SVD).
The rounding errors of the inverse only slow convergence, since the bound uses A itself.

Everything runs on numpy's LAPACK, not scipy's: each wheel bundles its own OpenBLAS, whose idle threads spin
for a while after a call, and alternating between the two pools made every call several times slower on 2 cores.
"""
from __future__ import annotations

import numpy as np

OVERSAMPLE = 4
"""Block vectors beyond the wanted count: convergence goes as (λₖ / λₖ₊ₒᵥₑᵣₛₐₘₚₗₑ₊₁) per iteration."""
MAX_ITER = 20
"""Iterations before giving up (the caller then solves the whole matrix)."""

_EPS = np.finfo(np.float64).eps


def smallest_gram_eigenvalues(w: np.ndarray, k: int, *, lam_max: float, next_lower: float, accuracy: float,
                              seed: int = 0) -> np.ndarray | None:
    """The ``k`` smallest eigenvalues of the Gram matrix of W's smaller side, each within ``accuracy`` relative.

    w: ``(N, M)`` real matrix; k: how many eigenvalues (≥ 1); lam_max: the largest eigenvalue; next_lower: a
    lower bound on the (k+1)-th smallest eigenvalue; accuracy: the relative error every returned value must be
    proven to meet. Returns ``(k,)`` fp64 ascending (units of W²), or None when the block cannot prove them: W
    exactly singular or non-finite, a block of more than half the smaller side (a full SVD is then as cheap),
    or no proof after ``MAX_ITER`` iterations (values near 0, no gap above the k-th). The start block is drawn
    from ``seed``, so results are deterministic.
    """
    a = np.asarray(w, dtype=np.float64)
    if a.shape[0] < a.shape[1]:
        a = a.T
    n, m = a.shape
    s = k + OVERSAMPLE
    if k < 1 or 2 * s > m or not np.isfinite(a).all():
        return None
    rounding = np.sqrt(m * lam_max) * _EPS  # of products with A, per unit of |A·z|: √M·eps·σmax
    if n > m:
        a = np.linalg.qr(a, mode="r")
    try:
        inverse = np.linalg.inv(a)
    except np.linalg.LinAlgError:  # exactly singular
        return None
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, s)))[0]
    for _ in range(MAX_ITER):
        q = np.linalg.qr(inverse @ (inverse.T @ q))[0]  # one step on (AᵀA)⁻¹
        if not np.isfinite(q).all():
            return None
        u, sv, vt = np.linalg.svd(a @ q, full_matrices=False)  # descending: the wanted values are the last k
        u, sv, z = u[:, -k:], sv[-k:], q @ vt[-k:].T
        if np.any(2.0 * rounding > accuracy * sv):  # θᵢ's rounding alone exceeds the bound, now and for the
            return None  # true σᵢ ≤ this Ritz value: values this close to 0 are the whole SVD's
        theta = sv * sv
        residual = np.linalg.norm((a.T @ u - z * sv) * sv) + rounding * np.linalg.norm(sv)  # ‖H·Z − Z·diag(θ)‖_F
        gap = next_lower - theta
        if np.all(gap > 0):
            bound = residual**2 / gap + 2.0 * rounding * sv
            if np.all(bound <= accuracy * theta):
                return theta[::-1].copy()
    return None
