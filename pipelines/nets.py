"""``torch.nn`` modules of the sweep architectures (built through ``archs.Arch.build``).

Each forward takes rows of flattened inputs ``(m, d)`` and uses only operations that ``torch.func.vmap`` batches
well over a leading network axis: ``linear``, matmuls, ``max_pool2d``, ``layer_norm``. The CNN's 3x3 convolutions
are im2col by nine shifted slices plus one matmul (under vmap ``conv2d`` becomes a grouped convolution and
``unfold`` a per-network loop, both far slower on CPU); attention is plain ``matmul`` + ``softmax``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
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


class CNN(nn.Module):
    """``im2col=False`` runs the same convolutions with ``conv2d`` (faster for one network outside vmap)."""

    def __init__(self, shape, width: int, depth: int, n_out: int, im2col: bool = True):
        super().__init__()
        c, h, w = shape
        self.shape, self.depth, self.pools, self.im2col = tuple(shape), depth, [], im2col
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
            x = F.relu(_conv3x3(x, conv.weight, conv.bias) if self.im2col else conv(x))
            if self.pools[i]:
                x = F.max_pool2d(x, 2)
        return self.out(x.flatten(1))


def _conv3x3(x, weight, bias):
    """3x3 same-padded convolution of ``x (m, c, h, w)`` as im2col by nine shifted slices plus one matmul: under vmap
    this is one batched matmul, where ``conv2d`` becomes a grouped convolution and ``unfold`` a per-network loop."""
    m, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    cols = torch.stack([xp[:, :, a : a + h, b : b + w] for a in range(3) for b in range(3)], dim=2)
    return (torch.matmul(weight.flatten(1), cols.reshape(m, c * 9, h * w)) + bias[:, None]).reshape(m, -1, h, w)


class Block(nn.Module):
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


class ViT(nn.Module):
    def __init__(self, shape, dim: int, depth: int, heads: int, patch: int, n_out: int):
        super().__init__()
        c, h, w = shape
        self.shape, self.patch = tuple(shape), patch
        self.embed = nn.Linear(c * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros((h // patch) * (w // patch), dim))
        self.blocks = nn.Sequential(OrderedDict((str(i), Block(dim, heads)) for i in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_out)

    def forward(self, x):
        c, h, w = self.shape
        p = self.patch
        x = x.reshape(x.shape[0], c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(x.reshape(x.shape[0], (h // p) * (w // p), c * p * p)) + self.pos
        return self.out(self.norm(self.blocks(x).mean(1)))
