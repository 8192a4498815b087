"""Write a zoo of synthetic checkpoints with real architectures' shapes and heavy-tailed weights.

Each model is a ``.safetensors`` file whose tensor names and shapes are those of the real network (torchvision
ResNet-18/50, Hugging Face GPT-2 small / XL, a 784-512-256-10 MLP). Weight matrices have Student-t entries
(model-level degrees of freedom ``tail_df`` in [2.3, 4.5], jittered per layer) with log-normal row scales, scaled
by ``1/sqrt(fan_in)`` like trained nets; norms, biases and embeddings get their usual magnitudes. Files are written
one tensor at a time (GPT-2 XL needs only one tensor in memory), in the model's order. A ``manifest.csv`` lists
``path, model_id, series, seed, tail_df, dtype`` for ``zooscope scan --manifest``.

    python bench/make_zoo.py --arch resnet18 --n-models 4 --out /tmp/zoo --dtype fp16 --check

``--check`` reads every tensor back with ``zooscope.pipelines.readers`` and with ``safetensors.safe_open``,
asserts they agree, and records the read times of both in ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ARCHS = ("resnet18", "resnet50", "gpt2-small", "gpt2-xl", "mlp", "small-cnn")
DTYPES = {"fp32": ("F32", "<f4"), "fp16": ("F16", "<f2"), "bf16": ("BF16", "<u2")}


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"{prefix}.{p}", (c,), f"bn_{p}") for p in ("weight", "bias", "running_mean", "running_var")]


def _resnet(blocks: list[int], bottleneck: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """torchvision ResNet tensor names and shapes (``num_batches_tracked`` left out)."""
    spec = [("conv1.weight", (64, 3, 7, 7), "conv"), *_bn("bn1", 64)]
    inplanes, expansion = 64, (4 if bottleneck else 1)
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            if bottleneck:
                spec += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1), "conv"), *_bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", (planes, planes, 3, 3), "conv"), *_bn(f"{p}.bn2", planes),
                         (f"{p}.conv3.weight", (planes * 4, planes, 1, 1), "conv"), *_bn(f"{p}.bn3", planes * 4)]
            else:
                spec += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3), "conv"), *_bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", (planes, planes, 3, 3), "conv"), *_bn(f"{p}.bn2", planes)]
            if b == 0 and (li > 1 or bottleneck):
                spec += [(f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1), "conv"),
                         *_bn(f"{p}.downsample.1", planes * expansion)]
            inplanes = planes * expansion
    return spec + [("fc.weight", (1000, inplanes), "linear"), ("fc.bias", (1000,), "bias")]


def _gpt2(d: int, n_layer: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Hugging Face GPT-2 (``GPT2Model``) names; Conv1D weights are (in, out)."""
    spec = [("wte.weight", (50257, d), "embedding"), ("wpe.weight", (1024, d), "embedding")]
    for i in range(n_layer):
        h = f"h.{i}"
        spec += [(f"{h}.ln_1.weight", (d,), "ln_weight"), (f"{h}.ln_1.bias", (d,), "bias"),
                 (f"{h}.attn.c_attn.weight", (d, 3 * d), "conv1d"), (f"{h}.attn.c_attn.bias", (3 * d,), "bias"),
                 (f"{h}.attn.c_proj.weight", (d, d), "conv1d"), (f"{h}.attn.c_proj.bias", (d,), "bias"),
                 (f"{h}.ln_2.weight", (d,), "ln_weight"), (f"{h}.ln_2.bias", (d,), "bias"),
                 (f"{h}.mlp.c_fc.weight", (d, 4 * d), "conv1d"), (f"{h}.mlp.c_fc.bias", (4 * d,), "bias"),
                 (f"{h}.mlp.c_proj.weight", (4 * d, d), "conv1d"), (f"{h}.mlp.c_proj.bias", (d,), "bias")]
    return spec + [("ln_f.weight", (d,), "ln_weight"), ("ln_f.bias", (d,), "bias")]


def arch_spec(arch: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(key, shape, kind)`` of every tensor of ``arch``, in model order."""
    if arch == "resnet18":
        return _resnet([2, 2, 2, 2], bottleneck=False)
    if arch == "resnet50":
        return _resnet([3, 4, 6, 3], bottleneck=True)
    if arch == "gpt2-small":
        return _gpt2(768, 12)
    if arch == "gpt2-xl":
        return _gpt2(1600, 48)
    if arch == "mlp":
        return [("fc1.weight", (512, 784), "linear"), ("fc1.bias", (512,), "bias"),
                ("fc2.weight", (256, 512), "linear"), ("fc2.bias", (256,), "bias"),
                ("fc3.weight", (10, 256), "linear"), ("fc3.bias", (10,), "bias")]
    if arch == "small-cnn":  # a Model-Zoos-style CNN: conv 1->16->16->16 3x3 + dense 16->10, 4,970 parameters
        convs = [(f"conv{i}", (16, c, 3, 3)) for i, c in enumerate((1, 16, 16), start=1)]
        return [t for name, shape in convs for t in ((f"{name}.weight", shape, "conv"),
                                                      (f"{name}.bias", shape[:1], "bias"))] + \
            [("fc.weight", (10, 16), "linear"), ("fc.bias", (10,), "bias")]
    raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")


def model_tail_df(seed: int) -> float:
    """The model-level Student-t degrees of freedom (smaller = heavier tails), in [2.3, 4.5]."""
    return float(np.random.default_rng([seed, 0]).uniform(2.3, 4.5))


def _heavy(rng: np.random.Generator, shape: tuple[int, ...], df: float, out_axis: int, fan_in: int) -> np.ndarray:
    """Student-t(df) entries with unit variance, log-normal scale per output unit, times 1/sqrt(fan_in)."""
    w = rng.standard_t(df, size=shape) / math.sqrt(df / (df - 2))
    rows = rng.lognormal(0.0, 0.3, size=shape[out_axis])
    w *= np.expand_dims(rows, tuple(a for a in range(len(shape)) if a != out_axis))
    return (w * math.sqrt(2.0 / fan_in)).astype(np.float32)


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], kind: str, df: float) -> np.ndarray:
    if kind == "conv":
        return _heavy(rng, shape, df, 0, math.prod(shape[1:]))
    if kind == "linear":
        return _heavy(rng, shape, df, 0, shape[1])
    if kind == "conv1d":  # HF Conv1D: (in, out)
        return _heavy(rng, shape, df, 1, shape[0])
    if kind == "embedding":
        return _heavy(rng, shape, df, 0, 200)  # std ~0.1, like trained GPT-2 token embeddings
    normal = rng.standard_normal(shape).astype(np.float32)
    if kind in ("bn_weight", "ln_weight"):
        return 1.0 + 0.1 * normal
    if kind == "bn_running_var":
        return np.abs(1.0 + 0.2 * normal)
    return 0.02 * normal  # biases, running means


def _cast(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as the analysis sees them, stored bytes as an array) for ``dtype``."""
    if dtype == "fp32":
        return a, a
    if dtype == "fp16":
        h = a.astype(np.float16)
        return h, h
    import torch

    bits = torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32), bits


def iter_model(arch: str, seed: int, dtype: str = "fp16") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, values, stored)`` one tensor at a time; values are float32 (bf16-rounded) or float16."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    df0 = model_tail_df(seed)
    rng = np.random.default_rng([seed, 1])
    for key, shape, kind in arch_spec(arch):
        df = max(2.2, df0 * rng.uniform(0.8, 1.25))
        yield (key, *_cast(_tensor(rng, shape, kind, df), dtype))


def make_model(arch: str, seed: int, dtype: str = "fp16") -> dict[str, np.ndarray]:
    """All tensors of one synthetic model (fp16 as float16; bf16 as float32 holding bf16-rounded values)."""
    return {key: values for key, values, _ in iter_model(arch, seed, dtype)}


def write_model(path: Path, arch: str, seed: int, dtype: str = "fp16") -> Path:
    """Stream one model into a safetensors file (header first, then each tensor as it is generated)."""
    code, storage = DTYPES[dtype]
    header, offset = {}, 0
    for key, shape, _ in arch_spec(arch):
        n = math.prod(shape) * np.dtype(storage).itemsize
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "arch": arch, "seed": str(seed), "synthetic": "zooscope make_zoo"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for _, _, stored in iter_model(arch, seed, dtype):
            fh.write(np.ascontiguousarray(stored, dtype=storage).tobytes())
    return path


def write_zoo(arch: str, n_models: int, out: str | Path, dtype: str = "fp16", seed: int = 0) -> list[Path]:
    """Write ``n_models`` models ``{arch}-{i:03d}.safetensors`` (seeds ``seed + i``) and ``manifest.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(out / "manifest.csv", "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["path", "model_id", "series", "seed", "tail_df", "dtype"])
        for i in range(n_models):
            model_id = f"{arch}-{i:0{max(3, len(str(n_models - 1)))}d}"
            path = write_model(out / f"{model_id}.safetensors", arch, seed + i, dtype)
            rows.writerow([path.name, model_id, arch, seed + i, f"{model_tail_df(seed + i):.4f}", dtype])
            paths.append(path)
    return paths


def check_zoo(paths: list[Path], arch: str, dtype: str) -> str:
    """Read every tensor with zooscope's reader and with ``safetensors.safe_open``; assert equal; time both."""
    from safetensors import safe_open

    from zooscope.pipelines.layers import plan_layers
    from zooscope.pipelines.readers import open_checkpoint

    t_ours = t_ref = 0.0
    n_tensors = n_bytes = n_layers = 0
    for path in paths:
        t0 = time.perf_counter()
        with open_checkpoint(path) as ckpt:
            ours = {k: ckpt.read(k) for k in ckpt.keys()}
            n_layers += sum(i.skip_reason is None for i in plan_layers(ckpt))
            n_bytes += sum(ckpt.nbytes(k) for k in ckpt.keys())
        t1 = time.perf_counter()
        with safe_open(path, framework="pt") as ref:
            theirs = {k: ref.get_tensor(k).float().numpy() for k in ref.keys()}
        t2 = time.perf_counter()
        t_ours, t_ref = t_ours + t1 - t0, t_ref + t2 - t1
        assert ours.keys() == theirs.keys() and [k for k, _, _ in arch_spec(arch)] == list(ours)
        for k, a in ours.items():
            np.testing.assert_array_equal(a.astype(np.float32), theirs[k], err_msg=f"{path}: {k}")
        n_tensors += len(ours)
        del ours, theirs
    return (
        "| arch | dtype | models | tensors | analysed layers | MB | zooscope read s | safe_open(pt)+float s "
        "| safe_open / zooscope |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {arch} | {dtype} | {len(paths)} | {n_tensors} | {n_layers} | {n_bytes / 1e6:.1f} | {t_ours:.3f} "
        f"| {t_ref:.3f} | {t_ref / t_ours:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python bench/make_zoo.py "
                                 "--arch gpt2-small --n-models 3 --out /tmp/zoo --dtype bf16 --check")
    ap.add_argument("--arch", choices=ARCHS, required=True)
    ap.add_argument("--n-models", type=int, default=4)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first model (model i uses seed + i)")
    ap.add_argument("--check", action="store_true", help="read the zoo back, verify, and record read times")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = write_zoo(args.arch, args.n_models, args.out, args.dtype, args.seed)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} {args.arch} models ({size / 1e6:.1f} MB, {args.dtype}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    if args.check:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import record

        record(f"Reading a synthetic {args.arch} zoo: zooscope readers vs safetensors.safe_open",
               check_zoo(paths, args.arch, args.dtype),
               "same files, same process, page cache warm for both (files just written); every tensor compared "
               "equal; ratio > 1 means zooscope's reader is faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
