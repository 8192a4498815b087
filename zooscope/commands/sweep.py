"""``zooscope sweep``: train a zoo of small MLPs, CNNs or ViTs (papers 000/001) and write checkpoints plus a
manifest."""
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
  zooscope sweep --out cnn/ --arch cnn --depth 1 --widths 8 --trials 1000 --optimizer adam --init normal \
      --batch-size 100 --epochs 5                            paper 000: 1,000 CNNs, accuracy groups in the manifest
  zooscope sweep --out vit/ --arch vit --depth 1 --widths 16 --heads 2 --patch 4 --trials 30 --optimizer adam \
      --dataset fashion-mnist:~/data/fashion                local IDX files (or cifar10:cifar-10-python.tar.gz)
then:
  zooscope scan --manifest zoo/manifest.csv --store zoo/zoo.zarr
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_pair(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected two increasing numbers LO,HI, got {text!r}")
    return values


def register(subparsers) -> None:
    from zooscope.pipelines.archs import ARCHS, INIT_SCHEMES
    from zooscope.pipelines.sweep import OPTIMIZERS

    p = subparsers.add_parser(
        "sweep",
        help="train a zoo of MLPs, CNNs or ViTs (all networks at once) and write checkpoints + manifest.csv",
        description=(
            "Train MLPs, CNNs or ViTs for every width x seed, all networks of a width at once as one batched model "
            "(torch.func vmap; GPU when available), and write one safetensors file per network and checkpoint "
            "epoch plus OUT/manifest.csv for `zooscope scan`. Defaults are paper 001's setting (two-hidden-layer "
            "ReLU MLP, SGD lr 0.1, Glorot-uniform init, zero biases); paper 000's is --optimizer adam --init normal "
            "--batch-size 100. The manifest gives every network its final accuracy and low/mid/high group."
        ),
        epilog=EXAMPLES,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--arch", choices=ARCHS, default="mlp", help="network family (default mlp)")
    p.add_argument("--widths", type=_int_list, default=[10, 30, 100],
                   help="hidden units (mlp), channels (cnn) or embedding size (vit); default 10,30,100")
    p.add_argument("--depth", type=int, default=2,
                   help="hidden layers (mlp), conv layers (cnn) or transformer blocks (vit); default 2")
    p.add_argument("--heads", type=int, default=2, help="vit: attention heads (default 2)")
    p.add_argument("--patch", type=int, default=4, help="vit: patch side in pixels (default 4)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=_int_list, help="network seeds, e.g. 0,1,2 (default)")
    seeds.add_argument("--n-seeds", "--trials", type=int, metavar="N", dest="n_seeds",
                       help="N trials: seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    p.add_argument("--checkpoints", type=int, metavar="K",
                   help="K log-spaced checkpoint epochs incl. 0 and the last (default: every epoch)")
    p.add_argument("--dataset", default="digits",
                   help="digits (default), iris, wine, breast_cancer, mnist1d (if installed), PATH.npz, or local "
                        "files: mnist:PATH, fashion-mnist:PATH (IDX, optionally .gz), cifar10:PATH (python batches); "
                        "PATH a directory or .tar.gz; nothing is downloaded")
    p.add_argument("--mask", metavar="LETTER", help="mlp: zero the initial fc2 weights outside this letter (A-Z)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (default) or adam")
    p.add_argument("--init", choices=INIT_SCHEMES, default="glorot-uniform",
                   help="weight initialisation (default glorot-uniform; biases zero)")
    p.add_argument("--init-std", type=float, default=0.05, help="std of --init normal, bound of uniform (0.05)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1 for sgd, 0.001 for adam)")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    p.add_argument("--groups", type=_float_pair, metavar="LO,HI",
                   help="accuracy group edges: low < LO <= mid < HI <= high (default: tertiles per series)")
    p.add_argument("--fp64", action="store_true", help="train in float64 (default float32)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads while training (default: torch's choice); 1 is fastest for tiny "
                        "networks on a busy machine")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/manifest.csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zooscope.kernels.backends import BackendUnavailable
    from zooscope.pipelines.sweep import sweep

    import torch

    seeds = list(range(args.n_seeds)) if args.n_seeds is not None else (args.seeds or [0, 1, 2])
    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            print("zooscope sweep: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        manifest = sweep(
            args.out, widths=args.widths, seeds=seeds, epochs=args.epochs, checkpoints=args.checkpoints,
            dataset=args.dataset, arch=args.arch, depth=args.depth, heads=args.heads, patch=args.patch,
            optimizer=args.optimizer, init=args.init, init_std=args.init_std, mask=args.mask, lr=args.lr,
            batch_size=args.batch_size, group_edges=args.groups,
            dtype="float64" if args.fp64 else "float32", device=args.device, overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, FileExistsError, BackendUnavailable) as exc:
        print(f"zooscope sweep: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    last = manifest[manifest["step"] == manifest["step"].max()]
    n_nets = len(last)
    print(f"trained {n_nets} networks, wrote {len(manifest)} checkpoints")
    for series, group in last.groupby("series", sort=False):
        counts = group["acc_group"].value_counts()
        print(f"  {series}: train loss {group['train_loss'].mean():.4g}, test acc {group['test_acc'].mean():.3f} "
              f"(mean over {len(group)} seeds); groups " +
              ", ".join(f"{g} {int(counts.get(g, 0))}" for g in ("low", "mid", "high")))
    manifest_path = Path(args.out) / "manifest.csv"
    print(f"manifest: {manifest_path}")
    print(f"next: zooscope scan --manifest {manifest_path} --store {Path(args.out) / 'zoo.zarr'}")
    return 0
