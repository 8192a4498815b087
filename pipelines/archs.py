"""Small architectures of the training sweeps (papers 000/001) and their seeded initialisation.

``Arch`` describes one network family (``mlp``, ``cnn`` or ``vit`` with its depth and width knobs) and builds it as a
``torch.nn.Module`` whose forward takes rows of flattened inputs ``(m, d)``. Every module is written with operations
that ``torch.func.vmap`` batches over a leading network axis (``Linear``, ``Conv2d``, ``max_pool2d``,
``layer_norm``, attention as plain ``matmul`` + ``softmax``), so a zoo trains as one batched model.

``init_params`` draws a network's initial weights from ``numpy.random.default_rng([seed, 0])`` in fp64, one
parameter after the other in ``named_parameters`` order: weight matrices and kernels by ``scheme`` (fans as
PyTorch's: ``fan_in = in * kernel area``, ``fan_out = out * kernel area``), biases zero, LayerNorm scales one, the
ViT's position embedding ``N(0, 0.02)``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ARCHS = ("mlp", "cnn", "vit")
INIT_SCHEMES = ("glorot-uniform", "glorot-normal", "he-uniform", "he-normal", "normal", "uniform")
#: Standard deviation of the ViT position embedding at initialisation.
POS_STD = 0.02


@dataclass(frozen=True)
class Arch:
    """One network family.

    kind: ``mlp`` (``depth`` hidden ReLU layers ``fc1..fcD`` of ``width`` units, then ``out``), ``cnn`` (``depth``
    3x3 same-padded convolutions ``conv1..convD`` of ``width`` channels, each followed by ReLU and a 2x2 max-pool while
    the image is at least 2x2, then ``out`` on the flattened maps), or ``vit`` (``patch`` x ``patch`` patches embedded
    to ``width`` by ``embed`` plus a learned ``pos`` embedding, ``depth`` pre-norm blocks of ``heads``-head
    self-attention and a ReLU MLP of ``2 * width``, mean pooling, a final LayerNorm and ``out``).
    """

    kind: str = "mlp"
    width: int = 100
    depth: int = 2
    heads: int = 2
    patch: int = 4

    def __post_init__(self):
        if self.kind not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.kind!r}")
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={self.width}, depth={self.depth}")
        if self.kind == "vit" and (self.heads < 1 or self.width % self.heads or self.patch < 1):
            raise ValueError(f"vit needs heads >= 1 dividing width and patch >= 1, got width={self.width}, "
                             f"heads={self.heads}, patch={self.patch}")

    @property
    def series(self) -> str:
        """Series name: ``mlp-w{width}`` (depth 2, paper 001's), ``mlp-d{depth}-w{width}``, ``cnn-d{depth}-w{width}``,
        ``vit-d{depth}-w{width}-h{heads}``."""
        if self.kind == "mlp":
            return f"mlp-w{self.width}" if self.depth == 2 else f"mlp-d{self.depth}-w{self.width}"
        tail = f"-h{self.heads}" if self.kind == "vit" else ""
        return f"{self.kind}-d{self.depth}-w{self.width}{tail}"

    def build(self, n_features: int, n_classes: int, image_shape: tuple[int, int, int] | None = None):
        """The ``torch.nn.Module`` (float32, CPU) for inputs of ``n_features`` (images of ``image_shape``)."""
        if self.kind == "mlp":
            return _MLP(n_features, self.width, self.depth, n_classes)
        if image_shape is None or int(np.prod(image_shape)) != n_features:
            raise ValueError(f"arch {self.kind!r} needs image data (channels, height, width); this dataset has plain "
                             f"{n_features}-feature rows (use an image dataset: digits, mnist:PATH, cifar10:PATH, "
                             "or a .npz with (n, H, W) arrays)")
        if self.kind == "cnn":
            return _CNN(image_shape, self.width, self.depth, n_classes)
        c, h, w = image_shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"vit patch {self.patch} must divide the image size {h}x{w}")
        return _ViT(image_shape, self.width, self.depth, self.heads, self.patch, n_classes)


class _MLP(nn.Module):
    def __init__(self, n_in: int, width: int, depth: int, n_out: int):
        super().__init__()
        sizes = [n_in] + [width] * depth
        for i in range(depth):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.out = nn.Linear(sizes[-1], n_out)
        self.depth = depth

    def forward(self, x):
        for i in range(self.depth):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return self.out(x)


class _CNN(nn.Module):
    def __init__(self, shape, width: int, depth: int, n_out: int):
        super().__init__()
        c, h, w = shape
        self.shape, self.depth, self.pools = tuple(shape), depth, []
        for i in range(depth):
            self.add_module(f"conv{i + 1}", nn.Conv2d(c if i == 0 else width, width, 3, padding=1))
            pool = h >= 2 and w >= 2
            self.pools.append(pool)
            h, w = (h // 2, w // 2) if pool else (h, w)
        self.out = nn.Linear(width * h * w, n_out)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.shape)
        for i in range(self.depth):
            conv = getattr(self, f"conv{i + 1}")
            m, c, h, w = x.shape
            # im2col by 9 shifted slices + one matmul: the same 3x3 same-padded convolution as conv(x), written with
            # ops that vmap batches over networks as one bmm (vmap runs conv2d/unfold/max_pool2d far slower on CPU)
            xp = F.pad(x, (1, 1, 1, 1))
            cols = torch.stack([xp[:, :, a : a + h, b : b + w] for a in range(3) for b in range(3)], dim=2)
            x = torch.matmul(conv.weight.flatten(1), cols.reshape(m, c * 9, h * w)) + conv.bias[:, None]
            x = F.relu(x).reshape(m, -1, h, w)
            if self.pools[i]:
                x = F.max_pool2d(x, 2)
        return self.out(x.flatten(1))


class _Block(nn.Module):
    """Pre-norm transformer block; attention as plain matmuls (vmap-able)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):  # x (m, tokens, dim)
        m, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(m, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj(torch.matmul(att, v).transpose(1, 2).reshape(m, t, d))
        return x + self.fc2(F.relu(self.fc1(self.norm2(x))))


class _ViT(nn.Module):
    def __init__(self, shape, dim: int, depth: int, heads: int, patch: int, n_out: int):
        super().__init__()
        c, h, w = shape
        self.shape, self.patch = tuple(shape), patch
        self.embed = nn.Linear(c * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros((h // patch) * (w // patch), dim))
        self.blocks = nn.Sequential(OrderedDict((str(i), _Block(dim, heads)) for i in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_out)

    def forward(self, x):
        c, h, w = self.shape
        p = self.patch
        x = x.reshape(x.shape[0], c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(x.reshape(x.shape[0], (h // p) * (w // p), c * p * p)) + self.pos
        return self.out(self.norm(self.blocks(x).mean(1)))


def init_params(module, seed: int, scheme: str = "glorot-uniform", std: float = 0.05) -> dict[str, np.ndarray]:
    """Initial fp64 parameters of ``module`` for network ``seed`` (see the module docstring).

    scheme: ``glorot-uniform`` ``U(±sqrt(6 / (fan_in + fan_out)))``, ``glorot-normal`` ``N(0, 2 / (fan_in +
    fan_out))``, ``he-uniform`` ``U(±sqrt(6 / fan_in))``, ``he-normal`` ``N(0, 2 / fan_in)``, ``normal``
    ``N(0, std²)`` (paper 000; Keras' default std 0.05), ``uniform`` ``U(±std)``.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if std <= 0:
        raise ValueError(f"init std must be > 0, got {std}")
    rng = np.random.default_rng([seed, 0])
    out: dict[str, np.ndarray] = {}
    for name, p in module.named_parameters():
        shape = tuple(p.shape)
        if name == "pos":
            out[name] = rng.normal(0.0, POS_STD, size=shape)
        elif len(shape) == 1:
            is_scale = name.endswith(".weight")  # LayerNorm scale
            out[name] = np.ones(shape) if is_scale else np.zeros(shape)
        else:
            area = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[1] * area, shape[0] * area
            if scheme == "glorot-uniform":
                a = np.sqrt(6.0 / (fan_in + fan_out))
                out[name] = rng.uniform(-a, a, size=shape)
            elif scheme == "glorot-normal":
                out[name] = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=shape)
            elif scheme == "he-uniform":
                a = np.sqrt(6.0 / fan_in)
                out[name] = rng.uniform(-a, a, size=shape)
            elif scheme == "he-normal":
                out[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
            elif scheme == "normal":
                out[name] = rng.normal(0.0, std, size=shape)
            else:
                out[name] = rng.uniform(-std, std, size=shape)
    return out
