"""Networks trained per second: the batched zoo trainer (``pipelines.sweep.train_batched``) against the plain
per-network loop (``train_one``: torch.nn, autograd, torch.optim.SGD), same networks, data and epochs.

    python bench/sweep.py                                # CPU: 64 width-100 MLPs on digits, 5 epochs
    python bench/sweep.py --device cuda                  # GPU target: 1,000 width-100 MLPs, 100 epochs < 60 s

The loop is timed on the first ``--loop-networks`` networks and its rate extrapolated (networks are independent
and the same size). A third row times the whole ``sweep()`` (training, evaluation on the full train/test sets at
``--checkpoints`` epochs, safetensors writing) for the same zoo.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from _results import record  # bench/ is on sys.path when run as ``python bench/sweep.py``

from zooscope.pipelines.datasets import load_dataset
from zooscope.pipelines.sweep import KEYS, init_mlp, resolve_device, sweep, train_batched, train_one


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
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
