"""Networks trained per second: the batched zoo trainer (``pipelines.sweep.train_batched``) against the plain
per-network loop (``train_one``: torch.nn, autograd, torch.optim.SGD), same networks, data and epochs.

    python bench/sweep.py                                # CPU: 64 width-100 MLPs on digits, 5 epochs
    python bench/sweep.py --device cuda                  # GPU target: 1,000 width-100 MLPs, 100 epochs < 60 s

The loop is timed on the first ``--loop-networks`` networks and its rate extrapolated (networks are independent
and the same size). A third row times the whole ``sweep()`` (training, evaluation on the full train/test sets at
``--checkpoints`` epochs, safetensors writing) for the same zoo.

    python bench/sweep.py --paper000                     # 1,000 CNNs on digits: vmap-batched vs loop, + pipeline

``--paper000``: paper 000's CNN (one 3x3 conv of ``--cnn-width`` channels, 2x2 max-pool, linear out; Adam lr 0.001,
batch 100, normal init) on digits (8x8 images): ``--networks`` (default 1,000) networks trained for ``--epochs``
(default 1) at once by ``train_zoo`` (torch.func vmap) and one after the other by ``train_one`` (torch.nn + autograd
+ torch.optim.Adam), the same networks, data order and steps on both sides (no extrapolation). Then the wall time
of the README's paper-000 example end to end (``zooscope sweep`` -> ``scan`` -> ``report``) on digits.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import numpy as np
from _results import load_average, record  # bench/ is on sys.path when run as ``python bench/sweep.py``

from zooscope.pipelines.datasets import load_dataset
from zooscope.pipelines.archs import Arch, init_params
from zooscope.pipelines.sweep import KEYS, init_mlp, resolve_device, sweep, train_batched, train_one, train_zoo

#: The README's paper-000 example (zooscope sweep arguments after --out).
PAPER000_SWEEP = ["--widths", "5", "--depth", "2", "--trials", "300", "--epochs", "60", "--checkpoints", "2",
                  "--optimizer", "adam", "--init", "normal", "--batch-size", "100", "--threads", "1", "--quiet"]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--networks", type=int, help="zoo size (default 64 on cpu, 1000 on cuda)")
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--epochs", type=int, help="default 5 on cpu, 100 on cuda")
    ap.add_argument("--loop-networks", type=int, default=8, help="networks timed in the per-network loop")
    ap.add_argument("--checkpoints", type=int, default=8, help="checkpoints in the full sweep() row")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--paper000", action="store_true", help="the CNN zoo and paper-000 pipeline rows instead")
    ap.add_argument("--cnn-width", type=int, default=8, help="--paper000: conv channels (default 8)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.paper000:
        return paper000(args)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    n_nets = args.networks or (1000 if gpu else 64)
    epochs = args.epochs or (100 if gpu else 5)
    n_loop = min(args.loop_networks, n_nets)
    data = load_dataset(args.dataset)
    seeds = list(range(n_nets))
    inits = [init_mlp(s, args.width, data.n_features, data.n_classes) for s in seeds]
    stacked = {k: np.stack([p[k] for p in inits]) for k in KEYS}
    common = dict(lr=0.1, batch_size=128, dtype=args.dtype, device=device)

    # Warm up lazy initialisation (threads, CUDA context, kernels) outside the timings.
    train_batched({k: v[:2] for k, v in stacked.items()}, data, seeds[:2], epochs=1, **common)
    train_one(inits[0], data, 0, epochs=1, **common)

    _sync(device)
    t0 = time.perf_counter()
    train_batched(stacked, data, seeds, epochs=epochs, **common)
    _sync(device)
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(n_loop):
        train_one(inits[i], data, seeds[i], epochs=epochs, **common)
    _sync(device)
    t_loop = (time.perf_counter() - t0) * n_nets / n_loop

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep(tmp, widths=(args.width,), seeds=seeds, epochs=epochs, checkpoints=args.checkpoints,
              dataset=args.dataset, **common)
        t_sweep = time.perf_counter() - t0

    rows = [
        ("per-network loop (torch.nn + autograd + optim.SGD)", t_loop, f"extrapolated from {n_loop}"),
        ("batched trainer (bmm, one model per width)", t_batched, ""),
        (f"full sweep(): batched + eval + {args.checkpoints} checkpoints written", t_sweep, ""),
    ]
    lines = [
        f"| method | networks | width | epochs | {args.dtype} on {device.type} seconds | networks/s | "
        "speed-up vs loop | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seconds, note in rows:
        lines.append(f"| {name} | {n_nets} | {args.width} | {epochs} | {seconds:.2f} | {n_nets / seconds:.2f} | "
                     f"{t_loop / seconds:.1f}x | {note} |")
    table = "\n".join(lines)
    notes = (f"{args.dataset}: {len(data.X_train)} training rows, batch 128, "
             f"{-(-len(data.X_train) // 128)} SGD steps per epoch per network")
    notes += f"; torch CPU threads {torch_threads()}"
    notes += "; load average during the run {:.1f} on {} cores (shared machine)".format(
        os.getloadavg()[0], os.cpu_count())
    if gpu:
        notes += f"; target 1,000 width-100 MLPs x 100 epochs < 60 s: batched {t_batched:.1f} s"
    if args.no_record:
        print(table)
    else:
        record(f"sweep: batched zoo trainer vs per-network loop ({device.type})", table, notes)


def _load_note() -> str:
    return f"{load_average()} (1/5/15 min) on {os.cpu_count()} cores"


def paper000(args) -> None:
    """1,000 CNNs at once vs one after the other (same work), then the README's sweep -> scan -> report."""
    from zooscope.cli import main as cli

    device = resolve_device(args.device)
    n_nets, epochs = args.networks or 1000, args.epochs or 1
    data = load_dataset(args.dataset)
    arch = Arch("cnn", args.cnn_width, 1)
    module = arch.build(data.n_features, data.n_classes, data.image_shape)
    seeds = list(range(n_nets))
    inits = [init_params(module, s, "normal") for s in seeds]
    stacked = {k: np.stack([p[k] for p in inits]) for k in inits[0]}
    common = dict(arch=arch, optimizer="adam", lr=0.001, batch_size=100, dtype=args.dtype, device=device)
    loads = [_load_note()]

    train_zoo(params={k: v[:2] for k, v in stacked.items()}, data=data, seeds=seeds[:2], epochs=1, **common)
    train_one(inits[0], data, 0, epochs=1, **common)  # warm-ups outside the timings
    _sync(device)
    t0 = time.perf_counter()
    train_zoo(params=stacked, data=data, seeds=seeds, epochs=epochs, **common)
    _sync(device)
    t_batched = time.perf_counter() - t0
    loads.append(_load_note())
    t0 = time.perf_counter()
    for i in seeds:
        train_one(inits[i], data, i, epochs=epochs, **common)
    _sync(device)
    t_loop = time.perf_counter() - t0
    loads.append(_load_note())

    steps = -(-len(data.X_train) // 100) * epochs
    lines = ["| method | networks | epochs | Adam steps per network | "
             f"{args.dtype} on {device.type} seconds | networks/s | speed-up vs loop |",
             "|---|---|---|---|---|---|---|"]
    for name, seconds in (("per-network loop (torch.nn + autograd + optim.Adam)", t_loop),
                          ("batched (torch.func vmap, one model)", t_batched)):
        lines.append(f"| {name} | {n_nets} | {epochs} | {steps} | {seconds:.2f} | {n_nets / seconds:.1f} | "
                     f"{t_loop / seconds:.2f}x |")

    with tempfile.TemporaryDirectory() as tmp:
        zoo = os.path.join(tmp, "zoo")
        stages = []
        for stage, argv_ in (("sweep", ["sweep", "--out", zoo, *PAPER000_SWEEP]),
                             ("scan", ["scan", "--manifest", os.path.join(zoo, "manifest.csv"), "--store",
                                       os.path.join(zoo, "zoo.zarr"), "--min-evals", "1", "--no-progress"]),
                             ("report", ["report", os.path.join(zoo, "zoo.zarr"), "--out",
                                         os.path.join(zoo, "report.html")])):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = cli(argv_)
            if rc != 0:
                raise SystemExit(f"zooscope {stage} failed")
            stages.append((stage, time.perf_counter() - t0))
    loads.append(_load_note())
    lines += ["", "| README paper-000 example on digits (300 minimal DNNs 64-5-5-10, 60 epochs) | seconds |",
              "|---|---|"]
    lines += [f"| zooscope {stage} | {seconds:.1f} |" for stage, seconds in stages]
    lines.append(f"| total | {sum(sec for _, sec in stages):.1f} |")
    table = "\n".join(lines)
    notes = (f"CNN = {arch.series} (conv 3x3, {args.cnn_width} channels, max-pool 2, linear out) on "
             f"{args.dataset} 8x8 images, {len(data.X_train)} training rows, batch 100; both sides train the same "
             f"{n_nets} networks with the same data order (nothing extrapolated); torch CPU threads "
             f"{torch_threads()}; shared machine, other engineers' jobs running: " + "; ".join(loads) +
             " (before batched, after batched, after loop, after pipeline)")
    if args.no_record:
        print(table)
        print(notes)
    else:
        record(f"sweep --paper000: {n_nets} CNNs batched vs looped, paper-000 pipeline ({device.type})", table,
               notes)


if __name__ == "__main__":
    main()
