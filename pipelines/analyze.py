"""Analyse one model (or one shard of it): tensors -> layer matrices -> eigenvalues -> fits and metrics.

``analyze_checkpoint`` is a pure function of the checkpoint's tensors and the options: it never opens a store
or a cluster, so a Dask task can call it (``analyze_path``) and return the small ``ModelResult``.
Tensors are read one at a time; at most one layer's weights are in memory at once.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from zooscope.kernels import esd as esd_kernels
from zooscope.kernels import powerlaw
from zooscope.pipelines.batch import analyze_one
from zooscope.pipelines.readers import Checkpoint, open_checkpoint
from zooscope.pipelines.result import ModelResult
from zooscope.pipelines.summary import weightwatcher_rows

#: WeightWatcher releases whose defaults can be reproduced (spec §10).
WW_VERSIONS = ("0.7.5", "0.7.7")
#: WeightWatcher's ``max_fingers`` and ``finger_thresh`` defaults.
_FINGER_DEFAULTS = (10, 1.0)
#: ``AnalysisOptions.channels`` values (WeightWatcher's names): kernel axes first (Keras) or last (PyTorch).
CHANNELS = ("first", "last")
#: Options that change the analysed matrices or ESD, at their defaults (left out of the store parameters there).
_TRANSFORM_DEFAULTS = {"conv2d_fft": False, "fft": False, "channels": None, "inverse": False}


#: ``AnalysisOptions`` fields that change speed, not results: not store parameters.
SPEED_ONLY = ("esd_backend", "esd_table", "fit_backend")


def _one_of(name: str, value: Any, accepted: tuple) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"Invalid value for '{name}': {value!r}; expected one of {', '.join(map(repr, accepted))}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Invalid value for '{name}': {value!r}; expected True or False")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Invalid value for '{name}': {value!r}; expected an integer >= {low}")


@dataclass(frozen=True)
class AnalysisOptions:
    """What to compute per layer. Names follow WeightWatcher's ``analyze()`` arguments where they mean the same.

    min_evals: skip layers with fewer than this many eigenvalues (M·rf pooled, M per slice). ``None`` takes the
        default of ``ww_version`` (10 for 0.7.5, 8 for 0.7.7).
    max_evals, max_N: skip layers with more eigenvalues / a longer side than this.
    ww_version: the WeightWatcher release whose defaults and small-N fit are reproduced.
    pool: one row per Conv2D layer (slices pooled) rather than one per kernel position.
    conv2d_norm: WeightWatcher's Conv2D rescale (pooled eigenvalues x 1/2).
    esd_backend, precision: passed to ``kernels.esd.eigenvalues`` (``auto`` routes by shape).
    esd_table: a ``kernels.esd.RoutingTable`` measured by ``zooscope bench svd --tune`` (None: built-in rule).
    fit_backend: ``numba`` (CPU), ``numpy`` (reference), ``cuda`` or ``auto``: ``numba`` in a scan; for one model
        analysed alone (``analyze()``, ``zooscope analyze``) ``powerlaw.choose_backend`` of its ESDs: numpy when
        their summed N² is at most ~2.5e7 (MiniLM-L6: 5.8e6; a ResNet-18's pooled 3x3 convs alone: 8.5e7), which
        spares a fresh process Numba's ~0.8 s start. The two agree to ~1e-15 relative; the ``fit_backend`` column
        names the one used.
    fix_fingers: None, ``"clip_xmax"`` or ``"xmin_peak"`` (xmin searched in ``[0.95·peak, xmin_max]`` of the
        log10 ESD histogram; ``xmin_max`` defaults to ``1.5·peak``).
    max_fingers, finger_thresh: ``clip_xmax``'s WeightWatcher parameters (``max_fingers`` counts only when at
        least half the layer's eigenvalues, as in WeightWatcher).
    xmax: WeightWatcher's ``xmax``: None, an int k clipping the top k, or ``"force"`` (``pl_mode="powerlaw"``
        only: the largest eigenvalue bounds the KS normalization, as powerlaw 1.5 does).
    pl_mode: ``"ww"`` (WeightWatcher's WWFit) or ``"powerlaw"`` (powerlaw 1.5's candidates and D; WeightWatcher's
        ``pl_package="powerlaw"``: its ``xmax`` column is NaN unless forced).
    fit: ``"PL"`` (power law), ``"TPL"`` (truncated power law at every xmin candidate, ``pl_mode="powerlaw"``
        only: alpha, Lambda and D of the TPL, sigma NaN) or ``"E_TPL"`` (= TPL with ``fix_fingers="xmin_peak"``).
    ww_quirks: reproduce WeightWatcher 0.7 bugs that change numbers (``zooscope.analyze(ww_compat=True)``):
        ``xmin_peak``'s range starts at ``log10(0.95·peak)``, ``xmin_peak`` with ``pl_mode="ww"`` fails
        every layer, and a Conv2D layer's ``sv_min`` is the largest of its slices' smallest singular values.
    bootstrap: number of bootstrap replicas for the goodness-of-fit p-value and alpha interval (0: none).
    mp_fit, randomize, detX: WeightWatcher's optional metric groups.
    tolerance: eigenvalues below it count towards ``weak_rank_loss`` (WeightWatcher's ``tolerance``; 0 counts
        none, where WeightWatcher would take its default 1e-6).
    weightstats, hist_bins: weight moments, node strength and a histogram per layer.
    seed: seeds every random draw: randomize (draws depend on seed, layer_id, slice) and bootstrap (on seed and
        the layer's eigenvalues only), so a rerun with the same seed gives the same p-values and intervals.
    layers: restrict to these layer names (key prefixes); empty means all.
    intra: WeightWatcher's ``intra``: instead of the layers, one row per pair of consecutive analysed layers whose
        sizes chain, ``X = B·A/(‖A‖‖B‖)`` (first kernel position of a convolution), named ``"a X b"``, with the
        singular values of ``X`` as its ESD (``pipelines.composite``). ``sparsify`` (WeightWatcher's default
        True, only with ``intra``): a random 0/1 matrix between the two, drawn from ``(seed, layer ids)``.
    stacked: WeightWatcher's ``stacked``: instead of the layers, one row ``"stacked"`` (``layer_type
        "stacked"``) for all of them standardised and stacked into one matrix. With ``ww_quirks`` it keeps only
        as many eigenvalues as the first layer has, as WeightWatcher 0.7.7 does.
    ``intra`` and ``stacked`` span every layer of a model: ``zooscope scan`` does not shard models for them.
    conv2d_fft: WeightWatcher's ``conv2d_fft``: a Conv2D layer's ESD is the min(kh, kw)·N·M largest eigenvalues
        of the real parts of its kernels' 2-D FFTs on a 32 x 32 grid (``layers.layer_matrices``); needs ``pool``.
    fft: WeightWatcher's experimental ``fft``: every matrix (dense, or Conv2D slice) is replaced by the real part
        of its 2-D FFT, and pooled Conv2D layers are filtered on ``M`` instead of ``M*rf``.
    channels: how 3-D/4-D kernels are stored in files without a layout of their own (safetensors, torch, npz,
        state dicts): None or ``"last"`` PyTorch's ``(out, in, kh, kw)``, ``"first"`` Keras' ``(kh, kw, in, out)``
        (and ``(k, in, out)``), transposed when read; for other formats it must name their own layout
        (``derived.with_channels``).
    inverse: WeightWatcher's ``inverse``: the ESD is 1/λ (singular-value columns stay those of W; a layer with
        rank loss is an error row). With ``ww_quirks`` only the slices WeightWatcher inverts are inverted.
    """

    min_evals: int | None = None
    max_evals: int = 15000
    max_N: int = 50000
    ww_version: str = "0.7.5"
    pool: bool = True
    conv2d_norm: bool = True
    esd_backend: str = "auto"
    precision: str = "fp64"
    esd_table: Any = None
    fit_backend: str = "auto"
    fix_fingers: str | None = None
    max_fingers: int = 10
    finger_thresh: float = 1.0
    xmax: int | str | None = None
    xmin_max: float | None = None
    pl_mode: str = "ww"
    fit: str = "PL"
    ww_quirks: bool = False
    bootstrap: int = 0
    mp_fit: bool = False
    randomize: bool = False
    detX: bool = False
    tolerance: float = esd_kernels.WEAK_RANK_TOLERANCE
    weightstats: bool = True
    hist_bins: int = 64
    seed: int = 0
    layers: tuple[str, ...] = ()
    intra: bool = False
    sparsify: bool = True
    stacked: bool = False
    conv2d_fft: bool = False
    fft: bool = False
    channels: str | None = None
    inverse: bool = False

    def __post_init__(self) -> None:
        _one_of("ww_version", self.ww_version, WW_VERSIONS)
        _one_of("esd_backend", self.esd_backend, ("auto", *esd_kernels.BACKENDS))
        _one_of("precision", self.precision, esd_kernels.PRECISIONS)
        _one_of("fit_backend", self.fit_backend, ("auto", *powerlaw.BACKENDS))
        _one_of("pl_mode", self.pl_mode, powerlaw.MODES)
        for name in ("pool", "conv2d_norm", "ww_quirks", "mp_fit", "randomize", "detX", "weightstats", "intra",
                     "sparsify", "stacked", "conv2d_fft", "fft", "inverse"):
            _flag(name, getattr(self, name))
        if self.channels is not None:
            _one_of("channels", self.channels, CHANNELS)
        if self.conv2d_fft and not self.pool:
            raise ValueError("conv2d_fft=True needs pool=True, as in WeightWatcher")
        if self.conv2d_fft and self.randomize:
            raise ValueError("conv2d_fft=True cannot be combined with randomize=True in zooscope (WeightWatcher "
                             "shuffles the whole out x in x 32 x 32 FFT array; not implemented)")
        _integer("max_evals", self.max_evals, 1)
        _integer("max_N", self.max_N, 1)
        _integer("bootstrap", self.bootstrap, 0)
        _integer("hist_bins", self.hist_bins, 1 if self.weightstats else 0)
        _integer("seed", self.seed, 0)
        if self.min_evals is None:
            object.__setattr__(self, "min_evals", 8 if self.ww_version == "0.7.7" else 10)
        _integer("min_evals", self.min_evals, 1)
        if not self.min_evals < self.max_evals:
            raise ValueError(f"need 0 < min_evals < max_evals, got {self.min_evals} and {self.max_evals}")
        if not isinstance(self.layers, (list, tuple)) or not all(isinstance(n, str) for n in self.layers):
            raise ValueError(f"Invalid value for 'layers': {self.layers!r}; expected a list of layer names")
        if self.max_N < self.max_evals:
            raise ValueError(f"max_N ({self.max_N}) must be at least max_evals ({self.max_evals})")
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.fit not in ("PL", "TPL", "E_TPL"):
            raise ValueError(f"fit must be 'PL', 'TPL' or 'E_TPL', got {self.fit!r}")
        if self.fit == "E_TPL":  # WeightWatcher's normalize_params
            if self.fix_fingers == "clip_xmax":
                raise ValueError("fit='E_TPL' implies fix_fingers='xmin_peak'; it cannot be combined with 'clip_xmax'")
            object.__setattr__(self, "fit", "TPL")
            object.__setattr__(self, "fix_fingers", "xmin_peak")
        if self.fix_fingers not in powerlaw.FIX_FINGERS:
            raise ValueError(f"fix_fingers must be None, 'clip_xmax' or 'xmin_peak', got {self.fix_fingers!r}")
        if isinstance(self.xmax, str) and self.xmax != "force":
            raise ValueError(f"xmax must be None, an int or 'force', got {self.xmax!r}")
        clipped = isinstance(self.xmax, int)  # WeightWatcher's int xmax (bool included, as in WeightWatcher)
        if clipped and self.xmax == 0:
            raise ValueError("xmax cannot be 0 (or False), as in WeightWatcher")
        if self.fix_fingers and clipped:
            raise ValueError(f"fix_fingers cannot be combined with an int xmax ({self.xmax}), as in WeightWatcher")
        if not isinstance(self.tolerance, numbers.Real) or not self.tolerance >= 0:
            raise ValueError(f"Invalid value for 'tolerance': {self.tolerance!r}; expected a number >= 0")
        if self.bootstrap and self.fit != "PL":
            raise ValueError(f"bootstrap={self.bootstrap} needs fit='PL' (the TPL fit has no bootstrap)")
        if self.precision == "fp32" and self.esd_backend != "auto" and "gram" in self.esd_backend:
            raise ValueError(f"precision='fp32' needs an SVD esd_backend, got {self.esd_backend!r} (Gram routes "
                             "are fp64-only)")
        if self.fix_fingers and self.max_fingers < 1:
            raise ValueError(f"max_fingers must be at least 1, got {self.max_fingers}")
        if self.intra and self.stacked:
            raise ValueError("intra=True and stacked=True cannot be combined (WeightWatcher silently runs stacked "
                             "with intra's singular values)")
        if self.randomize and (self.intra or self.stacked):
            raise ValueError("randomize=True cannot be combined with intra=True or stacked=True (WeightWatcher "
                             "refuses intra with randomize)")
        if (self.conv2d_fft or self.fft) and (self.intra or self.stacked):
            raise ValueError("conv2d_fft=True and fft=True cannot be combined with intra=True or stacked=True "
                             "(WeightWatcher refuses intra with conv2d_fft; the other combinations are not implemented)")
        if self.pl_mode != "powerlaw" and (self.xmax == "force" or self.fit != "PL"):
            raise ValueError("xmax='force' and fit='TPL'/'E_TPL' need pl_mode='powerlaw' (WeightWatcher's "
                             "pl_package='powerlaw'), as in WeightWatcher")

    @property
    def ww_fails_every_fit(self) -> bool:
        """WeightWatcher 0.7 fails every layer with ``fix_fingers='xmin_peak'`` and its own fit (spec §5.3)."""
        return self.ww_quirks and self.fix_fingers == "xmin_peak" and self.pl_mode == "ww"

    def as_params(self) -> dict[str, Any]:
        """The options as plain JSON-able values (what the store records as analysis parameters)."""
        params = dataclasses.asdict(self)
        # backends and the routing table change speed, not results (every route keeps λ within 1e-6 of SVD's)
        for name in SPEED_ONLY:
            del params[name]
        if self.fix_fingers != "clip_xmax" or (self.max_fingers, self.finger_thresh) == _FINGER_DEFAULTS:
            del params["max_fingers"], params["finger_thresh"]  # no effect: stores made before them stay valid
        if self.tolerance == esd_kernels.WEAK_RANK_TOLERANCE:
            del params["tolerance"]  # the default: stores made before it stay valid
        if not self.intra:
            del params["sparsify"]  # inert without intra
        for name in ("intra", "stacked"):
            if not params[name]:
                del params[name]  # off: stores made before these options stay valid
        for name, default in _TRANSFORM_DEFAULTS.items():
            if params[name] == default:
                del params[name]  # the default: stores made before these options stay valid
        params["layers"] = list(self.layers)
        return params

    def fit_options(self) -> dict[str, Any]:
        """Keyword arguments for ``kernels.powerlaw.fit``."""
        options: dict[str, Any] = {"mode": self.pl_mode, "small_n": self.ww_version == "0.7.7"}
        if self.fix_fingers:
            options["fix_fingers"] = self.fix_fingers
        if self.fix_fingers == "clip_xmax":
            options.update(max_fingers=self.max_fingers, finger_thresh=self.finger_thresh)
        if self.fix_fingers == "xmin_peak":
            options.update(xmin_max=self.xmin_max, xmin_peak_ww_range=self.ww_quirks)
        if self.xmax is not None:  # 'force', or WeightWatcher's int xmax: clip the top |k| eigenvalues
            options["xmax"] = self.xmax if self.xmax == "force" else int(self.xmax)
        if self.fit == "TPL":
            options["distribution"] = "truncated_power_law"
        if self.bootstrap:
            options.update(bootstrap=self.bootstrap, seed=self.seed)
        return options


def require_backends(options: AnalysisOptions) -> None:
    """Raise ``ValueError`` naming the option when a chosen backend cannot run on this machine (in-process use)."""
    from zooscope.kernels.backends import cupy_available

    if options.esd_backend != "auto" and not esd_kernels.backend_available(options.esd_backend):
        usable = [b for b in esd_kernels.BACKENDS if esd_kernels.backend_available(b)]
        raise ValueError(f"Invalid value for 'esd_backend': {options.esd_backend!r} needs a library or GPU that "
                         f"this machine lacks; usable here: 'auto', {', '.join(map(repr, usable))}")
    if options.fit_backend == "cuda" and not cupy_available():
        raise ValueError("Invalid value for 'fit_backend': 'cuda' needs CuPy and a CUDA device, which this machine "
                         "lacks; usable here: 'numba', 'numpy'")


def analyze_path(path: str, options: AnalysisOptions, keys: list[str] | None = None) -> ModelResult:
    """Open the checkpoint at ``path`` and analyse it (only ``keys`` when given: one shard)."""
    with open_checkpoint(path) as ckpt:
        return analyze_checkpoint(ckpt, options, keys=keys)


def analyze_checkpoint(ckpt: Checkpoint, options: AnalysisOptions, keys: list[str] | None = None) -> ModelResult:
    """Analyse the layers of ``ckpt`` (restricted to ``keys`` if given) into a ``ModelResult``.

    Layers whose weights are unusable (NaN/Inf, degenerate) become rows with ``status="error"`` and a message
    naming the file and tensor; a failed power-law fit gives ``status="failed"``; other layers go on. This is
    ``pipelines.batch`` with a batch of one model; a file that cannot be read raises its ``CheckpointError``.
    """
    return analyze_one(ckpt, options, keys)


#: WeightWatcher 0.7's per-layer columns (default options), in its order after ``layer_id, name``.
_WW_COLUMNS = sorted(
    ["D", "M", "N", "Q", "alpha", "alpha_weighted", "entropy", "has_esd", "lambda_max", "layer_type",
     "log_alpha_norm", "log_norm", "log_spectral_norm", "longname", "matrix_rank", "norm", "num_evals",
     "num_pl_spikes", "rank_loss", "rf", "sigma", "spectral_norm", "stable_rank", "status", "sv_max",
     "sv_min", "warning", "weak_rank_loss", "xmax", "xmin"]
)
_OPTIONAL_WW_COLUMNS = (
    "num_spikes", "sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min",
    "max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "rand_num_spikes", "rand_sigma_mp",
    "rand_mp_softrank", "rand_W_scale", "rand_bulk_max", "rand_bulk_min",
    "num_traps", "detX_num", "detX_val", "detX_val_unrescaled", "num_ERG_spikes", "ERG_gap", "slice_id",
)
#: Fit columns WeightWatcher reports only with one option: (column, option field, the value that adds it).
_FIT_OPTION_COLUMNS = (("num_fingers", "fix_fingers", "clip_xmax"), ("raw_alpha", "fix_fingers", "clip_xmax"),
                       ("Lambda", "fit", "TPL"))


def to_weightwatcher_frame(layers: pd.DataFrame, esd: list[np.ndarray] | None = None, *,
                           failed_as_minus_one: bool = True, options: AnalysisOptions | None = None) -> pd.DataFrame:
    """Layer rows in WeightWatcher 0.7's layout: its column names and order, ``status`` success/failed.

    With ``failed_as_minus_one`` a failed fit reads as WeightWatcher writes it (``summary.weightwatcher_rows``:
    −1s, 'over-trained', and log_alpha_norm from the ESDs aligned with ``layers`` when given). Layers with
    ``status="error"`` are dropped (WeightWatcher would have crashed on them). WeightWatcher's aliases are added
    (``num_traps`` = ``rand_num_spikes``, ``num_ERG_spikes`` = ``detX_num``, ``ERG_gap`` = ``detX_num −
    num_pl_spikes``); with the ``options`` of the analysis, fit columns appear only for the option that makes
    WeightWatcher report them (``num_fingers``/``raw_alpha``: ``clip_xmax``; ``Lambda``: a TPL fit; ``Xflag``:
    ``intra``).
    """
    if failed_as_minus_one:
        esd_of = None if esd is None else (lambda row: esd[layers.index.get_loc(row.name)])
        frame = weightwatcher_rows(layers, esd_of).copy()
    else:
        frame = layers[layers["status"] != "error"].copy()
    frame["longname"] = frame["name"]
    frame["has_esd"] = True
    frame["status"] = np.where(frame["status"] == "ok", "success", "failed")
    if "rand_num_spikes" in frame:
        frame["num_traps"] = frame["rand_num_spikes"]
    if "detX_num" in frame:
        frame["num_ERG_spikes"] = frame["detX_num"]
        frame["ERG_gap"] = frame["detX_num"] - frame["num_pl_spikes"]
    fit_columns = [c for c, field, value in _FIT_OPTION_COLUMNS
                   if c in frame and (options is None or getattr(options, field) == value)]
    if options is not None and options.intra:
        frame["Xflag"] = True  # WeightWatcher's mark of an intra row
        fit_columns.append("Xflag")
    columns = ["layer_id", "name"] + sorted(
        [c for c in _WW_COLUMNS if c in frame] + [c for c in _OPTIONAL_WW_COLUMNS if c in frame] + fit_columns
    )
    return frame[columns].reset_index(drop=True)
