"""MNIST / Fashion-MNIST (IDX) and CIFAR-10 (python pickle batches) read from small generated files in the published
formats: directories, gzipped IDX files, .tar.gz archives; clear errors for missing files and unsafe pickles."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from zooscope.pipelines.datasets import CIFAR_TEST, CIFAR_TRAIN, load_dataset


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX as published (yann.lecun.com/exdb/mnist): 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 sizes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, rng, n_train=30, n_test=12, gz=False, size=(28, 28)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, a in arrays.items():
        raw = idx_bytes(a)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


def test_mnist_idx_directory_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    for kind, gz in (("mnist", False), ("fashion-mnist", True)):
        arrays = write_mnist(tmp_path / kind, rng, gz=gz)
        d = load_dataset(f"{kind}:{tmp_path / kind}")
        assert d.name == kind and d.image_shape == (1, 28, 28) and d.n_features == 784
        np.testing.assert_array_equal(d.X_train, arrays["train-images-idx3-ubyte"].reshape(30, 784) / 255.0)
        np.testing.assert_array_equal(d.y_train, arrays["train-labels-idx1-ubyte"])
        np.testing.assert_array_equal(d.X_test, arrays["t10k-images-idx3-ubyte"].reshape(12, 784) / 255.0)
        np.testing.assert_array_equal(d.y_test, arrays["t10k-labels-idx1-ubyte"])
        assert 0.0 <= d.X_train.min() and d.X_train.max() <= 1.0


def test_mnist_from_tar_gz_archive(tmp_path):
    arrays = write_mnist(tmp_path / "src", np.random.default_rng(1), gz=True, size=(8, 8))
    archive = tmp_path / "mnist.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in os.listdir(tmp_path / "src"):
            tar.add(tmp_path / "src" / name, arcname=f"mnist/raw/{name}")
    d = load_dataset(f"mnist:{archive}")
    assert d.image_shape == (1, 8, 8)
    np.testing.assert_array_equal(d.X_test, arrays["t10k-images-idx3-ubyte"].reshape(12, 64) / 255.0)


def test_mnist_errors_name_the_files(tmp_path):
    write_mnist(tmp_path / "m", np.random.default_rng(2))
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)"):
        load_dataset(f"mnist:{tmp_path / 'm'}")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(b"\x08\x03\x00\x00garbage")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: not an IDX file"):
        load_dataset(f"mnist:{tmp_path / 'm'}")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))  # 11 labels, 12 images
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte must hold"):
        load_dataset(f"mnist:{tmp_path / 'm'}")
    with pytest.raises(ValueError, match="not a directory or a .tar"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


def cifar_batch(rng, n):
    """A CIFAR-10 python batch as published: dict of bytes keys, uint8 (n, 3072) data, list labels."""
    return {b"batch_label": b"generated", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"x.png"] * n}


def test_cifar10_batches_directory_and_archive(tmp_path):
    rng = np.random.default_rng(3)
    batches = {name: cifar_batch(rng, 4) for name in (*CIFAR_TRAIN, CIFAR_TEST)}
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    for source in (folder, archive):
        d = load_dataset(f"cifar10:{source}")
        assert d.image_shape == (3, 32, 32) and d.n_features == 3072 and len(d.X_train) == 20
        np.testing.assert_array_equal(d.X_train, np.concatenate([batches[n][b"data"] for n in CIFAR_TRAIN]) / 255.0)
        np.testing.assert_array_equal(d.y_test, batches[CIFAR_TEST][b"labels"])


def test_cifar10_refuses_unsafe_pickles_and_names_missing_batches(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "c"
    folder.mkdir()
    for name in CIFAR_TRAIN[:3]:
        (folder / name).write_bytes(pickle.dumps(cifar_batch(rng, 2)))
    with pytest.raises(ValueError, match="lacks data_batch_4, data_batch_5, test_batch"):
        load_dataset(f"cifar10:{folder}")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        (folder / name).write_bytes(pickle.dumps(cifar_batch(rng, 2)))
    (folder / CIFAR_TEST).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR-10 python batch \(global .*system is not allowed"):
        load_dataset(f"cifar10:{folder}")
    buf = io.BytesIO()
    pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, buf)
    (folder / CIFAR_TEST).write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"'data' must be \(n, 3072\)"):
        load_dataset(f"cifar10:{folder}")


def test_image_npz_keeps_its_shape_and_cnn_trains_on_generated_mnist(tmp_path):
    from zooscope.pipelines.sweep import sweep

    write_mnist(tmp_path / "m", np.random.default_rng(5), n_train=40, n_test=10, size=(8, 8))
    m = sweep(tmp_path / "zoo", widths=(3,), seeds=(0, 1, 2), epochs=1, arch="cnn", depth=1,
              dataset=f"mnist:{tmp_path / 'm'}", optimizer="adam", init="normal", device="cpu")
    assert set(m["dataset"]) == {"mnist"} and m["model_id"].str.startswith("mnist-cnn-d1-w3-").all()
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "img.npz", X_train=rng.normal(size=(6, 4, 4)), y_train=np.arange(6) % 2,
             X_test=rng.normal(size=(2, 4, 4)), y_test=np.array([0, 1]))
    assert load_dataset(tmp_path / "img.npz").image_shape == (1, 4, 4)
