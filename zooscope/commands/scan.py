"""``zooscope scan``: analyse checkpoints into a Zarr store, in-process or on a Dask cluster."""
from __future__ import annotations

import argparse
import sys
from typing import Any
from zooscope.commands._args import float_at_least, int_at_least

EXAMPLES = """examples:
  zooscope scan ckpts/ --store zoo.zarr
      every checkpoint under ckpts/ (files and Hugging Face directories), cluster chosen automatically
  zooscope scan --manifest zoo.csv --store zoo.zarr --cluster local --workers 4
      the models listed in zoo.csv (columns: path, optional model_id, metadata such as top1_error)
  zooscope scan big-llm/ --store zoo.zarr --cluster local-cuda --shard-bytes 1GiB
      one worker per GPU; a model above 1 GiB is split into shards analysed in parallel
  zooscope scan /nightly/ckpts --store nightly.zarr --cluster slurm --config my-cluster.yaml
      only new or changed checkpoints are analysed; a changed file becomes the model's next version
  zooscope scan finetunes/ --base pretrained.safetensors --store ft.zarr
      each fine-tune analysed as W - W_base (WeightWatcher's base_model); a manifest 'base' column sets it per model
  zooscope scan adapters/ --peft --base pretrained/ --store lora.zarr
      every LoRA adapter directory under adapters/, merged into the base (without --base: B·A·scale alone)

--cluster auto (the default) runs in-process for small jobs (fewer than 2 tasks or under 256 MiB to read, or a
1-core machine) and on the local profile otherwise: one worker process per core, of which one per GPU owns that
GPU (the others see none); --cluster none always runs in-process. Profiles come from cluster.yaml (the packaged
one unless --config).
exit status: 0 all models ok, 3 some models failed (listed at the end), 2 usage error (incl. a locked store).
"""

#: command-line flag -> AnalysisOptions field: the one place where scan flags meet the analysis options.
OPTION_FLAGS = {
    "esd_backend": "esd_backend",
    "precision": "precision",
    "fit_backend": "fit_backend",
    "min_evals": "min_evals",
    "max_evals": "max_evals",
    "ww_version": "ww_version",
    "mp_fit": "mp_fit",
    "randomize": "randomize",
    "detx": "detX",
    "seed": "seed",
    "intra": "intra",
    "sparsify": "sparsify",
    "stacked": "stacked",
    "conv2d_fft": "conv2d_fft",
    "fft": "fft",
    "channels": "channels",
    "inverse": "inverse",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="analyse checkpoints into a Zarr store",
        description="Analyse every new or changed checkpoint into a Zarr store (one row per model and per layer).",
        epilog=EXAMPLES,
    )
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="checkpoint file, model directory, or directory of checkpoints")
    parser.add_argument("--store", required=True, help="Zarr store to create or append to")
    parser.add_argument("--manifest", metavar="CSV", help="CSV with a 'path' column (relative to the CSV), "
                        "optional 'model_id', 'base' and 'peft' (see --base, --peft), and metadata columns kept "
                        "on the model rows")
    parser.add_argument("--base", metavar="PATH", help="base model of every model (without a manifest 'base'): "
                        "analyse W - W_base per layer; stored in the 'base_path' column")
    parser.add_argument("--peft", action="store_true", help="the PATHs are LoRA adapter directories "
                        "(adapter_config.json + adapter_model.*), or folders holding them: analyse B·A·scale, "
                        "or with --base the merged W_base + B·A·scale")
    run_group = parser.add_argument_group("where it runs")
    run_group.add_argument("--cluster", default="auto", metavar="PROFILE",
                           help="auto (default), none, local, local-cuda, slurm, address, or another profile "
                                "of --config")
    run_group.add_argument("--config", metavar="YAML", help="cluster profiles file (default: packaged cluster.yaml)")
    run_group.add_argument("--workers", type=int_at_least(1), metavar="N", help="worker count, overriding the profile")
    run_group.add_argument("--shard-bytes", type=_size, metavar="SIZE",
                           help="split models larger than SIZE into shards (e.g. 512MiB; default 2GiB)")
    run_group.add_argument("--batch-bytes", type=_size, metavar="SIZE",
                           help="analyse smaller models many to a task, up to SIZE read per task (default 16MiB)")
    run_group.add_argument("--batch-models", type=int, metavar="N",
                           help="at most N models per task (default 2048)")
    run_group.add_argument("--retry-failed", action="store_true",
                           help="analyse again the models stored as errors (by default a file recorded as "
                                "unreadable is skipped until it changes)")
    run_group.add_argument("--rehash", action="store_true",
                           help="hash every file, even those whose size and mtime match the store's record")
    run_group.add_argument("--commit-seconds", type=float_at_least(0), default=10.0, metavar="S",
                           help="commit finished models to the store at least every S seconds (default 10; "
                                "0: after every task); a crash loses at most the last S seconds of results")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_analysis_arguments(parser)
    parser.set_defaults(func=run)


def _size(text: str) -> int:
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """The analysis flags (``OPTION_FLAGS``), shared by ``zooscope scan`` and ``zooscope analyze``."""
    from zooscope.kernels import esd, powerlaw

    analysis = parser.add_argument_group("analysis (WeightWatcher option names)")
    analysis.add_argument("--esd-backend", default="auto", choices=("auto", *esd.BACKENDS), help="eigenvalue backend")
    analysis.add_argument("--precision", default="fp64", choices=esd.PRECISIONS,
                          help="eigenvalue precision (fp32: SVD backends only)")
    analysis.add_argument("--fit-backend", default="auto", choices=("auto", *powerlaw.BACKENDS),
                          help="power-law fit kernel (auto: numba in a scan; in analyze, numpy for small models)")
    analysis.add_argument("--min-evals", type=int, default=None,
                          help="skip layers with fewer eigenvalues (default: 10 for --ww-version 0.7.5, 8 for 0.7.7)")
    analysis.add_argument("--max-evals", type=int, default=15000, help="skip layers with more eigenvalues")
    analysis.add_argument("--ww-version", default="0.7.5", choices=("0.7.5", "0.7.7"),
                          help="WeightWatcher release whose defaults are reproduced")
    analysis.add_argument("--mp-fit", action="store_true", help="Marchenko-Pastur fit columns")
    analysis.add_argument("--randomize", action="store_true", help="compare with randomized weights")
    analysis.add_argument("--detx", action="store_true", help="detX columns")
    analysis.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    analysis.add_argument("--intra", action="store_true",
                          help="one row per pair of consecutive layers, their normalised product (WeightWatcher's "
                               "intra; models are not sharded)")
    analysis.add_argument("--no-sparsify", dest="sparsify", action="store_false",
                          help="with --intra: no random 0/1 matrix between the two layers")
    analysis.add_argument("--stacked", action="store_true",
                          help="one row for all layers standardised and stacked into one matrix (WeightWatcher's "
                               "stacked; models are not sharded)")
    analysis.add_argument("--conv2d-fft", action="store_true",
                          help="Conv2D layers as the real parts of their kernels' 2-D FFTs (32 x 32 grid)")
    analysis.add_argument("--fft", action="store_true", help="every matrix replaced by the real part of its 2-D FFT")
    analysis.add_argument("--channels", choices=("first", "last"),
                          help="kernel layout of files without one of their own (safetensors, .pt, .npz): "
                               "first = Keras (kh, kw, in, out), last = PyTorch (out, in, kh, kw), the default")
    analysis.add_argument("--inverse", action="store_true", help="analyse the inverse ESD (1/eigenvalue)")


def option_values(args: argparse.Namespace) -> dict[str, Any]:
    """``AnalysisOptions`` field → value of the parsed analysis flags (``OPTION_FLAGS``)."""
    return {field: getattr(args, flag) for flag, field in OPTION_FLAGS.items()}


def options_from_args(args: argparse.Namespace) -> Any:
    """``AnalysisOptions`` from the parsed flags (``OPTION_FLAGS``)."""
    from zooscope.pipelines.analyze import AnalysisOptions

    return AnalysisOptions(**option_values(args))


def _manifest_columns(path: str) -> list[str]:
    """The header of a manifest CSV."""
    import pandas as pd

    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the manifest {path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from zooscope.engine.cluster import ClusterConfigError
    from zooscope.engine.scan import ScanUsageError, scan
    from zooscope.engine.store import StoreLockedError, StoreWriteError, check_column_names

    if not args.paths and not args.manifest:
        print("zooscope scan: error: give at least one PATH or --manifest", file=sys.stderr)
        return 2
    try:
        options = options_from_args(args)
        if args.manifest:  # before anything is analysed or written
            check_column_names(_manifest_columns(args.manifest), "manifest column")
    except (ValueError, OSError) as err:
        print(f"zooscope scan: error: {err}", file=sys.stderr)
        return 2
    try:
        report = scan(args.paths, args.store, manifest=args.manifest, base=args.base, peft=args.peft,
                      options=options, cluster=args.cluster,
                      config=args.config, workers=args.workers, shard_bytes=args.shard_bytes,
                      batch_bytes=args.batch_bytes, batch_models=args.batch_models,
                      retry_failed=args.retry_failed, rehash=args.rehash, commit_seconds=args.commit_seconds,
                      progress=not args.no_progress)
    except (ScanUsageError, ClusterConfigError, StoreLockedError, StoreWriteError, TimeoutError) as err:
        print(f"zooscope scan: error: {err}", file=sys.stderr)
        return 2
    drift = f", drift from init for {report.n_drift} checkpoints" if report.n_drift else ""
    print(f"{report.n_ok} ok, {report.n_error} failed, {report.n_skipped} already in the store{drift} "
          f"({report.seconds:.1f} s, cluster {report.cluster}) -> {report.store}")
    if report.failed:
        print(f"failed ({len(report.failed)}):")
        for _, message in report.failed:
            print(f"  {message}")
    return report.exit_code
