"""Train zoos of small MLPs for papers 000/001 and write them as checkpoints plus a scan-ready manifest.

Paper 001's setting: two hidden ReLU layers of equal width, softmax output with cross-entropy, SGD (lr 0.1,
batch 128, no momentum), Glorot-uniform weights, zero biases. All networks of one width train **at once** as
one batched model: weights are stacked along a leading network axis and every layer is one ``torch.baddbmm``,
with forward and backward written out by hand (no autograd), each network drawing its own mini-batches.

Randomness is per network and independent of the rest of the sweep: network ``seed`` draws its initial weights
from ``numpy.random.default_rng([seed, 0])`` (in fp64, then cast) and its data order, one permutation of the
training set per epoch, from ``numpy.random.default_rng([seed, 1])``. The same seed therefore sees the same data
order at every width, and a network trains to the same weights alone (``train_one``) or in any batch.

Checkpoint layout (PyTorch ``(out, in)`` weights): ``fc1.weight (w, d)``, ``fc1.bias (w,)``, ``fc2.weight
(w, w)``, ``fc2.bias (w,)``, ``out.weight (C, w)``, ``out.bias (C,)``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from zooscope.kernels.backends import BackendUnavailable
from zooscope.pipelines.datasets import Dataset, load_dataset
from zooscope.pipelines.letters import letter_mask

KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out.weight", "out.bias")
MANIFEST_COLUMNS = [
    "path", "model_id", "width", "seed", "step", "init", "train_loss", "test_loss", "train_acc", "test_acc",
    "dataset", "series", "mask",
]
DTYPES = ("float32", "float64")
#: Most activation elements (networks x rows x units) one evaluation chunk may hold.
EVAL_CHUNK_ELEMENTS = 1 << 25

CheckpointCallback = Callable[[int, dict[str, np.ndarray], dict[str, np.ndarray]], None]


def checkpoint_epochs(epochs: int, checkpoints: int | None = None) -> list[int]:
    """Epochs at which to save: every epoch ``0..epochs`` when ``checkpoints`` is None, else ``checkpoints``
    distinct epochs spaced evenly in log(epoch), always including 0 and ``epochs`` (all epochs when
    ``checkpoints > epochs``)."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if checkpoints is None or checkpoints > epochs:
        return list(range(epochs + 1))
    if checkpoints < 2:
        raise ValueError(f"checkpoints must be >= 2 (epoch 0 and the last), got {checkpoints}")
    k = checkpoints - 1  # picks among epochs 1..epochs
    if k == 1:
        return [0, epochs]
    picks = np.rint(np.geomspace(1, epochs, k)).astype(int)
    steps = np.arange(k)
    picks = np.maximum.accumulate(picks - steps) + steps  # strictly increasing: bump collisions up
    picks = np.minimum(picks, epochs - k + 1 + steps)  # leave room above, so the last is ``epochs``
    return [0, *picks.tolist()]


def init_mlp(seed: int, width: int, n_in: int, n_out: int, *, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Initial fp64 weights of one network: Glorot uniform ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``,
    biases zero. ``mask`` (bool ``(width, width)``) zeroes the ``fc2.weight`` entries where it is False."""
    rng = np.random.default_rng([seed, 0])
    params: dict[str, np.ndarray] = {}
    for name, (fan_out, fan_in) in (("fc1", (width, n_in)), ("fc2", (width, width)), ("out", (n_out, width))):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        params[f"{name}.weight"] = rng.uniform(-limit, limit, size=(fan_out, fan_in))
        params[f"{name}.bias"] = np.zeros(fan_out)
    if mask is not None:
        if mask.shape != (width, width):
            raise ValueError(f"mask shape {mask.shape} does not match fc2.weight ({width}, {width})")
        params["fc2.weight"] = np.where(mask, params["fc2.weight"], 0.0)
    return params


def data_order(seed: int) -> np.random.Generator:
    """The generator whose successive ``permutation(n_train)`` calls give network ``seed``'s epoch orders."""
    return np.random.default_rng([seed, 1])


def resolve_device(device: str | None = None):
    """``torch.device`` for ``device`` (``cpu``, ``cuda``, ``cuda:N``); None picks CUDA when available."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} requested but torch sees no CUDA GPU")
    return dev


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def evaluate(params, X, y) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy (nats) and accuracy of B stacked networks on all of ``X (n, d)``, ``y (n,)``.

    ``params`` holds torch tensors with a leading network axis; returns two fp64 ``(B,)`` arrays.
    """
    import torch

    n_nets, width = params["fc1.weight"].shape[:2]
    chunk = max(1, EVAL_CHUNK_ELEMENTS // max(1, len(X) * width))
    losses, accs = [], []
    with torch.no_grad():
        for lo in range(0, n_nets, chunk):
            p = {k: v[lo : lo + chunk] for k, v in params.items()}
            h = torch.relu(torch.matmul(X, p["fc1.weight"].transpose(1, 2)) + p["fc1.bias"][:, None, :])
            h = torch.relu(torch.baddbmm(p["fc2.bias"][:, None, :], h, p["fc2.weight"].transpose(1, 2)))
            logits = torch.baddbmm(p["out.bias"][:, None, :], h, p["out.weight"].transpose(1, 2))
            logp = torch.log_softmax(logits, dim=2)
            target = y.expand(len(logits), -1)
            losses.append(-logp.gather(2, target[..., None]).squeeze(2).double().mean(1))
            accs.append((logits.argmax(2) == target).sum(1).double() / len(X))
    return torch.cat(losses).cpu().numpy(), torch.cat(accs).cpu().numpy()


def _sgd_step(p, x, onehot, lr: float) -> None:
    """One in-place SGD step of B networks on their own mini-batches ``x (B, m, d)``, ``onehot (B, m, C)``.

    Gradient of each network's mean cross-entropy over its m rows, by hand: softmax - onehot at the output,
    ReLU masks on the way back (the 1/m folds into the step size); every weight update is one ``baddbmm_``.
    """
    import torch

    relu_grad = torch.ops.aten.threshold_backward  # grad where activation > 0, else 0 (what autograd uses)
    step = lr / x.shape[1]
    a1 = torch.baddbmm(p["fc1.bias"][:, None, :], x, p["fc1.weight"].transpose(1, 2)).relu_()
    a2 = torch.baddbmm(p["fc2.bias"][:, None, :], a1, p["fc2.weight"].transpose(1, 2)).relu_()
    z3 = torch.baddbmm(p["out.bias"][:, None, :], a2, p["out.weight"].transpose(1, 2))
    g3 = torch.softmax(z3, dim=2).sub_(onehot)
    g2 = relu_grad(torch.bmm(g3, p["out.weight"]), a2, 0)
    p["out.weight"].baddbmm_(g3.transpose(1, 2), a2, alpha=-step)
    p["out.bias"].sub_(g3.sum(1), alpha=step)
    g1 = relu_grad(torch.bmm(g2, p["fc2.weight"]), a1, 0)
    p["fc2.weight"].baddbmm_(g2.transpose(1, 2), a1, alpha=-step)
    p["fc2.bias"].sub_(g2.sum(1), alpha=step)
    p["fc1.weight"].baddbmm_(g1.transpose(1, 2), x, alpha=-step)
    p["fc1.bias"].sub_(g1.sum(1), alpha=step)


def train_batched(
    params: dict[str, np.ndarray],
    data: Dataset,
    seeds: Sequence[int],
    *,
    epochs: int,
    lr: float = 0.1,
    batch_size: int = 128,
    dtype: str = "float32",
    device=None,
    save_epochs: Sequence[int] = (),
    on_checkpoint: CheckpointCallback | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Train B same-width networks at once and return their final weights (stacked, leading axis B).

    ``params`` maps ``KEYS`` to stacked arrays (``fc1.weight`` is ``(B, w, d)``, ...); network ``i`` draws its
    data order from ``data_order(seeds[i])``. At every epoch in ``save_epochs`` (0 = before training)
    ``on_checkpoint(epoch, weights, metrics)`` gets the stacked weights as numpy arrays and ``metrics``:
    ``train_loss, test_loss, train_acc, test_acc`` as ``(B,)`` fp64 arrays on the full sets.
    ``on_epoch(epoch)`` is called after each epoch (progress bars).
    """
    import torch

    dev, tdt = resolve_device(device), _torch_dtype(dtype)
    n_nets = params["fc1.weight"].shape[0]
    if len(seeds) != n_nets:
        raise ValueError(f"{len(seeds)} seeds for {n_nets} stacked networks")
    p = {k: torch.as_tensor(np.ascontiguousarray(params[k]), dtype=tdt, device=dev).clone() for k in KEYS}
    X_train = torch.as_tensor(data.X_train, dtype=tdt, device=dev)
    X_test = torch.as_tensor(data.X_test, dtype=tdt, device=dev)
    y_train = torch.as_tensor(data.y_train, device=dev)
    y_test = torch.as_tensor(data.y_test, device=dev)
    onehot = torch.nn.functional.one_hot(y_train, params["out.weight"].shape[1]).to(tdt)
    orders = [data_order(s) for s in seeds]
    n = len(X_train)
    save = set(save_epochs)

    def checkpoint(epoch: int) -> None:
        if on_checkpoint is None or epoch not in save:
            return
        train_loss, train_acc = evaluate(p, X_train, y_train)
        test_loss, test_acc = evaluate(p, X_test, y_test) if len(X_test) else (np.full(n_nets, np.nan),) * 2
        metrics = dict(train_loss=train_loss, test_loss=test_loss, train_acc=train_acc, test_acc=test_acc)
        on_checkpoint(epoch, {k: v.cpu().numpy().copy() for k, v in p.items()}, metrics)  # copy: p changes

    checkpoint(0)
    for epoch in range(1, epochs + 1):
        idx = torch.as_tensor(np.stack([o.permutation(n) for o in orders]), device=dev)
        for lo in range(0, n, batch_size):
            rows = idx[:, lo : lo + batch_size]
            _sgd_step(p, X_train[rows], onehot[rows], lr)
        checkpoint(epoch)
        if on_epoch is not None:
            on_epoch(epoch)
    return {k: v.cpu().numpy() for k, v in p.items()}


def train_one(
    params: dict[str, np.ndarray],
    data: Dataset,
    seed: int,
    *,
    epochs: int,
    lr: float = 0.1,
    batch_size: int = 128,
    dtype: str = "float64",
    device=None,
) -> dict[str, np.ndarray]:
    """The plain per-network loop: one ``torch.nn`` MLP, autograd, ``torch.optim.SGD``, ``F.cross_entropy``,
    same data order as ``train_batched`` for ``seed``. The reference for tests and the baseline for benchmarks."""
    import torch
    from torch import nn

    dev, tdt = resolve_device(device), _torch_dtype(dtype)
    width, n_in = params["fc1.weight"].shape
    n_out = params["out.weight"].shape[0]
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(n_in, width), relu1=nn.ReLU(), fc2=nn.Linear(width, width), relu2=nn.ReLU(),
        out=nn.Linear(width, n_out),
    )).to(device=dev, dtype=tdt)
    model.load_state_dict({k: torch.as_tensor(v, dtype=tdt) for k, v in params.items()})
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X = torch.as_tensor(data.X_train, dtype=tdt, device=dev)
    y = torch.as_tensor(data.y_train, device=dev)
    order = data_order(seed)
    for _ in range(epochs):
        perm = torch.as_tensor(order.permutation(len(X)), device=dev)
        for lo in range(0, len(X), batch_size):
            rows = perm[lo : lo + batch_size]
            loss = nn.functional.cross_entropy(model(X[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def sweep(
    out_dir: str | Path,
    *,
    widths: Sequence[int] = (10, 30, 100),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 50,
    checkpoints: int | None = None,
    dataset: str | Path = "digits",
    mask: str | None = None,
    lr: float = 0.1,
    batch_size: int = 128,
    dtype: str = "float32",
    device=None,
    overwrite: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Train one network per (width, seed), one batched model per width, and write the zoo to ``out_dir``.

    Writes ``out_dir/mlp-w{width}/s{seed}/e{epoch}.safetensors`` at the epochs of
    ``checkpoint_epochs(epochs, checkpoints)`` and then ``out_dir/manifest.csv`` (``MANIFEST_COLUMNS``:
    ``path`` relative to ``out_dir``, ``step`` = epoch, ``init`` = model_id of the network's epoch-0
    checkpoint, losses in nats and accuracies in [0, 1] on the full train/test sets). ``mask`` is a letter
    stamped on the initial hidden-to-hidden weights (paper 001 Figure 1). Returns the manifest.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    manifest_path = out / "manifest.csv"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{manifest_path} exists; use another directory or overwrite=True (--overwrite)")
    widths, seeds = [int(w) for w in widths], [int(s) for s in seeds]
    if not widths or min(widths) < 1 or len(set(widths)) != len(widths):
        raise ValueError(f"widths must be distinct positive integers, got {widths}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    if lr <= 0 or batch_size < 1:
        raise ValueError(f"need lr > 0 and batch_size >= 1, got lr={lr}, batch_size={batch_size}")
    _torch_dtype(dtype)
    device = resolve_device(device)
    data = load_dataset(dataset)
    save_epochs = checkpoint_epochs(epochs, checkpoints)
    tag = Path(str(dataset)).stem if str(dataset).endswith(".npz") else str(dataset)
    pad = len(str(epochs))
    rows: list[dict] = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * len(widths), unit="epoch", desc="sweep")

    for width in widths:
        series = f"mlp-w{width}" + (f"-mask{mask}" if mask else "")
        bitmap = letter_mask(mask, width, width) if mask else None
        inits = [init_mlp(s, width, data.n_features, data.n_classes, mask=bitmap) for s in seeds]
        stacked = {k: np.stack([p[k] for p in inits]) for k in KEYS}

        def write(epoch: int, weights: dict[str, np.ndarray], metrics: dict[str, np.ndarray]) -> None:
            for i, seed in enumerate(seeds):
                rel = Path(series) / f"s{seed}" / f"e{epoch:0{pad}d}.safetensors"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                tensors = {k: np.ascontiguousarray(weights[k][i]) for k in KEYS}
                meta = {"format": "pt", "width": str(width), "seed": str(seed), "epoch": str(epoch),
                        "dataset": tag, "mask": mask or ""}
                save_file(tensors, str(out / rel), metadata=meta)
                model_id = f"{tag}-{series}-s{seed}-e{epoch:0{pad}d}"
                rows.append(dict(
                    path=rel.as_posix(), model_id=model_id, width=width, seed=seed, step=epoch,
                    init=f"{tag}-{series}-s{seed}-e{0:0{pad}d}", dataset=tag, series=series, mask=mask or "",
                    **{name: float(values[i]) for name, values in metrics.items()},
                ))

        if bar is not None:
            bar.set_description(f"width {width}")
        train_batched(
            stacked, data, seeds, epochs=epochs, lr=lr, batch_size=batch_size, dtype=dtype, device=device,
            save_epochs=save_epochs, on_checkpoint=write, on_epoch=(lambda _: bar.update()) if bar else None,
        )
    if bar is not None:
        bar.close()
    manifest = pd.DataFrame(rows)[MANIFEST_COLUMNS].sort_values(["width", "seed", "step"], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(manifest_path, index=False)
    return manifest
