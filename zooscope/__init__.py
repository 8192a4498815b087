"""zooscope: score whole zoos of trained neural networks from their weights alone.

The few things a user imports:

- ``analyze(model_or_path, **options)`` — one model to a WeightWatcher-style DataFrame.
- ``describe(model_or_path, **options)`` — the layers ``analyze`` would analyse, from shapes only.
- ``scan(paths, store, ...)`` — a zoo of checkpoints into a Zarr store (in-process or on a Dask cluster).
- ``open(store)`` — a store as pandas DataFrames (``.models``, ``.layers``, ``.drift``, ``.esd(row)``).
- ``regress(models, y, ...)`` — metrics against accuracy per (dataset, series).
"""
from __future__ import annotations

import warnings
from typing import Any

__version__ = "0.1.0"
__all__ = ["analyze", "describe", "scan", "open", "regress", "__version__"]

#: WeightWatcher ``analyze()`` arguments and the zooscope option each one becomes.
_WW_OPTION_NAMES = {
    "min_evals": "min_evals", "max_evals": "max_evals", "max_N": "max_N", "pool": "pool",
    "conv2d_norm": "conv2d_norm", "mp_fit": "mp_fit", "randomize": "randomize", "detX": "detX",
    "fix_fingers": "fix_fingers", "max_fingers": "max_fingers", "finger_thresh": "finger_thresh", "xmax": "xmax",
    "xmin_max": "xmin_max",
}
#: WeightWatcher 0.7.7 arguments it ignores, and why: zooscope ignores them too, with a warning.
_WW_IGNORED = {
    "min_size": "WeightWatcher 0.7.7 ignores it: use min_evals",
    "max_size": "WeightWatcher 0.7.7 ignores it: use max_evals",
    "glorot_fix": "WeightWatcher 0.7.7 never applies it (analyze() stores it as 'glorot_fit', a key nothing reads)",
}
#: WeightWatcher's default ``savefig`` folder.
_WW_SAVEDIR = "ww-img"
#: the columns of a model with no analysable layer (an empty frame, not a KeyError)
_EMPTY_LAYER_COLUMNS = ("layer_id", "name", "layer_type", "N", "M", "status", "error", "warning", "alpha")
#: WeightWatcher's ``fit`` spellings (``normalize_params``) and the ``AnalysisOptions.fit`` each one becomes.
_WW_FITS = {"PL": "PL", "power_law": "PL", "TPL": "TPL", "truncated_power_law": "TPL", "E_TPL": "E_TPL"}


def _options_from_kwargs(kwargs: dict[str, Any]):
    """Translate WeightWatcher-style keyword arguments into ``AnalysisOptions``; unknown names raise."""
    from zooscope.pipelines.analyze import AnalysisOptions

    fields = set(AnalysisOptions.__dataclass_fields__)
    options: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "svd_method":
            if value not in ("fast", "accurate"):
                raise ValueError(f"svd_method must be 'fast' or 'accurate', got {value!r}")
            options["esd_backend"] = "scipy-gesdd" if value == "accurate" else "auto"
        elif key == "pl_package":
            if value not in ("ww", "powerlaw"):
                raise ValueError(f"pl_package must be 'ww' or 'powerlaw', got {value!r}")
            options["pl_mode"] = value
        elif key == "fit":
            if value not in _WW_FITS:
                raise ValueError(f"fit must be one of {sorted(_WW_FITS)}, got {value!r}")
            options["fit"] = _WW_FITS[value]
        elif key == "layers":
            options["layers"] = tuple(value)
        elif key in ("ERG", "ww2x"):  # WeightWatcher's aliases: ERG=True is detX=True, ww2x=True is pool=False
            if value:
                options["detX" if key == "ERG" else "pool"] = key == "ERG"
        elif key in _WW_IGNORED:
            if value not in (None, False):
                warnings.warn(f"{key}={value!r} is ignored: {_WW_IGNORED[key]}", UserWarning, stacklevel=4)
        elif key in _WW_OPTION_NAMES:
            options[_WW_OPTION_NAMES[key]] = value
        elif key in fields:
            options[key] = value
        else:
            known = fields | set(_WW_OPTION_NAMES) | set(_WW_IGNORED) | {
                "svd_method", "pl_package", "fit", "ERG", "ww2x", "plot", "savefig", "deltas", "vectors",
                "base_model", "peft"}
            raise TypeError(f"analyze() got an unknown option {key!r}; known: {sorted(known)}")
    return AnalysisOptions(**options)


def analyze(model: Any, *, ww_compat: bool = False, start_ids: int = 0, base_model: Any = None, peft: bool = False,
            plot: bool = False, savefig: str | bool = _WW_SAVEDIR, deltas: bool = False, vectors: bool = False,
            **options: Any):
    """Analyse one model and return one row per layer matrix with WeightWatcher 0.7's column names.

    model: a checkpoint path (safetensors, HF directory, .pt/.pth/.bin, .npz, .keras/.h5, .onnx, .gguf,
        .msgpack), a ``torch.nn.Module`` or a state dict. options: ``AnalysisOptions`` fields or WeightWatcher's
        ``analyze()`` argument names.
    ww_compat: write failed fits as WeightWatcher does (alpha = −1 ...) instead of NaN with status 'failed',
        and reproduce WeightWatcher's ``fix_fingers='xmin_peak'`` and Conv2D ``sv_min`` bugs
        (``AnalysisOptions.ww_quirks``).
    For an ``nn.Module``, ``layer_id`` counts ``named_modules()`` as WeightWatcher does (a weight no module owns
    as ``.weight``, e.g. ``MultiheadAttention``'s ``in_proj_weight``, is numbered after the last module). Weight
    statistics are not among WeightWatcher's columns, so they are skipped here (``zooscope scan`` stores them).
    start_ids: WeightWatcher's first layer id (``layer_id`` is shifted by it for every source).
    base_model: a checkpoint (path, module, dict) of the same architecture: analyse ``W − W_base`` per layer.
    peft: ``model`` is a LoRA adapter directory: analyse ``B·A·lora_alpha/r`` per adapted layer, or, with
        ``base_model``, the merged ``W_base + B·A·scale`` (``pipelines.derived.open_derived``).
    plot, savefig: write WeightWatcher's per-layer ESD figures ``ww.layer{layer_id}.esd.png`` (log-log, power-law
        fit, xmin) and ``.esd2.png`` (lin-lin, xmin, MP bulk with ``mp_fit``) into the folder ``savefig``.
    deltas: with ``plot``, also WeightWatcher's eigenvalue-spacing figures ``.deltaEs.png`` (log10 of the gaps
        between consecutive eigenvalues, xmin marked) and ``.level-stats.png`` (their histogram).
    vectors: WeightWatcher's eigenvector localization metrics (``pipelines.vectors``): the columns
        ``{bulk,tail}_{mean,var}_{vec_entropy,loc_ratio,part_ratio}`` (mean and variance of each metric over the
        eigenvectors below / from ``xmin``), and with ``plot`` the figures ``ww.layer{layer_id}.vector_metrics.png``
        (each metric and the eigenvalue, ordered by eigenvalue) and ``.vector_histograms.png`` (bulk and tail
        histograms). Not with ``intra``, ``stacked``, ``inverse`` or ``conv2d_fft``.
    intra, sparsify, stacked: WeightWatcher's composite layers (``AnalysisOptions``): with ``intra`` the rows are
        pairs of consecutive layers named ``"a X b"`` (``layer_id`` of ``b``), with ``stacked`` one row
        ``"stacked"`` (``layer_id`` 0).
    With ``esd_backend="auto"`` (the default) the routing table saved by ``zooscope bench svd --tune`` is used.
    """
    return _analyze(model, ww_compat=ww_compat, start_ids=start_ids, base_model=base_model, peft=peft, plot=plot,
                    savefig=savefig, deltas=deltas, vectors=vectors, **options)[1]


def _analyze(model: Any, *, ww_compat: bool = False, start_ids: int = 0, base_model: Any = None, peft: bool = False,
             plot: bool = False, savefig: str | bool = _WW_SAVEDIR, deltas: bool = False, vectors: bool = False,
             **options: Any):
    """``analyze`` returning ``(ModelResult, WeightWatcher-style frame)``: the result keeps the ESDs."""
    from zooscope.engine.tune import with_saved_table
    from zooscope.pipelines.analyze import analyze_checkpoint, require_backends, to_weightwatcher_frame
    from zooscope.pipelines.derived import open_derived

    if start_ids < 0:
        raise ValueError(f"start_ids must be >= 0, got {start_ids}")
    opts = with_saved_table(_options_from_kwargs({"weightstats": False, "ww_quirks": ww_compat, **options}))
    require_backends(opts)
    if plot and not savefig:
        raise ValueError("plot=True writes PNG files (zooscope shows no windows): give savefig=DIR, not savefig=False")
    if deltas and not plot:
        raise ValueError("deltas=True draws WeightWatcher's eigenvalue-spacing figures: it needs plot=True")
    if peft not in (True, False):
        raise ValueError(f"peft must be True or False, got {peft!r}")
    if vectors not in (True, False):
        raise ValueError(f"vectors must be True or False, got {vectors!r}")
    if vectors and (opts.intra or opts.stacked or opts.inverse or opts.conv2d_fft):
        raise ValueError("vectors=True works on the layers' own matrices: not with intra, stacked, inverse or "
                         "conv2d_fft (WeightWatcher 0.7.7 refuses intra and inverse, and crashes on conv2d_fft)")
    layer_vecs = None
    with open_derived(model, base=base_model, peft=peft) as ckpt:
        result = analyze_checkpoint(ckpt, opts)
        kept = [i for i, status in enumerate(result.layers.get("status", [])) if status != "error"]  # frame's rows
        if vectors and kept:
            from zooscope.pipelines.vectors import layer_vectors

            rows = result.layers.loc[kept]
            slices = rows["slice_id"].astype(int) if "slice_id" in rows else [None] * len(kept)
            layer_vecs = layer_vectors(ckpt, opts, list(zip(rows["name"], slices)))
    esds = [result.esd[i] for i in kept]
    layers = result.layers if len(result.layers) else result.layers.reindex(columns=_EMPTY_LAYER_COLUMNS)
    frame = to_weightwatcher_frame(layers, result.esd, failed_as_minus_one=ww_compat, options=opts)
    _weightwatcher_layer_ids(model, frame, start_ids, opts)
    if layer_vecs is not None:
        from zooscope.pipelines.vectors import vector_columns

        frame = frame.join(vector_columns(layer_vecs, esds, frame["xmin"].to_numpy(float)))
        frame = frame[["layer_id", "name"] + sorted(frame.columns.drop(["layer_id", "name"]))]
    if plot:
        from zooscope.pipelines.layer_figures import save_layer_figures

        save_layer_figures(frame, esds, savefig, deltas=deltas, vectors=layer_vecs)
    return result, frame


def _weightwatcher_layer_ids(model: Any, frame, start_ids: int, opts=None) -> None:
    """Renumber ``frame["layer_id"]`` as WeightWatcher does: ``named_modules()`` order for an ``nn.Module`` (an
    intra row ``"a X b"`` takes ``b``'s), then shifted by ``start_ids``; the stacked row keeps 0."""
    if opts is not None and opts.stacked:
        return
    if hasattr(model, "named_modules"):
        from zooscope.pipelines.composite import INTRA_SEPARATOR

        names = frame["name"].str.split(INTRA_SEPARATOR).str[-1] if opts is not None and opts.intra else frame["name"]
        module_ids = {name: i for i, (name, _) in enumerate(model.named_modules())}
        others = dict.fromkeys(n for n in names if n not in module_ids)  # e.g. attn.in_proj (no module)
        module_ids.update((n, len(module_ids) + i) for i, n in enumerate(others))
        frame["layer_id"] = names.map(module_ids).astype(int)
    frame["layer_id"] += start_ids


def describe(model: Any, *, start_ids: int = 0, **options: Any):
    """The layer plan of ``analyze(model, **options)`` without computing anything (WeightWatcher's ``describe()``).

    Only shapes and dtypes are read (safetensors/GGUF/ONNX/Keras headers), so a sharded 70B checkpoint takes
    seconds. One row per weight tensor, analysed or not: ``layer_id, name, layer_type, shape, N, M, Q`` (N/M),
    ``rf`` (kernel positions), ``num_evals`` (M·rf), ``n_slices``, ``skip_reason`` ("" when analysed). Options:
    those of ``analyze`` that choose layers or shape them (``min_evals``, ``max_evals``, ``max_N``, ``pool``,
    ``ww_version``, ``layers``, ``conv2d_fft``, ``fft``, ``channels``); the others are checked and ignored.
    """
    import pandas as pd

    from zooscope.pipelines.derived import with_channels
    from zooscope.pipelines.layers import plan_layers
    from zooscope.pipelines.readers import open_checkpoint

    if start_ids < 0:
        raise ValueError(f"start_ids must be >= 0, got {start_ids}")
    opts = _options_from_kwargs(options)
    with open_checkpoint(model) as ckpt:
        plan = plan_layers(with_channels(ckpt, opts.channels), min_evals=opts.min_evals, max_evals=opts.max_evals,
                           max_N=opts.max_N, pool=opts.pool, conv2d_fft=opts.conv2d_fft, fft=opts.fft)
    rows = [{"layer_id": info.layer_id, "name": info.name, "layer_type": info.layer_type, "shape": info.shape,
             "N": info.N, "M": info.M, "Q": info.N / info.M, "rf": info.rf, "num_evals": info.num_evals,
             "n_slices": info.n_slices, "skip_reason": info.skip_reason or ""}
            for info in plan if not opts.layers or info.name in opts.layers]
    frame = pd.DataFrame(rows, columns=["layer_id", "name", "layer_type", "shape", "N", "M", "Q", "rf", "num_evals",
                                        "n_slices", "skip_reason"])
    _weightwatcher_layer_ids(model, frame, start_ids)
    return frame


def scan(paths=(), store: str | None = None, **kwargs: Any):
    """Analyse every checkpoint under ``paths`` (or a ``manifest=``) into the Zarr ``store`` (required: a path,
    never a default). See ``engine.scan``."""
    from zooscope.engine.scan import scan as _scan

    if store is None or (isinstance(store, str) and not store.strip()):
        raise TypeError("scan() needs a store: zooscope.scan(paths, store='zoo.zarr')")

    return _scan(paths, store, **kwargs)


def open(path: str, *, latest: bool = False):  # noqa: A001 - mirrors xarray.open / zarr.open
    """Open a zooscope store read-only: ``.models``, ``.layers``, ``.drift`` DataFrames and ``.esd(row)``."""
    from zooscope.engine.store import open_store

    return open_store(path, latest=latest)


def regress(models, y: str, **kwargs: Any):
    """Regress model-level metrics against ``y`` per group. See ``zooscope.pipelines.regress.regress``."""
    from zooscope.pipelines.regress import regress as _regress

    return _regress(models, y, **kwargs)
