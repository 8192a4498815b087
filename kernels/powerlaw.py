"""Power-law fits of eigenvalue tails (Clauset, Shalizi & Newman 2009), WeightWatcher-compatible by default.

Default fit = WeightWatcher 0.7.5.5 ``WWFit`` (spec §5.1–5.2): the values ``x = sort(evals[evals > thresh])``,
every value but the largest is a candidate ``xmin``, ``alpha = 1 + n / sum(ln(x/xmin))`` over the ``n``
values of the tail, ``D = max |1 - (x/xmin)^(1-alpha) - k/n|`` against the lower empirical step ``k/n``
(``D = 1`` if ``alpha <= 1``), the first argmin of ``D`` wins, ``sigma = (alpha - 1)/sqrt(n)``, ``xmax`` is
the largest fitted value and ``num_pl_spikes = #{evals >= xmin}`` over all eigenvalues.

Backends compute the same scan: ``numpy`` (plain O(N²) reference), ``numba`` (pruned exact kernel, default),
``cuda`` (one GPU launch for all ESDs of :func:`fit_many`; a KS normalised by ``xmax`` with ``mode='powerlaw'``
runs on the numba kernel, and ``xmin_peak`` scans each ESD on its own, as its candidate range is per ESD).
A fit that cannot be made (fewer than two values above ``thresh``, non-finite input, no candidate left) has
``status='failed'``, NaN numbers and no warning.

Options (keyword arguments of :func:`fit` and :func:`fit_many`):

- ``xmin``: ``None``; a float (fixed xmin: the smallest value ``>= xmin`` is the only candidate); or a pair
  ``(lo, hi)`` (candidates restricted to ``lo <= x <= hi``).
- ``xmax``: ``None``; a float (values above it are dropped before fitting, the likelihood is not truncated,
  as in WWFit and powerlaw 1.5; with ``mode='powerlaw'`` the KS model CDF is renormalised to ``[xmin, xmax]``
  as powerlaw 1.5 does, spec §5.5 step 4); ``'force'`` (``mode='powerlaw'`` only, WeightWatcher's
  ``xmax='force'``: the float xmax ``max(evals)``); or an ``int`` ``k`` (WeightWatcher: the top ``|k|``
  eigenvalues are removed first, ``num_pl_spikes`` is counted on what remains; ``|k| > len/2`` fails —
  WeightWatcher logs a failure there and then fits anyway, see DIFFERENCES — and ``k = 0`` or ``False``
  removes everything and fails). The reported ``xmax`` is the largest fitted value with ``mode='ww'``
  (WWFit) and, as powerlaw 1.5's ``Fit.xmax``, the given or forced bound (NaN if none) with ``mode='powerlaw'``,
  failed fits included.
- ``fix_fingers='clip_xmax'`` (spec §5.3) with ``max_fingers=10`` and ``finger_thresh=1.0``: fills
  ``raw_alpha`` and ``num_fingers``; with a given or forced xmax, each clipped fit's KS bound is the clipped
  value just above its sample, as in WeightWatcher.
- ``fix_fingers='xmin_peak'`` (spec §5.3): ``peak = 10**(left edge of the fullest of 100 bins of
  log10(fitted values))`` and the xmin candidates are restricted to ``[0.95·peak, xmin_max]`` (``xmin_max``
  defaults to ``1.5·peak``; an empty range fails). ``xmin_peak_ww_range=True`` reproduces WeightWatcher 0.7's
  range instead, whose lower end is in log10 units: ``[min(log10(0.95·peak), xmin_max), max(...)]``.
- ``min_tail``: candidates need a tail of at least this many values (default 2, i.e. no constraint).
- ``small_n=True``: WeightWatcher 0.7.7's branch for fewer than 20 values (spec §10).
- ``mode='powerlaw'``: powerlaw 1.5's scan (distinct candidates, ECDF on distinct values, ``D = max(D+, D-)``).
- ``distribution='truncated_power_law'`` (``mode='powerlaw'`` only; WeightWatcher's ``fit='TPL'``, spec §5.4):
  powerlaw 1.5's scan with ``xmin_distribution='truncated_power_law'``: at every candidate the truncated
  power law is fitted by the same Nelder–Mead (``scipy.optimize.fmin``, same start, mpmath's incomplete gamma)
  and D is its KS distance; ``alpha``/``tpl_alpha``, ``Lambda``, ``D`` are the TPL's and ``sigma`` is NaN.
  Slow (pure Python, O(candidates × tail) incomplete-gamma evaluations), as in WeightWatcher.
- ``tpl=True``: truncated power law ``x^-a exp(-Lambda x)`` fitted by maximum likelihood at the chosen
  xmin (``tpl_alpha``, ``Lambda``, ``tpl_loglik``); ``compare=True``: normalised log-likelihood ratios
  ``R``/``p`` of the power law against an exponential and a lognormal tail (powerlaw's
  ``distribution_compare(..., normalized_ratio=True)``; ``R > 0`` favours the power law).
- ``bootstrap=B`` with ``seed``: the semi-parametric goodness-of-fit ``p_value`` (Clauset et al. §4.1: the
  fraction of synthetic data sets, power law above xmin and resampled data below, whose refitted ``D`` is at
  least the observed one) and a percentile interval ``(alpha_ci_low, alpha_ci_high)`` at level ``ci=0.95``
  from a non-parametric bootstrap (data resampled with replacement, full refit).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from zooscope.kernels.backends import BackendUnavailable

EVALS_THRESH = 1e-5
"""WeightWatcher's absolute eigenvalue threshold for the fit (``constants.EVALS_THRESH``)."""
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0
SMALL_N_CUTOFF = 20
"""WeightWatcher 0.7.7 uses its small-N branch below this many values (``small_n=True``)."""
SMALL_N_MIN_TAIL = 8
BACKENDS = ("numpy", "numba", "cuda")
MODES = ("ww", "powerlaw")
DISTRIBUTIONS = ("power_law", "truncated_power_law")
FIX_FINGERS = (None, False, "clip_xmax", "xmin_peak")
PEAK_BINS = 100
"""WeightWatcher's ``xmin_peak``: bins of the log10 histogram whose fullest bin gives the peak."""
_NAN = float("nan")


@dataclass(frozen=True)
class PowerLawFit:
    """One power-law fit of an ESD (eigenvalues of WᵀW, no units). NaN where not computed or failed."""

    alpha: float = _NAN
    xmin: float = _NAN
    xmax: float = _NAN
    D: float = _NAN
    sigma: float = _NAN
    num_pl_spikes: float = _NAN
    n_tail: float = _NAN
    status: str = "failed"
    warning: str = ""
    raw_alpha: float = _NAN
    num_fingers: float = _NAN
    tpl_alpha: float = _NAN
    Lambda: float = _NAN
    tpl_loglik: float = _NAN
    R_exponential: float = _NAN
    p_exponential: float = _NAN
    R_lognormal: float = _NAN
    p_lognormal: float = _NAN
    p_value: float = _NAN
    alpha_ci_low: float = _NAN
    alpha_ci_high: float = _NAN

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (one table row)."""
        return dataclasses.asdict(self)


_TABLE_FIELDS = tuple(f.name for f in dataclasses.fields(PowerLawFit))
#: Fields only an option computes (NaN in every other fit), by the test of that option.
_OPTIONAL_FIELDS = (
    (lambda o: o.fix_fingers == "clip_xmax", ("raw_alpha", "num_fingers")),
    (lambda o: o.tpl or o.distribution == "truncated_power_law", ("tpl_alpha", "Lambda", "tpl_loglik")),
    (lambda o: o.compare, ("R_exponential", "p_exponential", "R_lognormal", "p_lognormal")),
    (lambda o: o.bootstrap, ("p_value", "alpha_ci_low", "alpha_ci_high")),
)


@dataclass(frozen=True)
class _Options:
    xmin: Any = None
    xmax: Any = None
    fix_fingers: Any = None
    max_fingers: int = 10
    finger_thresh: float = 1.0
    xmin_max: Any = None
    xmin_peak_ww_range: bool = False
    distribution: str = "power_law"
    min_tail: int = 2
    small_n: bool = False
    mode: str = "ww"
    tpl: bool = False
    compare: bool = False
    bootstrap: int = 0
    seed: Any = None
    ci: float = 0.95


@dataclass(frozen=True)
class _Core:
    """The scan's winner on the fitted values ``x`` (ascending)."""

    x: np.ndarray
    i: int
    alpha: float
    D: float

    @property
    def xmin(self) -> float:
        return float(self.x[self.i])

    @property
    def n_tail(self) -> int:
        return self.x.size - self.i


# --------------------------------------------------------------------------------------------- public API


def fit(evals: np.ndarray, *, backend: str = "numba", thresh: float = EVALS_THRESH, **options) -> PowerLawFit:
    """Fit the tail of one ESD ``evals`` (1-D, any order) with a continuous power law; see the module doc."""
    return fit_many([evals], backend=backend, thresh=thresh, **options)[0]


def fit_many(list_of_evals: Sequence[np.ndarray], *, backend: str = "numba", thresh: float = EVALS_THRESH,
             **options) -> list[PowerLawFit]:
    """Fit every ESD of ``list_of_evals``; with ``backend='cuda'`` all scans run in one GPU launch."""
    opts = _parse_options(backend, options)
    prepared = [_prepare(e, thresh, opts) for e in list_of_evals]
    per_esd = opts.fix_fingers == "xmin_peak" or opts.distribution != "power_law"  # no shared batch scan
    scan = _scanner(backend, opts, [] if per_esd else [p[1] for p in prepared if p is not None])
    return [_finish(p, scan, opts, backend) if p is not None else PowerLawFit() for p in prepared]


#: ``choose_backend`` scans on numpy when its estimated work, in N² units of ESD length, is at most this: about
#: 0.3 s of numpy's unpruned scan on one core, against ~0.8 s to import Numba and load its cached kernel.
AUTO_NUMPY_WORK = 25_000_000
#: The numpy scan's cost per ESD besides its N², in the same units (~45 µs of Python at ~13 ns per N²).
AUTO_ESD_OVERHEAD = 3_500


def choose_backend(sizes: Sequence[int], **options) -> str:
    """``'numpy'`` or ``'numba'``: the faster CPU backend for fitting ESDs of these lengths once, in a fresh process.

    Numpy's scan of an ESD of N values costs about 13 ns·N² (N²/2 candidate-point pairs) plus ~45 µs, and nothing
    to start; Numba's pruned kernel is far faster per ESD but costs ~0.8 s to import and load from its cache the
    first time. ``options`` are :func:`fit`'s: ``fix_fingers='clip_xmax'`` rescans an ESD up to ``max_fingers``
    more times and ``bootstrap=B`` 2B times.
    """
    opts = _parse_options("numpy", options)
    scans = 1 + (opts.max_fingers if opts.fix_fingers == "clip_xmax" else 0) + 2 * opts.bootstrap
    work = scans * sum(int(n) ** 2 + AUTO_ESD_OVERHEAD for n in sizes)
    return "numpy" if work <= AUTO_NUMPY_WORK else "numba"


def fit_fields(**options) -> tuple[str, ...]:
    """The ``PowerLawFit`` fields a fit with these options computes, in field order: alpha to warning always, and
    ``raw_alpha``/``num_fingers`` (``fix_fingers='clip_xmax'``), ``tpl_alpha``/``Lambda``/``tpl_loglik``
    (``tpl`` or a truncated power law), the comparisons (``compare``), ``p_value``/``alpha_ci_*`` (``bootstrap``)
    only with their option."""
    return _fields(_parse_options("numpy", options))


def _fields(opts: _Options) -> tuple[str, ...]:
    skipped = {name for wanted, names in _OPTIONAL_FIELDS if not wanted(opts) for name in names}
    return tuple(name for name in _TABLE_FIELDS if name not in skipped)


def fit_columns(list_of_evals: Sequence[np.ndarray], *, backend: str = "numba", thresh: float = EVALS_THRESH,
                **options) -> dict[str, np.ndarray]:
    """``fit_many`` as columns ``{field: (B,)}`` for the ``fit_fields`` of the options, the same numbers: ``status``
    and ``warning`` object arrays; ``num_pl_spikes`` and ``n_tail`` int64 when every fit succeeded, else float64
    with NaN.

    Plain fits (no fingers, truncated power law, comparisons, bootstrap or xmax) of non-empty, finite, ascending
    ESDs, e.g. the sorted ESDs of a batch, are prepared and finished as arrays around the one batched scan; any
    other call goes through ``fit_many``."""
    opts = _parse_options(backend, options)
    plain = (opts.fix_fingers in (None, False) and opts.distribution == "power_law" and opts.xmax is None
             and not (opts.tpl or opts.compare or opts.bootstrap))
    flat = [np.asarray(e, dtype=np.float64).ravel() for e in list_of_evals]
    sizes = np.fromiter((e.size for e in flat), dtype=np.int64, count=len(flat))
    fields = _fields(opts)
    if not plain or not flat or sizes.min() == 0:
        return fit_table(fit_many(flat, backend=backend, thresh=thresh, **options), fields)
    values = np.concatenate(flat)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    descending = values[1:] < values[:-1]
    descending[ends[:-1] - 1] = False  # across two ESDs
    if not np.isfinite(values).all() or descending.any():
        return fit_table(fit_many(flat, backend=backend, thresh=thresh, **options), fields)
    # ascending: the values fitted are the last n_fit of each ESD
    n_fit = np.add.reduceat((values > thresh).astype(np.int64), starts)
    first = ends - n_fit
    cores = _scan_batch(backend, opts, [values[a:b] for a, b in zip(first.tolist(), ends.tolist())])
    i = np.array([-1 if c is None else c.i for c in cores], dtype=np.int64)
    alpha = np.array([_NAN if c is None else c.alpha for c in cores], dtype=np.float64)
    D = np.array([_NAN if c is None else c.D for c in cores], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = (i >= 0) & np.isfinite(alpha) & (alpha > 1.0)
    at = np.where(ok, first + i, 0)  # index of each fit's xmin in ``values``
    run = np.r_[True, values[1:] != values[:-1]]  # first of a run of equal values (ties of xmin count as spikes)
    run[starts] = True
    run_start = np.maximum.accumulate(np.where(run, np.arange(values.size), 0))
    n_tail = n_fit - i
    table = dict(
        alpha=np.where(ok, alpha, _NAN), xmin=np.where(ok, values[at], _NAN),
        xmax=np.where(ok, values[ends - 1], _NAN) if opts.mode == "ww" else np.full(len(flat), _NAN),
        D=np.where(ok, D, _NAN), sigma=np.where(ok, (alpha - 1.0) / np.sqrt(np.where(ok, n_tail, 1)), _NAN),
        num_pl_spikes=np.where(ok, ends - run_start[at], _NAN), n_tail=np.where(ok, n_tail, _NAN),
        status=np.where(ok, "success", "failed").astype(object),
        warning=np.where(ok & (alpha < OVER_TRAINED_THRESH), "over-trained",
                         np.where(ok & (alpha > UNDER_TRAINED_THRESH), "under-trained", "")).astype(object))
    if ok.all():
        table["num_pl_spikes"], table["n_tail"] = (table[k].astype(np.int64) for k in ("num_pl_spikes", "n_tail"))
    return table


def fit_table(fits: Sequence[PowerLawFit], fields: Sequence[str] = _TABLE_FIELDS) -> dict[str, np.ndarray]:
    """The ``fields`` of fits as columns ``{field: (B,)}``, as ``fit_columns`` gives them (ints stay ints unless a
    NaN joins them)."""
    return {name: np.array([getattr(f, name) for f in fits], dtype=object if name in ("status", "warning") else None)
            for name in fields}


#: Elements of one (candidates x points) block of :func:`scan_numpy` (8 MiB per float64 temporary).
SCAN_BLOCK = 1 << 20


@np.errstate(divide="ignore", invalid="ignore", over="ignore")  # a tail of equal values has S = 0 → alpha = inf
def scan_numpy(x: np.ndarray, *, mode: str = "ww", xmin: Any = None, min_tail: int = 2, small_n: bool = False,
               xmax: float = math.inf) -> tuple[int, float, float] | None:
    """Plain O(N²) reference scan of ascending ``x``: ``(index of xmin, alpha, D)``, or None without candidates.

    Every candidate's D is evaluated at every point of its tail (no pruning), in blocks of ``SCAN_BLOCK``
    (candidate, point) pairs, with the arithmetic of the numba kernel: ``S_i`` by the same recursion, ``alpha_i =
    1 + n/S_i``, ``F_i(x_j) = (1 - (x_j/x_i)^(1-alpha_i)) / (1 - (xmax/x_i)^(1-alpha_i))`` against the lower step
    ``(j-i)/n``, NaN deviations ignored. ``mode='ww'`` scans WWFit's candidates and points; ``mode='powerlaw'``
    powerlaw 1.5's (distinct values only). ``xmax``: ``inf`` for none, NaN for the largest value of ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    N = x.size
    if small_n and mode == "ww" and N < SMALL_N_CUTOFF:  # WWFit's branch; powerlaw 1.5 has none
        return _scan_small_n(x)
    unique = mode == "powerlaw"
    first = np.r_[True, x[1:] != x[:-1]] if unique else np.ones(N, dtype=bool)
    cand = _candidates_numpy(x, first, unique, xmin, min_tail)
    if cand.size == 0:
        return None
    n = (N - cand).astype(np.float64)
    alphas = 1.0 + n / _tail_log_sums(x)[cand]
    Ds = np.ones(cand.size)
    top = x[-1] if math.isnan(xmax) else xmax
    points = np.flatnonzero(first)
    rows = max(1, SCAN_BLOCK // N)
    for c0 in range(0, cand.size, rows):
        i, a, tail = cand[c0:c0 + rows, None], alphas[c0:c0 + rows, None], n[c0:c0 + rows, None]
        j = points[points >= i[0, 0]][None, :]
        e = 1.0 - a
        model = (1.0 - (x[j] / x[i]) ** e) / (1.0 - (top / x[i]) ** e)
        deviation = np.where(j >= i, np.abs(model - (j - i) / tail), 0.0)
        Ds[c0:c0 + rows] = np.where(a[:, 0] > 1.0, np.fmax.reduce(deviation, axis=1), 1.0)
    c = int(np.argmin(Ds))
    return int(cand[c]), float(alphas[c]), float(Ds[c])


def _tail_log_sums(x: np.ndarray) -> np.ndarray:
    """``S_i = sum_{j>=i} ln(x_j/x_i)`` of ascending ``x`` (N,), summed as ``powerlaw_numba.tail_log_sums`` does."""
    terms = np.arange(x.size - 1, 0, -1) * np.log(x[1:] / x[:-1])
    return np.r_[np.cumsum(terms[::-1])[::-1], 0.0]


# ------------------------------------------------------------------------------------------ preparation


def _parse_options(backend: str, options: dict) -> _Options:
    if backend not in BACKENDS:
        raise ValueError(f"unknown power-law backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    names = {f.name for f in dataclasses.fields(_Options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown power-law option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    opts = _Options(**options)
    if opts.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {opts.mode!r}")
    if opts.fix_fingers not in FIX_FINGERS:
        raise ValueError(f"fix_fingers must be one of {FIX_FINGERS}, got {opts.fix_fingers!r}")
    if isinstance(opts.xmax, str) and (opts.xmax != "force" or opts.mode != "powerlaw"):
        raise ValueError(f"xmax must be None, a float, an int or (with mode='powerlaw') 'force', got {opts.xmax!r}")
    if opts.fix_fingers == "xmin_peak" and opts.xmin is not None:
        raise ValueError("fix_fingers='xmin_peak' chooses the xmin range itself; do not pass xmin")
    if opts.distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {opts.distribution!r}")
    if opts.distribution != "power_law" and (opts.mode != "powerlaw" or opts.fix_fingers == "clip_xmax"
                                             or opts.bootstrap or opts.tpl or opts.compare):
        raise ValueError("distribution='truncated_power_law' needs mode='powerlaw' and excludes "
                         "fix_fingers='clip_xmax', bootstrap, tpl and compare")
    if opts.xmin is not None and not isinstance(opts.xmin, numbers.Real):
        lo_hi = tuple(opts.xmin)
        if len(lo_hi) != 2:
            raise ValueError(f"xmin must be None, a float or a pair (lo, hi), got {opts.xmin!r}")
        opts = dataclasses.replace(opts, xmin=(float(min(lo_hi)), float(max(lo_hi))))
    if int(opts.min_tail) < 2:
        raise ValueError(f"min_tail must be at least 2, got {opts.min_tail}")
    if opts.bootstrap < 0 or not 0 < opts.ci < 1:
        raise ValueError(f"bootstrap must be >= 0 and 0 < ci < 1, got {opts.bootstrap}, {opts.ci}")
    return opts


def _prepare(evals: np.ndarray, thresh: float, opts: _Options) -> tuple[np.ndarray, np.ndarray] | None:
    """(all eigenvalues after the int clip, the values to fit), both ascending; None when the fit must fail."""
    evals = np.asarray(evals, dtype=np.float64).ravel()
    if not np.all(np.isfinite(evals)):
        return None
    evals = np.sort(evals)
    xmax = opts.xmax
    if isinstance(xmax, numbers.Integral):  # WeightWatcher: clip the top |k| (bool included, as in WW)
        k = abs(int(xmax))
        if k > evals.size / 2 or k == 0:
            return None
        evals = evals[:-k]
        xmax = None
    x = evals[evals > thresh]
    if xmax is not None and xmax != "force":  # 'force' is max(evals): nothing to drop
        x = x[x <= float(xmax)]
    return evals, x


def _candidates_numpy(x, first, unique, xmin, min_tail) -> np.ndarray:
    N = x.size
    idx = np.arange(N)
    if isinstance(xmin, numbers.Real):
        i = np.searchsorted(x, xmin, side="left")
        keep = (idx == i) & (idx < N - 1)
    else:
        lo, hi = (-np.inf, np.inf) if xmin is None else xmin
        keep = first & (x >= lo) & (x <= hi)
        if unique:
            keep[np.flatnonzero(keep)[-1:]] = False
        else:
            keep[N - 1:] = False
    keep &= (N - idx >= max(2, min_tail))
    return np.flatnonzero(keep)


def _scan_small_n(x: np.ndarray) -> tuple[int, float, float] | None:
    """WeightWatcher 0.7.7 ``fit_powerlaw_smallN``: bias-corrected alpha, tails >= 8, selection by argmin D."""
    N = x.size
    if N < 2:
        return None
    log_x = np.log(x)
    alphas = np.zeros(N - 1)
    Ds = np.ones(N - 1)
    for i in range(N - 1):
        n = float(N - i)
        s = np.sum(log_x[i:]) - n * log_x[i]
        if N - i < SMALL_N_MIN_TAIL or s <= 1e-12:
            continue
        alphas[i] = 1.0 + (n - 1.0) / s
        if alphas[i] > 1.0:
            Ds[i] = np.max(np.abs(np.arange(n) / n - (1.0 - (x[i:] / x[i]) ** (1.0 - alphas[i]))))
    if np.all(Ds == 1.0):  # nothing survived: WW falls back to the whole sample
        n = float(N)
        s = np.sum(log_x) - n * log_x[0]
        if s <= 1e-12:
            return None
        alphas[0] = 1.0 + (n - 1.0) / s
        Ds[0] = np.max(np.abs(np.arange(n) / n - (1.0 - (x / x[0]) ** (1.0 - alphas[0]))))
    i = int(np.argmin(Ds))
    return i, float(alphas[i]), float(Ds[i])


# --------------------------------------------------------------------------------------------- scanning


def _needs_reference(x: np.ndarray, opts: _Options) -> bool:
    return opts.small_n and opts.mode == "ww" and x.size < SMALL_N_CUTOFF


def _kernel_args(opts: _Options) -> tuple:
    """(unique, fixed, lo, hi, min_tail, bias) for the compiled kernels."""
    fixed = isinstance(opts.xmin, numbers.Real)
    if opts.xmin is None:
        lo, hi = -np.inf, np.inf
    elif fixed:
        lo = hi = float(opts.xmin)
    else:
        lo, hi = opts.xmin
    return opts.mode == "powerlaw", fixed, float(lo), float(hi), int(opts.min_tail), 0


def _ks_xmax(opts: _Options) -> float:
    """The xmax of powerlaw 1.5's KS normalization: inf (none), NaN (each sample's largest value) or a float."""
    if opts.mode != "powerlaw" or opts.xmax is None or isinstance(opts.xmax, numbers.Integral):
        return math.inf
    return math.nan if opts.xmax == "force" else float(opts.xmax)


def _reported_xmax(x: np.ndarray, opts: _Options) -> float:
    """WWFit reports the largest fitted value; powerlaw 1.5 its ``Fit.xmax``, the given (or forced) bound."""
    if opts.mode == "ww":
        return float(x[-1])
    ks_xmax = _ks_xmax(opts)
    return float(x[-1]) if math.isnan(ks_xmax) else _NAN if math.isinf(ks_xmax) else ks_xmax


def _scan_batch(backend: str, opts: _Options, xs: Sequence[np.ndarray]) -> list[_Core | None]:
    """The scan's winner for every ascending array of ``xs``: compiled backends take them all in one call."""
    out: list[_Core | None] = [None] * len(xs)
    todo = []
    xmax = _ks_xmax(opts)
    if backend == "cuda" and not math.isinf(xmax):  # the GPU kernel has no xmax normalization
        backend = "numba"
    for k, x in enumerate(xs):
        if x.size < 2:
            continue
        if backend == "numpy" or _needs_reference(x, opts):
            r = scan_numpy(x, mode=opts.mode, xmin=opts.xmin, min_tail=opts.min_tail, small_n=opts.small_n,
                           xmax=xmax)
            out[k] = None if r is None else _Core(x, *r)
        else:
            todo.append(k)
    if not todo:
        return out
    if backend == "numba":
        from zooscope.kernels import powerlaw_numba as nb

        if len(todo) == 1:
            x = xs[todo[0]]
            results = [nb.best_of(x, *_kernel_args(opts), xmax)]
        else:
            values, offsets = _ragged([xs[k] for k in todo])
            results = zip(*nb.best_of_ragged(values, offsets, *_kernel_args(opts), xmax))
    else:
        from zooscope.kernels import powerlaw_cuda

        values, offsets = _ragged([xs[k] for k in todo])
        results = zip(*powerlaw_cuda.best_of_ragged(values, offsets, *_kernel_args(opts)))
    for k, (i, alpha, D) in zip(todo, results):
        out[k] = None if i < 0 else _Core(xs[k], int(i), float(alpha), float(D))
    return out


def _ragged(xs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated values and offsets (B+1,) of a list of 1-D arrays."""
    offsets = np.zeros(len(xs) + 1, dtype=np.int64)
    np.cumsum([x.size for x in xs], out=offsets[1:])
    return np.concatenate(xs), offsets


def _scanner(backend: str, opts: _Options, xs: Sequence[np.ndarray]) -> Callable[[np.ndarray], _Core | None]:
    """A function scanning one array, with the arrays ``xs`` already scanned together in one batch."""
    done = {id(x): core for x, core in zip(xs, _scan_batch(backend, opts, xs))}
    return lambda x: done[id(x)] if id(x) in done else _scan_batch(backend, opts, [x])[0]


# ------------------------------------------------------------------------------------------- finishing


def _finish(prepared, scan, opts: _Options, backend: str) -> PowerLawFit:
    evals, x = prepared
    extra: dict[str, float] = {}
    if opts.fix_fingers == "xmin_peak":
        if x.size == 0:
            return _failed(evals, opts)
        opts = dataclasses.replace(opts, xmin=xmin_peak_range(x, opts.xmin_max, ww_range=opts.xmin_peak_ww_range),
                                   fix_fingers=None, small_n=False)  # this ESD's own candidate range
        scan = _scanner(backend, opts, [])
    if opts.distribution == "truncated_power_law":
        return _finish_tpl(evals, x, opts)
    if opts.fix_fingers == "clip_xmax":
        clipped = _clip_xmax(x, evals.size, scan, opts, backend)
        if clipped is None:
            return _failed(evals, opts)
        core, raw_alpha, num_fingers, xmax = clipped
        extra.update(raw_alpha=raw_alpha, num_fingers=float(num_fingers))
    else:
        core = scan(x)
        xmax = None
    if core is None or not math.isfinite(core.alpha) or core.alpha <= 1.0:
        return _failed(evals, opts)
    tail = core.x[core.i:]
    if opts.tpl:
        extra.update(zip(("tpl_alpha", "Lambda", "tpl_loglik"), truncated_power_law(tail, core.xmin, core.alpha)))
    if opts.compare:
        ll_pl = _power_law_logpdf(tail, core.xmin, core.alpha)
        extra.update(zip(("R_exponential", "p_exponential"),
                         loglikelihood_ratio(ll_pl, _exponential_logpdf(tail, core.xmin))))
        extra.update(zip(("R_lognormal", "p_lognormal"),
                         loglikelihood_ratio(ll_pl, _lognormal_logpdf(tail, core.xmin))))
    if opts.bootstrap:
        extra.update(_bootstrap(core, opts, backend))
    n = core.n_tail
    alpha = core.alpha
    if xmax is None:
        xmax = _reported_xmax(core.x, opts)
    return PowerLawFit(
        alpha=alpha, xmin=core.xmin, xmax=xmax, D=core.D, sigma=(alpha - 1.0) / math.sqrt(n),
        num_pl_spikes=int(np.count_nonzero(evals >= core.xmin)), n_tail=n, status="success", warning=_warning(alpha),
        **extra)


def _failed(evals: np.ndarray, opts: _Options) -> PowerLawFit:
    """A failed fit of the ascending ``evals``: NaN numbers, except that ``mode='powerlaw'`` still reports the
    given xmax, or the forced one (``max(evals)``, set by WeightWatcher before it fits)."""
    bound = _ks_xmax(opts)
    if math.isnan(bound):
        bound = float(evals[-1]) if evals.size else _NAN
    return PowerLawFit(xmax=bound if not math.isinf(bound) else _NAN)


def _warning(alpha: float) -> str:
    return "over-trained" if alpha < OVER_TRAINED_THRESH else "under-trained" if alpha > UNDER_TRAINED_THRESH else ""


def xmin_peak_range(x: np.ndarray, xmin_max: float | None = None, *, ww_range: bool = False) -> tuple[float, float]:
    """WeightWatcher's ``fix_fingers='xmin_peak'`` xmin range for the positive values ``x`` (spec §5.3).

    ``peak = 10**e`` with ``e`` the left edge of the fullest of 100 bins of ``log10(x)`` (first on ties);
    returns ``(0.95·peak, xmin_max)`` with ``xmin_max = 1.5·peak`` by default (empty if ``xmin_max`` is below
    ``0.95·peak``). ``ww_range=True``: WeightWatcher 0.7's range, whose lower end ``log10(0.95·peak)`` is in
    log10 units, ordered as powerlaw 1.5 reads it, ``(min, max)``.
    """
    counts, edges = np.histogram(np.log10(x), bins=PEAK_BINS)
    peak = 10 ** edges[np.argmax(counts)]
    hi = 1.5 * peak if xmin_max is None else float(xmin_max)
    if ww_range:
        lo = float(np.log10(0.95 * peak))
        return min(lo, hi), max(lo, hi)
    return float(0.95 * peak), float(hi)


def _finish_tpl(evals: np.ndarray, x: np.ndarray, opts: _Options) -> PowerLawFit:
    """WeightWatcher's ``fit='TPL'`` row: powerlaw 1.5's scan with a truncated power law at every candidate."""
    r = tpl_scan(x, xmin=opts.xmin, xmax=_ks_xmax(opts))
    if r is None or not math.isfinite(r[1]):
        return _failed(evals, opts)
    i, alpha, Lambda, D, loglik = r
    xmin = float(x[i])
    return PowerLawFit(alpha=alpha, xmin=xmin, xmax=_reported_xmax(x, opts), D=D,
                       num_pl_spikes=int(np.count_nonzero(evals >= xmin)), n_tail=x.size - i, status="success",
                       warning=_warning(alpha), tpl_alpha=alpha, Lambda=Lambda, tpl_loglik=loglik)


def _clip_xmax(x: np.ndarray, n_evals: int, scan, opts: _Options, backend: str
               ) -> tuple[_Core, float, int, float | None] | None:
    """WeightWatcher's ``fit_clipped_powerlaw`` (spec §5.3): ``(best fit, raw alpha, num_fingers, its xmax)``, the
    xmax where it differs from the plain fit's; None where WeightWatcher raises (→ failed).

    With a given or forced xmax (``mode='powerlaw'``), WeightWatcher fits the sample without its top ``k`` values
    with the KS bound lowered to the ``k``-th largest value, just above the sample; its check fits use the
    sample's own largest value.
    """
    bounded = not math.isinf(_ks_xmax(opts))

    def without_top(k: int, bound_rank: int):
        if k >= x.size:
            return None
        if not bounded:
            return scan(x[:x.size - k])
        bound = float(x[x.size - bound_rank])
        return _scanner(backend, dataclasses.replace(opts, xmax=bound), [])(x[:x.size - k])

    raw = scan(x)
    if raw is None:
        return None
    max_fingers = opts.max_fingers
    if max_fingers is None or max_fingers < 0 or max_fingers < n_evals / 2:
        max_fingers = 10
    best, num_fingers, last = raw, 0, None
    for idx in range(2, max_fingers):
        last = without_top(idx, idx)
        if last is None:
            return None
        if last.alpha + opts.finger_thresh < raw.alpha:
            best, num_fingers = last, idx - 1
            break
        if last.alpha <= 2.0:
            break
    if last is None:  # the loop never ran: WeightWatcher's ``idx`` is unbound and it fails
        return None
    for idy in range(idx + 1, idx + 4):  # WeightWatcher's check fits only log, but can fail
        check = without_top(idy, idy + 1)
        if check is None:
            return None
        if abs(check.alpha - last.alpha) > opts.finger_thresh:
            break
    xmax = float(x[x.size - num_fingers - 1]) if bounded and num_fingers else None
    return best, raw.alpha, num_fingers, xmax


# --------------------------------------------------------------------------- alternative tail models


def _power_law_logpdf(tail: np.ndarray, xmin: float, alpha: float) -> np.ndarray:
    return np.log(alpha - 1.0) - np.log(xmin) - alpha * np.log(tail / xmin)


def _exponential_logpdf(tail: np.ndarray, xmin: float) -> np.ndarray:
    """Log-density of the exponential ``Lambda exp(-Lambda (x - xmin))`` at its MLE ``1/(mean - xmin)``."""
    lam = 1.0 / (np.mean(tail) - xmin)
    return np.log(lam) - lam * (tail - xmin)


def _lognormal_logpdf(tail: np.ndarray, xmin: float) -> np.ndarray:
    """Log-density of the lognormal truncated to ``x >= xmin``, at its maximum-likelihood (mu, sigma)."""
    from scipy.optimize import minimize
    from scipy.special import log_ndtr

    log_x = np.log(tail)
    log_xmin = math.log(xmin)

    def logpdf(theta):
        mu, sigma = theta[0], math.exp(theta[1])
        z = (log_x - mu) / sigma
        return (-log_x - math.log(sigma) - 0.5 * math.log(2 * math.pi) - 0.5 * z * z
                - log_ndtr(-(log_xmin - mu) / sigma))

    start = np.array([np.mean(log_x), math.log(max(np.std(log_x), 1e-3))])
    res = minimize(lambda t: -np.sum(logpdf(t)), start, method="Nelder-Mead",
                   options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000))
    return logpdf(res.x)


def loglikelihood_ratio(ll1: np.ndarray, ll2: np.ndarray) -> tuple[float, float]:
    """Normalised log-likelihood ratio ``R`` and its two-sided p-value (Vuong; as powerlaw, non-nested)."""
    from scipy.special import erfc

    d = np.asarray(ll1) - np.asarray(ll2)
    n = d.size
    R = float(np.sum(d))
    sd = math.sqrt(np.sum((d - d.mean()) ** 2) / n)
    if sd == 0.0:
        return _NAN, _NAN
    return R / (math.sqrt(n) * sd), float(erfc(abs(R) / (math.sqrt(2 * n) * sd)))


_TINY = 10.0 ** sys.float_info.min_10_exp
"""powerlaw 1.5's stand-in for a zero likelihood or CDF value."""


def tpl_scan(x: np.ndarray, *, xmin: Any = None, xmax: float = math.inf
             ) -> tuple[int, float, float, float, float] | None:
    """powerlaw 1.5's ``Fit(x, xmin_distribution='truncated_power_law')`` scan of ascending positive ``x``.

    Candidates as ``mode='powerlaw'`` (distinct values, optional ``(lo, hi)`` range, last one dropped). At each
    candidate ``Truncated_Power_Law.fit`` is repeated: ``scipy.optimize.fmin`` (default tolerances) on the
    negative log-likelihood of ``x^-alpha e^(-Lambda x) Lambda^(1-alpha) / Γ(1-alpha, Lambda·xmin)`` from
    ``(alpha_PL, 1/mean(tail))``, then the KS distance ``max(D+, D-)`` against the rebased global ECDF, with the
    model CDF renormalised to ``[xmin, xmax]`` when ``xmax`` is finite (NaN: the largest value). The winner is
    the first argmin of D among valid fits (alpha > 1, Lambda > 0), or over all if none is valid.
    Returns ``(index of xmin, alpha, Lambda, D, loglik)`` or None without candidates.
    """
    x = np.asarray(x, dtype=np.float64)
    N = x.size
    if N < 2:
        return None
    first = np.r_[True, x[1:] != x[:-1]]
    cand = _candidates_numpy(x, first, True, xmin, 2)
    if cand.size == 0:
        return None
    bins, ecdf = x[first], np.flatnonzero(first) / float(N)  # powerlaw's fitting CDF: fraction strictly below
    top = x[-1] if math.isnan(xmax) else None if math.isinf(xmax) else xmax
    fits = [_tpl_fit_at(x[i:], x[i], bins, ecdf, top) for i in cand]
    alphas, lambdas, Ds, logliks = (np.array(v, dtype=np.float64) for v in zip(*fits))
    good = (lambdas > 0) & (alphas > 1)
    c = int(np.argmin(Ds)) if good.all() or not good.any() else int(np.ma.masked_array(Ds, mask=~good).argmin())
    return int(cand[c]), float(alphas[c]), float(lambdas[c]), float(Ds[c]), float(logliks[c])


@np.errstate(all="ignore")  # extreme trial parameters overflow, as in powerlaw (which silences them too)
def _tpl_fit_at(data: np.ndarray, xmin: float, bins: np.ndarray, ecdf: np.ndarray, xmax: float | None
                ) -> tuple[float, float, float, float]:
    """powerlaw 1.5's ``Truncated_Power_Law`` fit and KS at one xmin: (alpha, Lambda, D, loglik), same arithmetic."""
    from mpmath import gammainc
    from scipy.optimize import fmin

    n = data.size

    def nll(params):
        alpha, lam = params[0], params[1]
        if lam > 0 and alpha > 1:
            lik = data ** -alpha * np.exp(-lam * data) * (lam ** (1 - alpha) / float(gammainc(1 - alpha, lam * xmin)))
            lik[lik == 0] = _TINY
        else:
            lik = np.full(n, _TINY)
        return -np.add.accumulate(np.log(lik))[-1]  # sequential, as powerlaw's builtin sum

    start = (1 + n / np.sum(np.log(data / xmin)), 1 / np.mean(data))
    params, fopt = fmin(nll, start, full_output=1, disp=False)[:2]
    alpha, lam = params[0], params[1]
    ind = bins >= xmin
    actual = ecdf[ind] - ecdf[ind][0]
    actual /= 1 - ecdf[ind][0]
    if lam > 0 and alpha > 1:
        def base(v):  # powerlaw's _cdf_base_function
            return 1 - np.array([float(gammainc(1 - alpha, lam * t)) for t in np.atleast_1d(v)]) / lam ** (1 - alpha)

        base_xmin = base(xmin)[0]
        if base_xmin == 1:
            model = np.ones(int(ind.sum()))
        else:
            norm = 1 - base_xmin
            if xmax:
                norm = norm - (1 - base(xmax)[0])
            model = (base(bins[ind]) - base_xmin) / norm
    else:
        model = np.full(int(ind.sum()), _TINY)
    diff = model - actual
    return float(alpha), float(lam), float(max(diff.max(), -diff.min())), float(-fopt)


def truncated_power_law(tail: np.ndarray, xmin: float, alpha0: float) -> tuple[float, float, float]:
    """MLE ``(alpha, Lambda, loglik)`` of the density ∝ ``x^-alpha exp(-Lambda x)`` on ``x >= xmin``.

    The normaliser ``∫_xmin^∞ t^-alpha e^{-Lambda t} dt`` is integrated exactly (adaptive quadrature in
    ``ln t``); Nelder–Mead on ``(alpha, ln(Lambda·xmin))`` starts from the power-law alpha ``alpha0``.
    """
    from scipy.integrate import quad
    from scipy.optimize import minimize

    y = np.asarray(tail, dtype=np.float64) / xmin
    n = y.size
    sum_log_y = float(np.sum(np.log(y)))
    sum_y = float(np.sum(y))

    def log_norm(a, z):  # ln ∫_1^∞ y^-a e^{-z y} dy, with y = e^v
        def integrand(v):
            return math.exp(-(a - 1.0) * v - z * math.expm1(v)) if v < 700.0 else 0.0

        val, _ = quad(integrand, 0.0, math.inf, epsabs=0.0, epsrel=1e-12, limit=200)
        return -z + math.log(val)

    def nll(theta):
        a, z = theta[0], math.exp(theta[1])
        if theta[1] < -40.0 or theta[1] > 40.0:
            return math.inf
        return a * sum_log_y + z * sum_y + n * log_norm(a, z)

    start = np.array([alpha0, math.log(xmin / np.mean(tail))])
    res = minimize(nll, start, method="Nelder-Mead",
                   options=dict(xatol=1e-9, fatol=1e-11, maxiter=4000))
    a, z = float(res.x[0]), math.exp(res.x[1])
    return a, z / xmin, float(-res.fun - n * math.log(xmin))


# ---------------------------------------------------------------------------------------------- bootstrap


def _bootstrap(core: _Core, opts: _Options, backend: str) -> dict[str, float]:
    """Semi-parametric goodness-of-fit p-value and non-parametric percentile CI of alpha (``opts.bootstrap`` each)."""
    rng = np.random.default_rng(opts.seed)
    B, x = int(opts.bootstrap), core.x
    N, n_tail = x.size, core.n_tail
    below = x[:core.i]
    from_tail = np.arange(N)[None, :] < rng.binomial(N, n_tail / N, size=B)[:, None]
    synthetic = core.xmin * (1.0 - rng.random((B, N))) ** (-1.0 / (core.alpha - 1.0))
    if below.size:
        synthetic = np.where(from_tail, synthetic, below[rng.integers(0, below.size, size=(B, N))])
    synthetic.sort(axis=1)
    D_sim = np.array([c.D if c else np.nan for c in _scan_batch(backend, opts, list(synthetic))])
    resampled = np.sort(x[rng.integers(0, N, size=(B, N))], axis=1)
    alpha_res = np.array([c.alpha for c in _scan_batch(backend, opts, list(resampled)) if c])
    alpha_res = alpha_res[np.isfinite(alpha_res)]
    q = (1.0 - opts.ci) / 2.0
    low, high = np.quantile(alpha_res, [q, 1.0 - q]) if alpha_res.size else (_NAN, _NAN)
    return dict(p_value=float(np.mean(D_sim >= core.D)), alpha_ci_low=float(low), alpha_ci_high=float(high))


__all__ = ["PowerLawFit", "fit", "fit_many", "scan_numpy", "tpl_scan", "xmin_peak_range", "truncated_power_law",
           "loglikelihood_ratio", "BackendUnavailable"]
