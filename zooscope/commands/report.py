"""``zooscope report``: one self-contained HTML page about a store (and optionally a regression)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = """examples:
  zooscope report zoo.zarr
      writes report.html: zoo at a glance, alpha and log spectral norm by depth, ESDs of the worst fits,
      histograms per series, flagged layers
  zooscope report zoo.zarr --regress regress/ --out zoo-report.html
      adds the tables and plots of an earlier 'zooscope regress ... --out regress/'
  zooscope report zoo.zarr --layers features.0,classifier.6
      also plots the ESD of these layers (names as in the layers table) in every model
  zooscope report sweep.zarr --image-layer fc1
      for a masked sweep ('zooscope sweep --mask A'), shows fc1.weight instead of fc2.weight at each checkpoint
"""

#: Masked networks (``series`` x ``seed``) whose weight matrices are shown at every checkpoint.
MAX_IMAGE_NETWORKS = 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="HTML report of a store",
        description="Write one self-contained HTML page (figures embedded) describing the models of a store.",
        epilog=EXAMPLES,
    )
    parser.add_argument("store", metavar="STORE", help="zooscope store directory")
    parser.add_argument("--regress", metavar="DIR", help="output directory of 'zooscope regress' to include")
    parser.add_argument("--out", default="report.html", metavar="FILE", help="HTML file (default report.html)")
    parser.add_argument("--layers", metavar="NAMES", help="layer names whose ESD is always plotted, comma-separated")
    parser.add_argument("--title", help="page title (default: zooscope report: STORE)")
    parser.add_argument("--image-layer", default="fc2", metavar="NAME",
                        help="for masked sweeps: the layer (or tensor) drawn as an image at each checkpoint "
                             "(default fc2, i.e. fc2.weight)")
    parser.set_defaults(func=run)


def _mask_images(models, layer: str) -> tuple[dict[str, list[tuple[int, np.ndarray]]], str]:
    """(network title → ``(step, weights)`` per checkpoint, the tensor name read) for at most ``MAX_IMAGE_NETWORKS``
    masked networks (models rows with a non-empty ``mask``, grouped by ``series`` and ``seed``, ordered by
    ``step``). The tensor is ``layer`` itself, or ``layer.weight`` when a checkpoint has no tensor ``layer``.
    Checkpoints that cannot be read, or lack the tensor, are skipped with a warning."""
    from zooscope.pipelines.readers import CheckpointError, open_checkpoint

    name = layer
    if "mask" not in models.columns or "path" not in models.columns:
        return {}, name
    masked = models[models["mask"].astype("string").fillna("").str.strip() != ""]
    if "status" in masked.columns:
        masked = masked[masked["status"] == "ok"]
    keys = [c for c in ("series", "seed") if c in masked.columns]
    if "step" in masked.columns:
        masked = masked.sort_values([*keys, "step"], kind="stable")
    images: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, net in (masked.groupby(keys, sort=False) if keys else [((), masked)]):
        if len(images) == MAX_IMAGE_NETWORKS:
            break
        key = key if isinstance(key, tuple) else (key,)
        title = " ".join(f"{k} {v}" if k == "seed" else str(v) for k, v in zip(keys, key)) or "masked network"
        title += f" (mask {net['mask'].iloc[0]})"
        ckpts = []
        for i, row in enumerate(net.itertuples(index=False)):
            try:
                with open_checkpoint(row.path) as ckpt:
                    names = ckpt.keys()
                    name = layer if layer in names else f"{layer}.weight"
                    if name not in names:
                        print(f"zooscope report: warning: {row.path}: no tensor {layer!r} or {layer + '.weight'!r}"
                              " for the weight images", file=sys.stderr)
                        continue
                    ckpts.append((int(getattr(row, "step", i)), ckpt.read(name)))
            except CheckpointError as exc:
                print(f"zooscope report: warning: weight image skipped: {exc}", file=sys.stderr)
        if ckpts:
            images[title] = ckpts
    return images, name


def _training_sections(store, models, layers, image_layer: str = "fc2") -> list:
    """Weight-statistics, drift and masked-weight sections (``pipelines.report_training``) of a store."""
    from zooscope.pipelines import report_training

    hist = None
    if store.counters.get("n_hist", 0) >= len(layers) and len(layers):
        hist = store.hists(layers.index)
    drift = store.drift()
    images, name = _mask_images(models, image_layer)
    return list(report_training.sections(models, layers, hist, drift if len(drift) else None,
                                         weight_images=images, image_layer=name,
                                         final_weights=_final_weights(models)) or [])


def _final_weights(models) -> dict[str, dict[str, np.ndarray]]:
    """model_id → weight tensors (2-D and up) of the trained networks drawn in the paper-000 sections (at most
    ``report_training.PAPER000_MAX_MODELS`` per dataset x architecture); unreadable checkpoints are skipped with
    a warning."""
    from zooscope.pipelines import report_training
    from zooscope.pipelines.readers import CheckpointError, open_checkpoint

    out: dict[str, dict[str, np.ndarray]] = {}
    for _, _, block in report_training.paper000_blocks(models):
        for row in report_training.paper000_sample(block).itertuples(index=False):
            try:
                with open_checkpoint(row.path) as ckpt:
                    out[str(row.model_id)] = {k: ckpt.read(k) for k in ckpt.keys() if len(ckpt.shape(k)) >= 2}
            except CheckpointError as exc:
                print(f"zooscope report: warning: paper-000 figures skip {row.model_id}: {exc}", file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> int:
    from zooscope.pipelines.regress import load_outputs
    from zooscope.pipelines.report import build_report, write_report

    path = Path(args.store)
    if not path.is_dir():
        print(f"zooscope report: error: {args.store}: no such store directory", file=sys.stderr)
        return 2
    try:
        regression = load_outputs(args.regress) if args.regress else None
    except ValueError as exc:
        print(f"zooscope report: error: {exc}", file=sys.stderr)
        return 2
    from zooscope.engine.store import ZooStore

    try:
        store = ZooStore.open(str(path), "r")
    except (OSError, ValueError) as exc:
        print(f"zooscope report: error: {exc}", file=sys.stderr)
        return 2
    chosen = tuple(n.strip() for n in (args.layers or "").split(",") if n.strip())
    with store:
        models, layers = store.models(), store.layers()
        html = build_report(
            models, layers, esd=lambda row: store.esd(int(row.name)), regression=regression,
            extra_sections=_training_sections(store, models, layers, args.image_layer),
            title=args.title or f"zooscope report: {path.name}", chosen_layers=chosen,
        )
    out = write_report(html, args.out)
    print(f"report written to {out.resolve()}")
    return 0
