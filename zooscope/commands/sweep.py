"""``zooscope sweep``: train a zoo of small MLPs (paper 001's setting) and write checkpoints plus a manifest."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  zooscope sweep --out zoo/                                  widths 10,30,100 x seeds 0,1,2, 50 epochs, digits
  zooscope sweep --out zoo/ --widths 16,64,256 --n-seeds 10 --epochs 200 --checkpoints 12
  zooscope sweep --out zoo/ --dataset wine --fp64 --device cpu
  zooscope sweep --out zoo/ --dataset data.npz               your own X_train, y_train, X_test, y_test
  zooscope sweep --out masked/ --widths 256 --mask A         stamp the letter A on the initial fc2 weights
then:
  zooscope scan --manifest zoo/manifest.csv --store zoo/zoo.zarr
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="train a zoo of MLPs (all networks at once) and write checkpoints + manifest.csv",
        description=(
            "Train two-hidden-layer ReLU MLPs (SGD, Glorot-uniform init, zero biases; paper 001) for every "
            "width x seed, all networks of a width at once as one batched model (GPU when available), and write "
            "one safetensors file per network and checkpoint epoch plus OUT/manifest.csv for `zooscope scan`."
        ),
        epilog=EXAMPLES,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--widths", type=_int_list, default=[10, 30, 100], help="hidden widths (default 10,30,100)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=_int_list, help="network seeds, e.g. 0,1,2 (default)")
    seeds.add_argument("--n-seeds", type=int, metavar="N", help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    p.add_argument("--checkpoints", type=int, metavar="K",
                   help="K log-spaced checkpoint epochs incl. 0 and the last (default: every epoch)")
    p.add_argument("--dataset", default="digits",
                   help="digits (default), iris, wine, breast_cancer, mnist1d (if installed) or PATH.npz")
    p.add_argument("--mask", metavar="LETTER", help="zero the initial fc2 weights outside this letter (A-Z)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    p.add_argument("--fp64", action="store_true", help="train in float64 (default float32)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/manifest.csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zooscope.kernels.backends import BackendUnavailable
    from zooscope.pipelines.sweep import sweep

    seeds = list(range(args.n_seeds)) if args.n_seeds is not None else (args.seeds or [0, 1, 2])
    try:
        manifest = sweep(
            args.out, widths=args.widths, seeds=seeds, epochs=args.epochs, checkpoints=args.checkpoints,
            dataset=args.dataset, mask=args.mask, lr=args.lr, batch_size=args.batch_size,
            dtype="float64" if args.fp64 else "float32", device=args.device, overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, FileExistsError, BackendUnavailable) as exc:
        print(f"zooscope sweep: error: {exc}", file=sys.stderr)
        return 2
    last = manifest[manifest["step"] == manifest["step"].max()]
    n_nets = len(last)
    print(f"trained {n_nets} networks, wrote {len(manifest)} checkpoints")
    for width, group in last.groupby("width"):
        print(f"  width {width:>5}: train loss {group['train_loss'].mean():.4g}, "
              f"test acc {group['test_acc'].mean():.3f} (mean over {len(group)} seeds)")
    manifest_path = Path(args.out) / "manifest.csv"
    print(f"manifest: {manifest_path}")
    print(f"next: zooscope scan --manifest {manifest_path} --store {Path(args.out) / 'zoo.zarr'}")
    return 0
