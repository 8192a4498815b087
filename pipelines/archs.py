"""Small architectures of the training sweeps (papers 000/001) and their seeded initialisation.

``Arch`` describes one network family (``mlp``, ``cnn`` or ``vit`` with its depth and width knobs) and builds it as a
``torch.nn.Module`` of ``pipelines.nets`` (imported on first build, so this module loads without torch).

``init_params`` draws a network's initial weights from ``numpy.random.default_rng([seed, 0])`` in fp64, one
parameter after the other in ``named_parameters`` order: weight matrices and kernels by ``scheme`` (fans as
PyTorch's: ``fan_in = in * kernel area``, ``fan_out = out * kernel area``), biases zero, LayerNorm scales one, the
ViT's position embedding ``N(0, 0.02)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    def build(self, n_features: int, n_classes: int, image_shape: tuple[int, int, int] | None = None, *,
              batched: bool = True):
        """The ``torch.nn.Module`` (float32, CPU) for inputs of ``n_features`` (images of ``image_shape``).

        ``batched=False``: the CNN convolves with ``conv2d`` instead of im2col + matmul (same function, same
        parameters), the faster form for one network trained on its own."""
        from zooscope.pipelines import nets

        if self.kind == "mlp":
            return nets.MLP(n_features, self.width, self.depth, n_classes)
        if image_shape is None or int(np.prod(image_shape)) != n_features:
            raise ValueError(f"arch {self.kind!r} needs image data (channels, height, width); this dataset has plain "
                             f"{n_features}-feature rows (use an image dataset: digits, mnist:PATH, cifar10:PATH, "
                             "or a .npz with (n, H, W) arrays)")
        if self.kind == "cnn":
            return nets.CNN(image_shape, self.width, self.depth, n_classes, im2col=batched)
        c, h, w = image_shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"vit patch {self.patch} must divide the image size {h}x{w}")
        return nets.ViT(image_shape, self.width, self.depth, self.heads, self.patch, n_classes)


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
