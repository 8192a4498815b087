"""Train zoos of small MLPs, CNNs and ViTs for papers 000/001 and write them as checkpoints plus a scan-ready
manifest.

All networks of one architecture and width train **at once** as one batched model (``train_zoo``): their
parameters are stacked along a leading network axis and the ``torch.nn`` module of ``archs.Arch`` runs through
``torch.func.functional_call`` under ``torch.func.vmap``, each network on its own mini-batches; autograd gives every
network its own gradient and one ``torch.optim`` SGD or Adam step (element-wise) updates them all. ``train_batched``
is paper 001's MLP trainer written out by hand (``torch.baddbmm``, no autograd); ``train_zoo`` reproduces its numbers
(tested), and ``sweep`` keeps ``train_batched`` for that setting only (two hidden layers, SGD), where it is faster.

Paper 001's setting (the defaults): two hidden ReLU layers of equal width, softmax output with cross-entropy, SGD
(lr 0.1, batch 128, no momentum), Glorot-uniform weights, zero biases. Paper 000's: Adam (lr 0.001), batch 100,
normal initialisation, MLP / CNN / ViT, networks grouped low / mid / high by final accuracy.

Randomness is per network and independent of the rest of the sweep: network ``seed`` draws its initial weights
from ``numpy.random.default_rng([seed, 0])`` (in fp64, then cast; ``archs.init_params``) and its data order, one
permutation of the training set per epoch, from ``numpy.random.default_rng([seed, 1])``. The same seed therefore
sees the same data order at every width, and a network trains to the same weights alone (``train_one``) or in any
batch.

Checkpoint layout (PyTorch ``(out, in)`` weights), paper 001's MLP: ``fc1.weight (w, d)``, ``fc1.bias (w,)``,
``fc2.weight (w, w)``, ``fc2.bias (w,)``, ``out.weight (C, w)``, ``out.bias (C,)``; other architectures: the
``state_dict`` names of their ``pipelines.nets`` module (``conv1.weight (w, C, 3, 3)``, ``blocks.0.qkv.weight``...).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from zooscope.kernels.backends import BackendUnavailable
from zooscope.pipelines.archs import Arch, init_params
from zooscope.pipelines.datasets import IMAGE_DATASETS, Dataset, load_dataset
from zooscope.pipelines.embed import accuracy_groups
from zooscope.pipelines.letters import letter_mask

KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out.weight", "out.bias")
MANIFEST_COLUMNS = [
    "path", "model_id", "width", "seed", "step", "init", "train_loss", "test_loss", "train_acc", "test_acc",
    "dataset", "series", "mask", "arch", "depth", "optimizer", "init_scheme", "final_acc", "acc_group",
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
    """Initial fp64 weights of one paper-001 MLP (``Arch("mlp", width, 2)``): Glorot uniform ``U(-a, a)``,
    ``a = sqrt(6 / (fan_in + fan_out))``, biases zero (``archs.init_params``). ``mask`` (bool ``(width, width)``)
    zeroes the ``fc2.weight`` entries where it is False."""
    params = init_params(Arch("mlp", width, 2).build(n_in, n_out), seed, "glorot-uniform")
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
    arch: Arch | None = None,
    optimizer: str = "sgd",
    lr: float | None = None,
    batch_size: int = 128,
    dtype: str = "float64",
    device=None,
) -> dict[str, np.ndarray]:
    """The plain per-network loop: one ``torch.nn`` module of ``arch`` (default: the MLP ``params`` describe),
    autograd, ``torch.optim`` (``optimizer``, ``lr``; default ``DEFAULT_LR``), ``F.cross_entropy``, same data order
    as ``train_batched``/``train_zoo`` for ``seed``. The reference for tests and the baseline for benchmarks."""
    import torch
    from torch import nn

    dev, tdt = resolve_device(device), _torch_dtype(dtype)
    if arch is None:
        depth = sum(1 for k in params if k.startswith("fc") and k.endswith(".weight"))
        arch = Arch("mlp", width=int(params["fc1.weight"].shape[0]), depth=depth)
    model = arch.build(data.n_features, data.n_classes, data.image_shape, batched=False).to(device=dev, dtype=tdt)
    model.load_state_dict({k: torch.as_tensor(v, dtype=tdt) for k, v in params.items()})
    opt = _optimizer(optimizer, model.parameters(), DEFAULT_LR.get(optimizer, 0.0) if lr is None else lr)
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


OPTIMIZERS = ("sgd", "adam")
#: Default learning rate per optimizer (paper 001: SGD 0.1; paper 000: Adam 0.001).
DEFAULT_LR = {"sgd": 0.1, "adam": 0.001}


def _optimizer(name: str, params, lr: float):
    """``torch.optim`` SGD (no momentum) or Adam (PyTorch defaults) over the stacked parameter tensors.

    Both update element by element, so on stacked tensors every network takes exactly its own step."""
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _activation_elements(module, n_features: int) -> int:
    """Activation elements one more input row makes ``module`` keep for backward (tensors saved by autograd with 2
    rows minus with 1, parameters thus left out), doubled for temporaries: sizes evaluation chunks."""
    import torch

    p = next(module.parameters())

    def saved(rows: int) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(torch.zeros(rows, n_features, dtype=p.dtype, device=p.device, requires_grad=True))
        return total[0]

    return 2 * max(saved(2) - saved(1), n_features)


def train_zoo(
    arch: Arch,
    params: dict[str, np.ndarray],
    data: Dataset,
    seeds: Sequence[int],
    *,
    epochs: int,
    optimizer: str = "sgd",
    lr: float | None = None,
    batch_size: int = 128,
    dtype: str = "float32",
    device=None,
    save_epochs: Sequence[int] = (),
    on_checkpoint: CheckpointCallback | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Train B networks of ``arch`` at once as one batched model and return their final stacked weights.

    ``params`` maps the module's parameter names to stacked arrays (leading axis B, e.g. from ``init_params`` per
    seed). The module runs through ``torch.func.functional_call`` under ``torch.func.vmap`` over the network axis,
    each network on its own mini-batches (order from ``data_order(seeds[i])``, as ``train_batched``), loss = mean
    cross-entropy per network; one ``torch.optim`` step (``optimizer``, ``lr``; default ``DEFAULT_LR``) updates all
    stacked tensors. ``save_epochs``, ``on_checkpoint`` and ``on_epoch`` as ``train_batched``.
    """
    import torch
    from torch.func import functional_call, vmap

    dev, tdt = resolve_device(device), _torch_dtype(dtype)
    lr = DEFAULT_LR.get(optimizer, 0.0) if lr is None else lr
    base = arch.build(data.n_features, data.n_classes, data.image_shape).to(device=dev, dtype=tdt)
    names = [n for n, _ in base.named_parameters()]
    if sorted(names) != sorted(params):
        raise ValueError(f"params have tensors {sorted(params)}, {arch.series} needs {sorted(names)}")
    n_nets = len(params[names[0]])
    if len(seeds) != n_nets:
        raise ValueError(f"{len(seeds)} seeds for {n_nets} stacked networks")
    p = {k: torch.as_tensor(np.ascontiguousarray(params[k]), dtype=tdt, device=dev).clone().requires_grad_()
         for k in names}
    opt = _optimizer(optimizer, list(p.values()), lr)
    X_train = torch.as_tensor(data.X_train, dtype=tdt, device=dev)
    X_test = torch.as_tensor(data.X_test, dtype=tdt, device=dev)
    y_train = torch.as_tensor(data.y_train, device=dev)
    y_test = torch.as_tensor(data.y_test, device=dev)

    def net_loss(weights, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, weights, (x,)), y)

    batched_loss = vmap(net_loss)
    batched_logits = vmap(lambda weights, x: functional_call(base, weights, (x,)), in_dims=(0, None))
    per_row = _activation_elements(base, data.n_features)
    orders = [data_order(s) for s in seeds]
    n = len(X_train)
    save = set(save_epochs)

    def evaluate_all(X, y) -> tuple[np.ndarray, np.ndarray]:
        """Mean cross-entropy (nats) and accuracy of every network on all of ``X``: fp64 ``(B,)`` arrays."""
        rows = max(1, min(len(X), EVAL_CHUNK_ELEMENTS // per_row))
        nets = max(1, EVAL_CHUNK_ELEMENTS // (per_row * rows))
        loss_sum = torch.zeros(n_nets, dtype=torch.float64, device=dev)
        correct = torch.zeros(n_nets, dtype=torch.float64, device=dev)
        with torch.no_grad():
            for lo in range(0, n_nets, nets):
                chunk = {k: v[lo : lo + nets] for k, v in p.items()}
                for r0 in range(0, len(X), rows):
                    logits = batched_logits(chunk, X[r0 : r0 + rows])
                    target = y[r0 : r0 + rows].expand(len(logits), -1)
                    logp = torch.log_softmax(logits, dim=2)
                    loss_sum[lo : lo + nets] -= logp.gather(2, target[..., None]).squeeze(2).double().sum(1)
                    correct[lo : lo + nets] += (logits.argmax(2) == target).sum(1).double()
        return (loss_sum / len(X)).cpu().numpy(), (correct / len(X)).cpu().numpy()

    def checkpoint(epoch: int) -> None:
        if on_checkpoint is None or epoch not in save:
            return
        train_loss, train_acc = evaluate_all(X_train, y_train)
        test_loss, test_acc = evaluate_all(X_test, y_test) if len(X_test) else (np.full(n_nets, np.nan),) * 2
        metrics = dict(train_loss=train_loss, test_loss=test_loss, train_acc=train_acc, test_acc=test_acc)
        on_checkpoint(epoch, {k: v.detach().cpu().numpy().copy() for k, v in p.items()}, metrics)

    checkpoint(0)
    for epoch in range(1, epochs + 1):
        idx = torch.as_tensor(np.stack([o.permutation(n) for o in orders]), device=dev)
        for lo in range(0, n, batch_size):
            rows = idx[:, lo : lo + batch_size]
            loss = batched_loss(p, X_train[rows], y_train[rows]).sum()  # d(sum)/d(p_i) = network i's own gradient
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        checkpoint(epoch)
        if on_epoch is not None:
            on_epoch(epoch)
    return {k: v.detach().cpu().numpy() for k, v in p.items()}


def sweep(
    out_dir: str | Path,
    *,
    widths: Sequence[int] = (10, 30, 100),
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 50,
    checkpoints: int | None = None,
    dataset: str | Path = "digits",
    arch: str = "mlp",
    depth: int = 2,
    heads: int = 2,
    patch: int = 4,
    optimizer: str = "sgd",
    init: str = "glorot-uniform",
    init_std: float = 0.05,
    mask: str | None = None,
    lr: float | None = None,
    batch_size: int = 128,
    group_edges: Sequence[float] | None = None,
    dtype: str = "float32",
    device=None,
    overwrite: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Train one network per (width, seed), one batched model per width (``train_zoo``; ``train_batched`` for the
    two-hidden-layer MLP with SGD), and write the zoo.

    arch, depth, heads, patch: the network family (``archs.Arch``; ``width`` is hidden units, channels or the ViT's
    embedding size). optimizer (``sgd``/``adam``), lr (default ``DEFAULT_LR``), init (``archs.INIT_SCHEMES``),
    init_std (for ``normal``/``uniform``). Defaults are paper 001's setting; paper 000's is ``optimizer="adam",
    init="normal", batch_size=100``.

    Writes ``out_dir/{series}/s{seed}/e{epoch}.safetensors`` at the epochs of ``checkpoint_epochs(epochs,
    checkpoints)`` and then ``out_dir/manifest.csv`` (``MANIFEST_COLUMNS``: ``path`` relative to ``out_dir``,
    ``step`` = epoch, ``init`` = model_id of the network's epoch-0 checkpoint, losses in nats and accuracies in
    [0, 1] on the full train/test sets; ``final_acc`` = the network's test accuracy at the last epoch (train
    accuracy without a test set) and ``acc_group`` its paper-000 group among the networks of its series,
    ``embed.accuracy_groups(final_acc, edges=group_edges)``: tertiles by default, else low < edges[0] <= mid <
    edges[1] <= high; every checkpoint row of a network carries them). ``mask`` is a letter stamped on the initial
    hidden-to-hidden weights of an MLP (paper 001 Figure 1). Returns the manifest.
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
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if lr <= 0 or batch_size < 1:
        raise ValueError(f"need lr > 0 and batch_size >= 1, got lr={lr}, batch_size={batch_size}")
    if mask and (arch != "mlp" or depth < 2):
        raise ValueError("mask applies to the fc2 weights of an MLP with depth >= 2")
    accuracy_groups([0.0, 1.0], edges=group_edges)  # validates the edges before any training
    archs = [Arch(arch, w, depth, heads, patch) for w in widths]
    _torch_dtype(dtype)
    device = resolve_device(device)
    data = load_dataset(dataset)
    kind = str(dataset).partition(":")[0]
    tag = (Path(str(dataset)).stem if str(dataset).endswith(".npz")
           else data.name if kind in IMAGE_DATASETS else str(dataset))
    save_epochs = checkpoint_epochs(epochs, checkpoints)
    pad = len(str(epochs))
    frames: list[pd.DataFrame] = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * len(widths), unit="epoch", desc="sweep")

    for spec in archs:
        series = spec.series + (f"-mask{mask}" if mask else "")
        module = spec.build(data.n_features, data.n_classes, data.image_shape)
        inits = [init_params(module, s, init, init_std) for s in seeds]
        if mask:
            bitmap = letter_mask(mask, spec.width, spec.width)
            for p in inits:
                p["fc2.weight"] = np.where(bitmap, p["fc2.weight"], 0.0)
        stacked = {k: np.stack([p[k] for p in inits]) for k in inits[0]}
        rows: list[dict] = []

        def write(epoch: int, weights: dict[str, np.ndarray], metrics: dict[str, np.ndarray]) -> None:
            for i, seed in enumerate(seeds):
                rel = Path(series) / f"s{seed}" / f"e{epoch:0{pad}d}.safetensors"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                tensors = {k: np.ascontiguousarray(v[i]) for k, v in weights.items()}
                meta = {"format": "pt", "arch": spec.kind, "width": str(spec.width), "depth": str(spec.depth),
                        "seed": str(seed), "epoch": str(epoch), "dataset": tag, "mask": mask or ""}
                save_file(tensors, str(out / rel), metadata=meta)
                model_id = f"{tag}-{series}-s{seed}-e{epoch:0{pad}d}"
                rows.append(dict(
                    path=rel.as_posix(), model_id=model_id, width=spec.width, seed=seed, step=epoch,
                    init=f"{tag}-{series}-s{seed}-e{0:0{pad}d}", dataset=tag, series=series, mask=mask or "",
                    arch=spec.kind, depth=spec.depth, optimizer=optimizer, init_scheme=init,
                    **{name: float(values[i]) for name, values in metrics.items()},
                ))

        if bar is not None:
            bar.set_description(series)
        common = dict(lr=lr, batch_size=batch_size, dtype=dtype, device=device, save_epochs=save_epochs,
                      on_checkpoint=write, on_epoch=(lambda _: bar.update()) if bar else None)
        if spec.kind == "mlp" and spec.depth == 2 and optimizer == "sgd":
            train_batched(stacked, data, seeds, epochs=epochs, **common)  # same numbers as train_zoo, faster on CPU
        else:
            train_zoo(spec, stacked, data, seeds, epochs=epochs, optimizer=optimizer, **common)
        frames.append(_with_groups(pd.DataFrame(rows), epochs, group_edges))
    if bar is not None:
        bar.close()
    manifest = pd.concat(frames, ignore_index=True)[MANIFEST_COLUMNS]
    manifest = manifest.sort_values(["width", "seed", "step"], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(manifest_path, index=False)
    return manifest


def _with_groups(rows: pd.DataFrame, last_epoch: int, edges: Sequence[float] | None) -> pd.DataFrame:
    """``rows`` (one series) with ``final_acc`` and ``acc_group`` of each seed's network on every checkpoint row."""
    final = rows[rows["step"] == last_epoch].set_index("seed")
    acc = final["test_acc"].where(final["test_acc"].notna(), final["train_acc"])
    group = pd.Series(accuracy_groups(acc.to_numpy(), edges=edges), index=acc.index)
    return rows.assign(final_acc=rows["seed"].map(acc), acc_group=rows["seed"].map(group))
