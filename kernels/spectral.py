"""Spectral metrics of one layer's ESD: norms, ranks, entropy, Marchenko–Pastur fit, detX, randomization.

Numerics follow WeightWatcher 0.7 (reference spec §6, §8.1–8.3). Inputs are the layer's eigenvalues λ of WᵀW
(1-D, fp64, all of them — pooled conv slices included, unthresholded); ``n``, ``m`` are the layer's N ≥ M.
Norm-metric logs are log10, entropies use natural logs.
"""
from __future__ import annotations

import numpy as np

from zooscope.kernels.esd import eigenvalues

ENTROPY_EPSILON = 1e-10
"""WeightWatcher's ``RMT_Util.EPSILON`` on CPU machines (it silently becomes 6e-5 on CUDA machines)."""
MP_BANDWIDTH = 0.1
MP_KDE_POINTS = 1000
MP_KDE_THRESH = 0.01
MP_PENALTY = 1000.0
RANDOM_REPLICA_LIMIT = 100
"""WeightWatcher pools 5 randomized replicas when a layer has fewer than this many eigenvalues, else 1."""

MP_COLUMNS = ("num_spikes", "sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min")


def norm_metrics(evals: np.ndarray, alpha: float, *, n: int, m: int) -> dict:
    """WeightWatcher's norm columns (spec §6) from all eigenvalues λ of a layer and its power-law ``alpha``.

    ``norm`` = Σλ (the *squared* Frobenius norm), ``log_norm`` = log10 Σλ, ``lambda_max`` = ``spectral_norm`` =
    max λ, ``log_spectral_norm`` = log10 max λ, ``alpha_weighted`` = α·log10 max λ, ``log_alpha_norm`` =
    log10 Σλ^α over all λ, ``stable_rank`` = Σλ / max λ, ``matrix_rank`` = #{√λ > √λmax·n·eps64}, ``entropy`` =
    WeightWatcher's matrix entropy −Σ p ln p / ln(rank + ε) with p = λ/Σλ + ε, ε = 1e-10.
    A NaN ``alpha`` (failed fit) gives NaN ``alpha_weighted`` and ``log_alpha_norm``. An all-zero ESD (a zero
    weight matrix) gives ``norm = lambda_max = 0``, −inf logs, ``matrix_rank = 0`` and NaN ratios, as numpy does in
    WeightWatcher. ``m`` is not used by these formulas; it is accepted so every per-layer kernel takes the same
    ``n, m``.
    """
    rows = norm_metrics_rows(_as_evals(evals)[None], np.array([alpha], dtype=np.float64), n=np.array([n]))
    return {k: int(v[0]) if k == "matrix_rank" else float(v[0]) for k, v in rows.items()}


def norm_metrics_rows(lam: np.ndarray, alpha: np.ndarray, *, n: np.ndarray) -> dict[str, np.ndarray]:
    """``norm_metrics`` of R equally long ESDs at once: ``lam`` (R, L) fp64, ``alpha`` (R,), ``n`` (R,) ->
    ``{column: (R,)}`` (``matrix_rank`` int64), each row as ``norm_metrics`` computes it."""
    lam = np.asarray(lam, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        norm = lam.sum(axis=1)
        lambda_max = lam.max(axis=1)
        log_spectral_norm = np.log10(lambda_max)
        sv = np.sqrt(lam)
        rank = np.count_nonzero(sv > (sv.max(axis=1) * np.asarray(n) * np.finfo(np.float64).eps)[:, None], axis=1)
        p = lam / norm[:, None] + ENTROPY_EPSILON
        entropy = -np.sum(p * np.log(p), axis=1) / np.log(rank + ENTROPY_EPSILON)
        finite = np.isfinite(alpha)
        log_alpha_norm = np.full(len(lam), np.nan)
        if finite.any():
            log_alpha_norm[finite] = np.log10(np.sum(lam[finite] ** alpha[finite, None], axis=1))
        return {
            "norm": norm,
            "log_norm": np.log10(norm),
            "lambda_max": lambda_max,
            "spectral_norm": lambda_max,
            "log_spectral_norm": log_spectral_norm,
            "alpha_weighted": alpha * log_spectral_norm,
            "log_alpha_norm": log_alpha_norm,
            "stable_rank": norm / lambda_max,
            "matrix_rank": rank.astype(np.int64),
            "entropy": entropy,
        }


def mp_fit(evals: np.ndarray, *, n: int, m: int) -> dict:
    """Marchenko–Pastur fit of the ESD, reproducing WeightWatcher 0.7's ``mp_fit`` (spec §8.1), vectorised.

    λ is rescaled to unit mean (``W_scale`` s = √(len λ / Σλ), x = s²λ). σ minimises the squared residual between
    the MP density (or, when Q = n/m == 1, the quarter-circle law on √x) and a linear-kernel KDE (bandwidth 0.1,
    1000 points on [0, max + 0.5], points below 0.01 dropped), with residual 1000 for σ whose bulk edges fall
    outside the KDE's support/peak. WeightWatcher refits the KDE for every σ; it does not depend on σ, so here it
    is evaluated once and the objective is computed for the whole ``scipy.optimize.brute`` grid at once, then
    polished with ``scipy.optimize.fmin`` from the best grid point exactly as ``brute(finish=fmin)`` does.

    Returns ``num_spikes`` (#{x > bulk_max + √TW}), ``sigma_mp``, ``mp_softrank`` (bulk_max / max x),
    ``W_scale``, and ``bulk_max``, ``bulk_min`` in the original units of λ. NaN everywhere when the fit is impossible
    (WeightWatcher writes −1 there).
    """
    lam = _as_evals(evals)
    q = n / m
    w_scale = np.sqrt(lam.shape[0]) / np.sqrt(np.sum(lam))
    x = (w_scale * w_scale) * lam
    lambda_max = np.max(x)
    try:
        sigma = _fit_mp_sigma(x, q)
    except ValueError:
        return dict.fromkeys(MP_COLUMNS, float("nan"))
    bulk_max = (sigma * (1 + 1 / np.sqrt(q))) ** 2
    bulk_min = (sigma * (1 - 1 / np.sqrt(q))) ** 2
    tw = 1 / np.sqrt(q) * np.power(bulk_max, 2 / 3) * np.power(m, -2 / 3)
    return {
        "num_spikes": int(np.count_nonzero(x > bulk_max + np.sqrt(tw))),
        "sigma_mp": float(sigma),
        "mp_softrank": float(bulk_max / lambda_max),
        "W_scale": float(w_scale),
        "bulk_max": float(bulk_max / (w_scale * w_scale)),
        "bulk_min": float(bulk_min / (w_scale * w_scale)),
    }


def detx(evals: np.ndarray) -> dict:
    """The detX = 1 constraint (spec §8.3) on λ sorted ascending.

    With x = λ rescaled to unit mean, scan idx from len−1 down to 1 and stop at the first idx where
    Π x[idx:] < 1: ``detX_num`` = len − idx (len if never). ``detX_val`` = λ[idx] and ``detX_val_unrescaled`` =
    x[idx] — WeightWatcher's names, which are the wrong way round, kept for compatibility. The product is
    evaluated as a sum of logs, so it agrees with WeightWatcher's direct ``np.prod`` except where that
    overflows fp64 (then WeightWatcher never stops and reports len).
    """
    lam = _as_evals(evals)
    count = lam.shape[0]
    if count < 2 or not lam[0] < lam[-1]:
        return {"detX_num": 0, "detX_val": float(lam[0]), "detX_val_unrescaled": float(lam[0])}
    w_scale = np.sqrt(count) / np.sqrt(np.sum(lam))
    x = (w_scale * w_scale) * lam
    with np.errstate(divide="ignore"):
        tail_log = np.cumsum(np.log(x[:0:-1]))  # tail_log[j] = log Π x[count-1-j:]
    hits = np.flatnonzero(tail_log < 0.0)
    if hits.size:
        idx = count - 1 - int(hits[0])
        num = count - idx
    else:
        idx, num = 1, count
    return {"detX_num": int(num), "detX_val": float(lam[idx]), "detX_val_unrescaled": float(x[idx])}


def randomized_eigenvalues(
    stack: np.ndarray, *, rng: np.random.Generator, backend: str = "auto", replicas: int | None = None
) -> np.ndarray:
    """Pooled, sorted ESD of the stack's matrices with their entries randomly permuted (spec §8.2).

    stack: ``(B, N, M)`` as fed to :func:`zooscope.kernels.esd.eigenvalues` (already conv-rescaled); each matrix
    is shuffled independently with the seeded ``rng``. ``replicas`` defaults to WeightWatcher's rule: 5 when the
    layer has fewer than 100 eigenvalues (B·min(N, M)), else 1. Returns ``(replicas·B·min(N, M),)`` fp64 ascending.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"stack must have shape (B, N, M); got shape {stack.shape}")
    batch, rows, cols = stack.shape
    if replicas is None:
        replicas = 5 if batch * min(rows, cols) < RANDOM_REPLICA_LIMIT else 1
    flat = stack.reshape(batch, rows * cols)
    pooled = [
        eigenvalues(rng.permuted(flat, axis=1).reshape(stack.shape), backend=backend).ravel()
        for _ in range(replicas)
    ]
    return np.sort(np.concatenate(pooled))


def randomize_metrics(
    evals: np.ndarray, rand_evals: np.ndarray, rand_single: np.ndarray, *, n: int, m: int
) -> dict:
    """WeightWatcher's ``randomize`` columns (spec §8.2).

    evals: the layer's sorted λ; rand_evals: pooled randomized ESD (all replicas); rand_single: one more
    single-replica randomized ESD, sorted, of the same length as ``evals``.
    ``rand_distance`` is the Jensen–Shannon distance (natural log) between ``evals`` and ``rand_single`` taken as
    index-aligned probability vectors (not a histogram distance); ``ww_softrank`` = max r / max λ;
    ``ww_maxdist`` = max λ − max r; ``max_rand_eval`` = max of ``rand_evals``; ``rand_*`` = :func:`mp_fit` of
    ``rand_evals``.
    """
    lam, pooled, single = _as_evals(evals), _as_evals(rand_evals), _as_evals(rand_single)
    if single.shape != lam.shape:
        raise ValueError(
            f"rand_single must have one value per eigenvalue ({lam.shape[0]}); got {single.shape[0]}"
        )
    out = {
        "max_rand_eval": float(pooled.max()),
        "rand_distance": float(_jensenshannon(np.sort(lam), np.sort(single))),
        "ww_softrank": float(single.max() / lam.max()),
        "ww_maxdist": float(lam.max() - single.max()),
    }
    out.update({f"rand_{k}": v for k, v in mp_fit(pooled, n=n, m=m).items()})
    return out


def _jensenshannon(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.spatial.distance import jensenshannon  # imported here: only randomize needs it

    return jensenshannon(p, q)


def _as_evals(evals: np.ndarray) -> np.ndarray:
    lam = np.asarray(evals, dtype=np.float64).ravel()
    if lam.size == 0:
        raise ValueError("need at least one eigenvalue")
    return lam


def _kde_on_grid(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WeightWatcher's KDE: linear kernel, bandwidth 0.1, evaluated on 1000 points of [0, max + 0.5]."""
    from sklearn.neighbors import KernelDensity

    kde = KernelDensity(kernel="linear", bandwidth=MP_BANDWIDTH).fit(values.reshape(-1, 1))
    xde = np.linspace(0, np.max(values) + 0.5, MP_KDE_POINTS)
    return xde, np.exp(kde.score_samples(xde[:, np.newaxis]))


def _mp_objective(xde: np.ndarray, yde: np.ndarray, n_pad: int, q: float):
    """Sum of squared residuals for an array of σ, operation for operation as WeightWatcher's ``resid_mp``."""
    x = xde[np.newaxis, :]
    if q != 1:
        peak = xde[np.where(yde == max(yde))[0][0]]
        right = max(xde)

    def objective(sigmas: np.ndarray) -> np.ndarray:
        s = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
        with np.errstate(all="ignore"):
            if q == 1:
                dens = np.nan_to_num((1 / (np.pi * s * s)) * np.sqrt(4 - x**2))
                resid = dens - yde
            else:
                y = 1 / q
                b = np.power(s * (1 + np.sqrt(1 / q)), 2)
                a = np.power(s * (1 - np.sqrt(1 / q)), 2)
                dens = np.nan_to_num((1 / (2 * np.pi * s * s * x * y)) * np.sqrt((b - x) * (x - a)))
                penalised = (b < peak) | (b > right) | (a > peak)
                resid = np.where(penalised, MP_PENALTY, dens - yde)
        resid = np.concatenate((resid, np.zeros((resid.shape[0], n_pad))), axis=1)
        return np.sum(resid**2, axis=1)

    return objective


def _fit_mp_sigma(x: np.ndarray, q: float) -> float:
    """σ of the MP (or quarter-circle) law fitted to the rescaled eigenvalues x; ValueError if impossible."""
    to_fit = np.sqrt(x) if q == 1 else x
    xde, yde = _kde_on_grid(to_fit)
    good = yde > MP_KDE_THRESH
    n_pad = int(np.count_nonzero(yde < MP_KDE_THRESH))
    if not good.any():
        raise ValueError("the KDE of the ESD is below 0.01 everywhere")
    objective = _mp_objective(xde[good], yde[good], n_pad, q)
    s0 = np.sqrt(np.max(x) / np.square(1 + 1.0 / np.sqrt(q)))
    grid = np.mgrid[slice(0.05 * s0, 2.0 * s0, 0.01 * s0)]
    start = grid[np.argmin(objective(grid))]
    import scipy.optimize  # imported here: 0.3 s that only MP fits need

    polished = scipy.optimize.fmin(lambda p: objective(p)[0], start, full_output=True, disp=False)
    return float(polished[0][0])
