"""Eigenvalues of WᵀW for batches of equally-shaped matrices, on CPU or GPU.

The eigenvalues λ of X = WᵀW are the squared singular values of W (no 1/N factor), exactly what
WeightWatcher computes (spec §4.1). Two routes, several libraries:

- SVD (``numpy-svd``, ``scipy-gesdd``, ``torch-svd``, ``cupy-svd``): λ = σ², fp64 or fp32.
- Gram + symmetric eigensolver (``numpy-gram-eigh``, ``torch-gram-eigh``, ``cupy-gram-eigh``): the Gram
  matrix of the smaller side in fp64, then a batched ``eigvalsh``. fp64 only: an fp32 Gram matrix squares the
  condition number and loses everything below about λmax·1e-7.
  Even in fp64 the Gram route has an absolute noise floor of about λmax·1e-16 (estimated as
  ``(N + M)·eps·λmax``): eigenvalues that LAPACK SVD puts near 0 come out near that floor instead, so the
  rank columns (``rank_loss``, ``matrix_rank``, thresholds σ > σmax·N·2.2e-16) and the smallest eigenvalues
  of ill-conditioned matrices differ from WeightWatcher's.
- Checked Gram (``numpy-gram-checked``, ``torch-gram-checked``, ``cupy-gram-checked``): the Gram route, then
  the eigenvalues that the rounding estimate ``(N + M)·eps·λmax`` cannot certify to ``CHECKED_ACCURACY``
  relative are solved again: a few smallest ones of a matrix of side ≥ ``ITERATION_MIN_SIDE`` by inverse iteration
  with W's inverse (``kernels.smallest``), more than that, or those of a smaller matrix, by the same library's fp64
  SVD of the whole matrix. Every eigenvalue is then
  within ``CHECKED_ACCURACY`` (1e-6) relative of LAPACK SVD's, rank columns included, at the Gram route's
  speed for the well-conditioned matrices that trained layers mostly are.

``scipy-gesdd`` loops over the batch with ``scipy.linalg.svd(W, compute_uv=False)``: WeightWatcher's exact path.
``auto`` picks a backend with :func:`resolve_backend`, from a measured :class:`RoutingTable` when one is given;
it only picks routes that keep that 1e-6 guarantee (:func:`auto_eligible`: SVD and checked Gram).
GPU libraries are imported lazily; a missing library or device raises ``BackendUnavailable``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zooscope.kernels.backends import (BackendUnavailable, cupy_available, device_key, gpu_available, map_row_blocks,
                                       map_threads, one_blas_thread, release_gpu_pools, torch_cuda_available)
from zooscope.kernels.smallest import smallest_gram_eigenvalues

BACKENDS: tuple[str, ...] = (
    "numpy-svd",
    "scipy-gesdd",
    "numpy-gram-eigh",
    "torch-svd",
    "torch-gram-eigh",
    "cupy-svd",
    "cupy-gram-eigh",
    "numpy-gram-checked",
    "torch-gram-checked",
    "cupy-gram-checked",
)
PRECISIONS: tuple[str, ...] = ("fp64", "fp32")
WEAK_RANK_TOLERANCE = 1e-6
"""λ below this count towards ``weak_rank_loss`` (WeightWatcher's ``WEAK_RANK_LOSS_TOLERANCE``)."""
CHECKED_ACCURACY = 1e-6
"""Relative accuracy that the checked Gram routes certify for every eigenvalue (else they fall back to SVD)."""
ITERATION_MIN_SIDE = 128
"""Smaller side from which the checked Gram routes re-solve uncertain eigenvalues by inverse iteration; below it a
whole SVD of the matrix is cheaper (``bench/smallest.py --sides``: 0.02 against 0.19 ms at 16×16, 0.16 against
0.29 ms at 64, even at 128)."""
CHUNK_BYTES = 1 << 28
"""Upper bound on the fp64 bytes (input plus Gram matrices) of one batch chunk handed to a solver."""

_log = logging.getLogger(__name__)
_GPU_STACK_MAX_SIDE = 512
_GPU_STACK_MIN_BATCH = 32
_GPU_SMALL_SIDE = 128


def is_gram(backend: str) -> bool:
    """True for the Gram + ``eigvalsh`` backends, checked or not (fp64 only)."""
    return "-gram-" in backend


def auto_eligible(backend: str) -> bool:
    """True for the routes ``auto`` may take: SVD, or checked Gram (every λ within 1e-6 of LAPACK SVD's)."""
    return not is_gram(backend) or backend.endswith("-checked")


def backend_available(backend: str) -> bool:
    """True when ``backend`` can run on this machine (torch backends run on CPU too)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown eigenvalue backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend.startswith("cupy"):
        return cupy_available()
    if backend.startswith("torch"):
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
    return True


def size_class(k: int) -> int:
    """Routing bucket of a matrix by its smaller side ``k``: the next power of two, at least 32."""
    return max(32, 1 << max(0, math.ceil(math.log2(max(k, 1)))))


def batch_class(batch: int) -> int:
    """Routing bucket of a stack by its batch size: the next power of four (1, 4, 16, 64, ...)."""
    return 4 ** max(0, math.ceil(math.log(max(batch, 1), 4) - 1e-12))


@dataclass(frozen=True)
class Route:
    """One routing rule: the fastest measured backend for a (precision, size class, batch class) bucket.

    ``times`` holds (backend, seconds per call) pairs as measured, for the record.
    """

    precision: str
    size_class: int
    batch_class: int
    backend: str
    times: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "size_class": self.size_class,
            "batch_class": self.batch_class,
            "backend": self.backend,
            "times": dict(self.times),
        }


@dataclass(frozen=True)
class RoutingTable:
    """Measured routing rules that ``backend="auto"`` consults (built by ``zooscope.engine.tune``).

    A lookup picks the rule of the same precision whose (log2 size class, log4 batch class) is nearest, skipping
    rules whose backend cannot run here or is not :func:`auto_eligible`. ``machine`` names where it was measured;
    ``device`` is the :func:`~zooscope.kernels.backends.device_key` it was measured on (``"cuda:<GPU name>"`` or
    ``"cpu:<CPU model>"``): :func:`resolve_backend` ignores a table of another device. ``""``: any device.
    """

    routes: tuple[Route, ...]
    machine: str = ""
    device: str = ""

    def backend_for(self, batch: int, n: int, m: int, precision: str = "fp64") -> str | None:
        """The measured backend for a ``(batch, n, m)`` stack, or None when no runnable rule applies."""
        s, b = size_class(min(n, m)), batch_class(batch)
        usable = [r for r in self.routes
                  if r.precision == precision and auto_eligible(r.backend) and backend_available(r.backend)]
        if not usable:
            return None
        best = min(
            usable,
            key=lambda r: (abs(math.log2(r.size_class / s)), abs(math.log(r.batch_class / b, 4)), r.size_class),
        )
        return best.backend

    def as_dict(self) -> dict:
        """JSON-serialisable form (see :meth:`from_dict`)."""
        return {"machine": self.machine, "device": self.device, "routes": [r.as_dict() for r in self.routes]}

    @classmethod
    def from_dict(cls, data: dict) -> RoutingTable:
        routes = tuple(
            Route(
                precision=str(r["precision"]),
                size_class=int(r["size_class"]),
                batch_class=int(r["batch_class"]),
                backend=str(r["backend"]),
                times=tuple((str(k), float(v)) for k, v in r.get("times", {}).items()),
            )
            for r in data["routes"]
        )
        for r in routes:
            _check_backend_precision(r.backend, r.precision)
        return cls(routes=routes, machine=str(data.get("machine", "")), device=str(data.get("device", "")))


Tables = RoutingTable | Sequence[RoutingTable]
"""What ``table=`` accepts: one routing table, or several (one per device), of which the caller's device picks."""

_ignored_logged: set[tuple[str, tuple[str, ...]]] = set()


def table_for_device(table: Tables | None, device: str | None = None) -> RoutingTable | None:
    """The table measured on ``device`` (default: this process's :func:`~zooscope.kernels.backends.device_key`),
    else one that names no device, else None. A table of another device is ignored, with an INFO log line once
    per process: its timings say nothing about this one (a CPU login node's table would keep a GPU worker on CPU
    routes)."""
    if table is None:
        return None
    tables = (table,) if isinstance(table, RoutingTable) else tuple(table)
    here = device_key() if device is None else device
    for wanted in (here, ""):
        for candidate in tables:
            if candidate.device == wanted:
                return candidate
    seen = (here, tuple(t.device for t in tables))
    if tables and seen not in _ignored_logged:
        _ignored_logged.add(seen)
        _log.info("routing table measured on %s ignored on %s: built-in routing rule used (run `zooscope bench svd "
                  "--tune` on this device)", " and ".join(seen[1]), here)
    return None


def resolve_backend(batch: int, n: int, m: int, precision: str = "fp64", table: Tables | None = None) -> str:
    """The concrete backend that ``backend="auto"`` uses for a ``(batch, n, m)`` stack, on this process's device.

    With a table measured on this device (:func:`table_for_device`; several tables may be given, one per device),
    its nearest runnable, :func:`auto_eligible` rule. Otherwise, fp64: ``numpy-gram-checked`` on
    machines without a GPU (about 2.5x faster end to end than LAPACK SVD on trained models, every λ within 1e-6
    of it); on GPU machines the H100 rule of thumb, checked — CuPy's batched Jacobi ``eigvalsh`` for stacks of
    small matrices (smaller side ≤ 128, or ≤ 512 with ≥ 32 matrices), torch's fp64 Gram ``eigvalsh`` for few
    large ones.
    fp32: ``scipy-gesdd`` on CPU, torch (or CuPy) SVD on GPU.
    """
    _check_precision(precision)
    table = table_for_device(table)
    if table is not None:
        chosen = table.backend_for(batch, n, m, precision)
        if chosen is not None:
            return chosen
    if not gpu_available():
        return "scipy-gesdd" if precision == "fp32" else "numpy-gram-checked"
    if precision == "fp32":
        return "torch-svd" if torch_cuda_available() else "cupy-svd"
    k = min(n, m)
    stack = k <= _GPU_SMALL_SIDE or (k <= _GPU_STACK_MAX_SIDE and batch >= _GPU_STACK_MIN_BATCH)
    if cupy_available() and (stack or not torch_cuda_available()):
        return "cupy-gram-checked"
    return "torch-gram-checked"


def eigenvalues(
    stack: np.ndarray, *, backend: str = "auto", precision: str = "fp64", table: Tables | None = None
) -> np.ndarray:
    """Eigenvalues of WᵀW for each matrix of a stack (:func:`eigenvalues_with_routes` without the routes).

    stack: ``(B, N, M)`` real floats (any float dtype; N ≥ M not required).
    Returns ``(B, min(N, M))`` fp64, ascending per row, clipped at 0 from below (units of W²).
    """
    return eigenvalues_with_routes(stack, backend=backend, precision=precision, table=table)[0]


def eigenvalues_with_routes(
    stack: np.ndarray, *, backend: str = "auto", precision: str = "fp64", table: Tables | None = None
) -> tuple[np.ndarray, list[str]]:
    """Eigenvalues of WᵀW for each matrix of a stack, and the route that solved each matrix.

    stack: ``(B, N, M)`` real floats (any float dtype; N ≥ M not required).
    Returns ``(evals, routes)``: ``evals`` ``(B, min(N, M))`` fp64, ascending per row, clipped at 0 from below
    (units of W²); ``routes`` B strings, the concrete backend (``auto`` resolved), or ``"<backend>:<solver>-fallback"``
    for a matrix whose planned symmetric eigensolver did not converge (cuSOLVER's info, or non-finite eigenvalues
    of a finite matrix) and that was solved again by ``syevd`` (after batched Jacobi) or by that library's SVD.
    Batches are solved in chunks of at most ``CHUNK_BYTES`` so memory stays bounded. GPU backends copy the stored
    dtype (e.g. fp16) to the device and widen it there (exactly), and release their allocators' cached blocks
    after the stack (:func:`~zooscope.kernels.backends.release_gpu_pools`); CPU backends widen one chunk at a time.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"stack must have shape (B, N, M); got shape {stack.shape}")
    if not np.issubdtype(stack.dtype, np.floating):
        raise ValueError(f"stack must hold real floats; got dtype {stack.dtype}")
    _check_precision(precision)
    batch, n, m = stack.shape
    if backend == "auto":
        backend = resolve_backend(batch, n, m, precision, table)
    _check_backend_precision(backend, precision)
    if not backend_available(backend):
        raise BackendUnavailable(f"eigenvalue backend {backend!r} needs a library or GPU that this machine lacks")
    k = min(n, m)
    out = np.empty((batch, k), dtype=np.float64)
    routes = [backend] * batch
    if batch == 0 or k == 0:
        return out, routes
    solve = _SOLVERS[backend]
    dtype = np.float64 if precision == "fp64" else np.float32
    step = max(1, CHUNK_BYTES // (8 * (n * m + k * k)))
    try:
        for start in range(0, batch, step):
            lam, fallbacks = solve(np.ascontiguousarray(stack[start : start + step]), dtype)
            out[start : start + step] = lam
            for i, solver in fallbacks.items():
                routes[start + i] = f"{backend}:{solver}-fallback"
    finally:
        if backend.startswith(("cupy", "torch")):
            release_gpu_pools()
    np.maximum(out, 0.0, out=out)
    out.sort(axis=1)
    return out, routes


def gram_rounding(n: int, m: int, lam_max: np.ndarray | float) -> np.ndarray | float:
    """Estimated absolute rounding error ``(N + M)·eps·λmax`` of eigenvalues of WᵀW from its fp64 Gram matrix.

    Summation error of forming WᵀW plus ``eigvalsh``'s backward error; not a worst-case bound (which grows with
    N·‖W‖²_F and would certify almost nothing). Measured errors on trained layers are 14–50x below it.
    """
    return (n + m) * np.finfo(np.float64).eps * lam_max


def singular_value_stats(evals_per_slice: np.ndarray, n: int, *, ww_sv_min: bool = False,
                         weak_rank_tolerance: float = WEAK_RANK_TOLERANCE) -> dict:
    """Singular-value columns of one layer (WeightWatcher spec §4.1) from per-slice eigenvalues.

    evals_per_slice: ``(B, M)`` eigenvalues of WᵀW per slice (already conv-rescaled); n: the layer's N.
    Returns ``sv_max`` (largest σ), ``sv_min`` (smallest σ over all slices), ``rank_loss``
    (Σ over slices of ``M − #{σ > σmax_slice·n·eps64}``) and ``weak_rank_loss`` (``#{λ < weak_rank_tolerance}``).

    ``sv_min`` deliberately differs from WeightWatcher 0.7, which reports the *maximum* over slices of the slice
    minimum (``min_sv = max(min_sv, min(sv))``) — a bug; here it is the global minimum, unless ``ww_sv_min``
    asks for WeightWatcher's. The two agree for single-matrix (dense) layers.
    """
    lam = np.asarray(evals_per_slice, dtype=np.float64)
    if lam.ndim != 2 or lam.size == 0:
        raise ValueError(f"evals_per_slice must have shape (B, M) with B, M > 0; got {lam.shape}")
    rows = singular_value_stats_rows(lam[None], n, ww_sv_min=ww_sv_min, weak_rank_tolerance=weak_rank_tolerance)
    return {k: v[0].item() for k, v in rows.items()}


def singular_value_stats_rows(evals: np.ndarray, n: int, *, ww_sv_min: bool = False,
                              weak_rank_tolerance: float = WEAK_RANK_TOLERANCE) -> dict[str, np.ndarray]:
    """``singular_value_stats`` of R same-shaped layers at once: ``evals`` (R, B, M) -> ``{column: (R,)}``."""
    lam = np.maximum(np.asarray(evals, dtype=np.float64), 0.0)
    r = lam.shape[0]
    sv = np.sqrt(lam)
    slice_max = sv.max(axis=2, keepdims=True)
    kept = np.count_nonzero((sv > slice_max * n * np.finfo(np.float64).eps).reshape(r, -1), axis=1)
    flat = sv.reshape(r, -1)
    return {
        "sv_max": flat.max(axis=1),
        "sv_min": sv.min(axis=2).max(axis=1) if ww_sv_min else flat.min(axis=1),
        "rank_loss": (flat.shape[1] - kept).astype(np.int64),
        "weak_rank_loss": np.count_nonzero(lam.reshape(r, -1) < weak_rank_tolerance, axis=1).astype(np.int64),
    }


def inverse_eigenvalues(evals: np.ndarray, *, ww_alternating: bool = False) -> np.ndarray:
    """1/λ of R layers' per-slice eigenvalues ``evals`` (R, B, M) fp64 (WeightWatcher's ``inverse=True``).

    ``ww_alternating``: WeightWatcher 0.7.7's bug, which inverts its running pooled ESD after appending each slice,
    so slice b of B is inverted B − b times: only the slices with B − b odd (the last, third last, ...) end up
    inverted. λ = 0 gives +inf.
    """
    out = np.array(evals, dtype=np.float64)
    depth = out.shape[1]
    flip = (depth - np.arange(depth)) % 2 == 1 if ww_alternating else np.ones(depth, bool)
    with np.errstate(divide="ignore"):
        out[:, flip] = 1.0 / out[:, flip]
    return out


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


def _check_backend_precision(backend: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown eigenvalue backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    _check_precision(precision)
    if precision == "fp32" and is_gram(backend):
        raise ValueError(
            f"backend {backend!r} is fp64-only: an fp32 Gram matrix WᵀW squares the condition number, so every "
            "eigenvalue below about λmax·1e-7 is lost to rounding (errors of hundreds of percent on the low end, "
            "negative eigenvalues); use an SVD backend for fp32, or precision='fp64'"
        )


def _gram(x, transpose):
    """Gram matrix of the smaller side of each matrix in a (b, N, M) stack (numpy, torch or cupy arrays)."""
    n, m = x.shape[-2:]
    xt = transpose(x)
    return xt @ x if n >= m else x @ xt


def _svdvals(x: np.ndarray) -> np.ndarray:
    return np.linalg.svd(x, compute_uv=False)


def _numpy_svd(x: np.ndarray, dtype) -> np.ndarray:
    x = x.astype(dtype, copy=False)
    with one_blas_thread():
        sv = map_row_blocks(_svdvals, x).astype(np.float64)
    return sv * sv


def _scipy_gesdd(x: np.ndarray, dtype) -> np.ndarray:
    import scipy.linalg

    def gesdd(block: np.ndarray) -> np.ndarray:
        return np.stack([scipy.linalg.svd(w, compute_uv=False, lapack_driver="gesdd") for w in block])

    x = x.astype(dtype, copy=False)
    with one_blas_thread():
        sv = map_row_blocks(gesdd, x).astype(np.float64)
    return sv * sv


def _resolve_failures(lam: np.ndarray, todo, finite: np.ndarray, solve_one, svd_one, errors,
                      label: str | None) -> dict[int, str]:
    """Solve the matrices ``todo`` of a chunk again, one at a time: ``solve_one(i)`` (a 2-D ``eigvalsh``), and
    ``svd_one(i)`` (λ = σ² of W) where that raises one of ``errors`` or returns non-finite values. A matrix with
    non-finite entries (``finite[i]`` False) gets NaN eigenvalues, not a fallback. Writes ``lam[i]`` (ascending);
    returns {i: solver} for the matrices whose route differs from the planned one (``label``, or ``"svd"``)."""
    fallbacks = {}
    for i in todo:
        if not finite[i]:
            lam[i] = np.nan
            continue
        try:
            row = np.asarray(solve_one(i), dtype=np.float64)
            if not np.isfinite(row).all():
                raise FloatingPointError("non-finite eigenvalues of a finite matrix")
            if label:
                fallbacks[i] = label
        except (FloatingPointError, *errors):
            row = np.sort(np.asarray(svd_one(i), dtype=np.float64))
            fallbacks[i] = "svd"
        lam[i] = row
    return fallbacks


def _failed_rows(lam: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Indices of rows of ``lam`` with a non-finite value whose matrix was finite (a solver failure)."""
    return np.flatnonzero(~np.isfinite(lam).all(axis=1) & finite)


def _numpy_gram(x: np.ndarray) -> np.ndarray:
    return _gram(x, lambda a: a.transpose(0, 2, 1))


def _numpy_gram_eigh(x: np.ndarray, dtype) -> tuple[np.ndarray, dict[int, str]]:
    """numpy's Gram matrices and ``eigvalsh`` (LAPACK ``syevd``), single-threaded, in row blocks: OpenBLAS's threaded
    ``syrk``/``gemm`` and ``syevd`` of large matrices round differently from the single-threaded ones."""
    with one_blas_thread():
        g = map_row_blocks(_numpy_gram, x.astype(dtype, copy=False))
        finite = np.isfinite(g).all(axis=(1, 2))
        try:
            lam = map_row_blocks(np.linalg.eigvalsh, g)
            todo = _failed_rows(lam, finite)
        except np.linalg.LinAlgError:  # LAPACK's syevd did not converge on some matrix of the chunk
            lam, todo = np.empty(g.shape[:2]), range(len(g))
        return lam, _resolve_failures(lam, todo, finite, lambda i: np.linalg.eigvalsh(g[i]),
                                      lambda i: _numpy_svd(x[i : i + 1], dtype)[0], (np.linalg.LinAlgError,), None)


def _to_torch(x: np.ndarray, dtype):
    """(torch, ``x`` on torch's device widened to ``dtype`` there): the stored dtype crosses the bus."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a hard dependency
        raise BackendUnavailable("torch is not installed") from exc
    device = torch.device("cuda" if torch_cuda_available() else "cpu")
    return torch, torch.from_numpy(x).to(device).to(torch.float64 if dtype == np.float64 else torch.float32)


def _torch_svd(x: np.ndarray, dtype) -> np.ndarray:
    torch, t = _to_torch(x, dtype)
    sv = torch.linalg.svdvals(t).cpu().numpy().astype(np.float64)
    return sv * sv


def _torch_gram_eigh(x: np.ndarray, dtype) -> tuple[np.ndarray, dict[int, str]]:
    """torch's ``eigvalsh`` on the stack (torch picks its solver; it raises ``LinAlgError`` on non-convergence)."""
    torch, t = _to_torch(x, dtype)
    g = _gram(t, lambda a: a.transpose(-2, -1))
    finite = torch.isfinite(g).all(dim=-1).all(dim=-1).cpu().numpy()
    try:
        lam = torch.linalg.eigvalsh(g).cpu().numpy()
        todo = _failed_rows(lam, finite)
    except torch.linalg.LinAlgError:
        lam, todo = np.empty(tuple(g.shape[:2])), range(g.shape[0])
    return lam, _resolve_failures(lam, todo, finite, lambda i: torch.linalg.eigvalsh(g[i]).cpu().numpy(),
                                  lambda i: _torch_svd(x[i : i + 1], dtype)[0], (torch.linalg.LinAlgError,), None)


def _cupy():
    if not cupy_available():
        raise BackendUnavailable("CuPy backends need CuPy and a CUDA device")
    import cupy

    return cupy


def _cupy_svd(x: np.ndarray, dtype) -> np.ndarray:
    cp = _cupy()
    sv = cp.asnumpy(cp.linalg.svd(cp.asarray(x).astype(dtype, copy=False), compute_uv=False)).astype(np.float64)
    return sv * sv


def _cupy_gram_eigh(x: np.ndarray, dtype) -> tuple[np.ndarray, dict[int, str]]:
    """Solver by shape: one matrix → ``cupy.linalg.eigvalsh`` of the 2-D Gram matrix (cuSOLVER ``syevd``,
    divide and conquer, backward stable); a stack → of the 3-D stack (``syevjBatched``, batched Jacobi).

    Both run under ``cupyx.errstate(linalg="raise")``, so cuSOLVER's ``info`` ≠ 0 (Jacobi's sweeps exhausted,
    ``syevd`` not converged) raises instead of passing silently. Then, for non-finite eigenvalues of a finite
    matrix, and where cuSOLVER refuses the batched call (``CUSOLVERError``, e.g. a size its version does not batch),
    the matrices are solved again one by one with ``syevd``, and with CuPy's SVD where that fails too.
    The stored dtype crosses the bus; the widening to ``dtype`` happens on the device.
    """
    cp = _cupy()
    import cupyx

    g = _gram(cp.asarray(x).astype(dtype, copy=False), lambda a: a.transpose(0, 2, 1))

    def syevd(i):
        with cupyx.errstate(linalg="raise"):
            return cp.asnumpy(cp.linalg.eigvalsh(g[i]))

    finite = cp.asnumpy(cp.isfinite(g).all(axis=(1, 2)))
    if g.shape[0] == 1:
        lam, todo, label = np.empty(g.shape[:2]), [0], None
    else:
        label = "syevd"
        try:
            with cupyx.errstate(linalg="raise"):
                lam = cp.asnumpy(cp.linalg.eigvalsh(g))
            todo = _failed_rows(lam, finite)
        except (np.linalg.LinAlgError, *_cusolver_errors()):  # info is checked for the whole batch
            lam, todo = np.empty(g.shape[:2]), range(g.shape[0])
    return lam, _resolve_failures(lam, todo, finite, syevd, lambda i: _cupy_svd(x[i : i + 1], dtype)[0],
                                  (np.linalg.LinAlgError,), label)


def _cusolver_errors() -> tuple[type[Exception], ...]:
    """CuPy's exception for a cuSOLVER call that returned an error status (none where CuPy lacks the module)."""
    try:
        from cupy_backends.cuda.libs.cusolver import CUSOLVERError
    except ImportError:
        return ()
    return (CUSOLVERError,)


def _checked(gram_solver, svd_solver):
    """A solver that keeps ``gram_solver``'s eigenvalues where the rounding estimate certifies them.

    An eigenvalue is kept when :func:`gram_rounding` is at most ``CHECKED_ACCURACY`` of it. The uncertain ones,
    always the smallest, are re-solved by :func:`~zooscope.kernels.smallest.smallest_gram_eigenvalues` (proven to
    ``CHECKED_ACCURACY / 10``, the first kept eigenvalue bounding the gap); matrices where that fails (many
    uncertain values, exact zeros) or whose smaller side is under ``ITERATION_MIN_SIDE`` by the same library's
    fp64 SVD.
    """

    def solve(x, dtype):
        lam, fallbacks = gram_solver(x, dtype)  # ascending per row
        noise = gram_rounding(*x.shape[-2:], lam[:, -1])
        uncertain = np.count_nonzero(~(lam * CHECKED_ACCURACY >= noise[:, None]), axis=1)  # NaN counts too
        rows = np.flatnonzero(uncertain).tolist()

        def smallest(i: int) -> np.ndarray | None:
            k = uncertain[i]
            return None if k == lam.shape[1] else smallest_gram_eigenvalues(
                x[i], k, lam_max=lam[i, -1], next_lower=lam[i, k] - noise[i], accuracy=CHECKED_ACCURACY / 10)

        m = min(x.shape[-2:])
        if m < ITERATION_MIN_SIDE:
            whole = rows
        else:
            whole = []
            with one_blas_thread():  # numpy's LAPACK on the CPU, whatever the Gram solver's device
                lows = map_threads(smallest, rows, len(rows) * m * m)
            for i, low in zip(rows, lows):
                if low is None:
                    whole.append(i)
                else:
                    lam[i, :uncertain[i]] = low
        if whole:
            lam[whole] = svd_solver(x[whole], dtype)
        return lam, fallbacks

    return solve


def _no_fallback(solver):
    """An SVD solver in the ``(eigenvalues, fallbacks)`` form of the Gram solvers (SVDs have no fallback)."""
    return lambda x, dtype: (solver(x, dtype), {})


_SOLVERS = {
    "numpy-svd": _no_fallback(_numpy_svd),
    "scipy-gesdd": _no_fallback(_scipy_gesdd),
    "numpy-gram-eigh": _numpy_gram_eigh,
    "torch-svd": _no_fallback(_torch_svd),
    "torch-gram-eigh": _torch_gram_eigh,
    "cupy-svd": _no_fallback(_cupy_svd),
    "cupy-gram-eigh": _cupy_gram_eigh,
    # numpy's SVD, not scipy's: numpy and scipy each bundle an OpenBLAS whose idle threads spin for a while, and
    # alternating between the two pools doubled the fallback's time on 2 cores (MiniLM: 1.96 s against 1.06 s)
    "numpy-gram-checked": _checked(_numpy_gram_eigh, _numpy_svd),
    "torch-gram-checked": _checked(_torch_gram_eigh, _torch_svd),
    "cupy-gram-checked": _checked(_cupy_gram_eigh, _cupy_svd),
}
