"""Classification datasets that need no download: scikit-learn's bundled sets, ``mnist1d`` when installed, a user
``.npz``, or MNIST / Fashion-MNIST / CIFAR-10 from local files in their published formats (``mnist:PATH``,
``fashion-mnist:PATH``, ``cifar10:PATH``; PATH a directory or a ``.tar``/``.tar.gz``/``.tgz`` archive holding them).
Used by ``pipelines.sweep`` to train zoos."""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test")
#: IDX files of MNIST and Fashion-MNIST (each may also be gzipped, ``NAME.gz``): (split, images, labels).
IDX_FILES = (("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             ("test", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
#: CIFAR-10 python batches (inside ``cifar-10-batches-py/`` in the published archive).
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
#: ``KIND:PATH`` prefixes for local image datasets.
IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10")
#: Globals a CIFAR pickle may name: numpy array reconstruction, and ``_codecs.encode`` (how protocol-2 pickles
#: written by Python 3 spell bytes).
_PICKLE_GLOBALS = frozenset({
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
})


@dataclass(frozen=True)
class Dataset:
    """A train/test split: ``X_*`` are ``(n, d)`` float64 features, ``y_*`` are ``(n,)`` int64 labels in
    ``0 .. n_classes-1``. ``image_shape`` is ``(channels, height, width)`` with ``d = C*H*W`` for image data
    (rows are images flattened in C-order), None for plain feature vectors."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, int, int] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(np.concatenate([self.y_train, self.y_test]).max() + 1)


def available_datasets() -> list[str]:
    """Names ``load_dataset`` accepts on this machine (besides a ``.npz`` path)."""
    names = list(SKLEARN_DATASETS)
    if importlib.util.find_spec("mnist1d") is not None:
        names.append("mnist1d")
    return names


def load_dataset(name: str | Path, *, test_size: float = 0.2, split_seed: int = 0) -> Dataset:
    """Load ``name``: one of ``available_datasets()``, a path to an ``.npz`` with X_train, y_train, X_test, y_test,
    or ``mnist:PATH`` / ``fashion-mnist:PATH`` / ``cifar10:PATH`` (local files, see the module docstring).

    scikit-learn sets get a fixed stratified split (``test_size``, ``split_seed``) and features standardised
    with the training set's mean and standard deviation; ``digits`` keeps its ``(1, 8, 8)`` image shape.
    ``mnist1d`` uses its own generated split (as is). A ``.npz`` is used as given (no scaling; an image shape is
    kept when ``X_*`` are ``(n, H, W)`` or ``(n, C, H, W)``). MNIST-like and CIFAR-10 pixels are scaled to [0, 1].
    """
    text = str(name)
    kind, sep, path = text.partition(":")
    if sep and kind in IMAGE_DATASETS:
        return _load_cifar10(Path(path)) if kind == "cifar10" else _load_idx(kind, Path(path))
    if text.endswith(".npz"):
        return _load_npz(Path(text))
    if text in SKLEARN_DATASETS:
        return _load_sklearn(text, test_size=test_size, split_seed=split_seed)
    if text == "mnist1d":
        return _load_mnist1d()
    raise ValueError(f"unknown dataset {text!r}: use one of {available_datasets()}, a path to a .npz file, or "
                     f"{', '.join(k + ':PATH' for k in IMAGE_DATASETS)}")


def _load_sklearn(name: str, *, test_size: float, split_seed: int) -> Dataset:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=split_seed, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    shape = (1, 8, 8) if name == "digits" else None
    return _checked(name, scaler.transform(X_train), y_train, scaler.transform(X_test), y_test, shape)


def _load_mnist1d() -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ValueError("dataset 'mnist1d' needs the mnist1d package (pip install mnist1d)") from exc
    data = make_dataset(get_dataset_args())
    return _checked("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"])


def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    with np.load(path) as npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing} (needs {list(NPZ_KEYS)}, has {npz.files})")
        arrays = [npz[k] for k in NPZ_KEYS]
    dims = arrays[0].shape[1:]
    shape = (1, *dims) if len(dims) == 2 else tuple(dims) if len(dims) == 3 else None
    return _checked(str(path), *arrays, shape)


class _Files:
    """Named files of a directory or a tar archive, looked up by base name (the archive's folders ignored)."""

    def __init__(self, path: Path, what: str, expected: list[str]):
        self.path, self.expected = path, expected
        if path.is_dir():
            self._members = {p.name: p for p in path.iterdir() if p.is_file()}
            self._tar = None
        elif path.is_file() and tarfile.is_tarfile(path):
            self._tar = tarfile.open(path)
            self._members = {Path(m.name).name: m for m in self._tar.getmembers() if m.isfile()}
        else:
            raise ValueError(f"{what} dataset: {path} is not a directory or a .tar/.tar.gz archive "
                             f"(expected the files {', '.join(expected)})")

    def has(self, name: str) -> bool:
        return name in self._members

    def read(self, name: str) -> bytes:
        if self._tar is None:
            return self._members[name].read_bytes()
        return self._tar.extractfile(self._members[name]).read()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _load_idx(kind: str, path: Path) -> Dataset:
    expected = [f for _, images, labels in IDX_FILES for f in (images, labels)]
    files = _Files(path, kind, [f"{f}[.gz]" for f in expected])
    try:
        arrays = {}
        for name in expected:
            found = next((n for n in (name, name + ".gz") if files.has(n)), None)
            if found is None:
                raise ValueError(f"{kind} dataset: {path} has no {name} (or {name}.gz); expected the IDX files "
                                 f"{', '.join(expected)}, each optionally gzipped")
            raw = files.read(found)
            arrays[name] = _parse_idx(gzip.decompress(raw) if found.endswith(".gz") else raw, f"{path}/{found}")
    finally:
        files.close()
    (_, tr_x, tr_y), (_, te_x, te_y) = IDX_FILES
    X_train, y_train, X_test, y_test = (arrays[k] for k in (tr_x, tr_y, te_x, te_y))
    for x_name, y_name in ((tr_x, tr_y), (te_x, te_y)):
        if arrays[x_name].ndim != 3 or arrays[y_name].ndim != 1 or len(arrays[x_name]) != len(arrays[y_name]):
            raise ValueError(f"{kind} dataset {path}: {x_name} must hold (n, H, W) images and {y_name} n labels, "
                             f"got shapes {arrays[x_name].shape} and {arrays[y_name].shape}")
    if X_train.shape[1:] != X_test.shape[1:]:
        raise ValueError(f"{kind} dataset {path}: train images are {X_train.shape[1:]}, test images {X_test.shape[1:]}")
    shape = (1, *X_train.shape[1:])
    return _checked(f"{kind}", X_train / 255.0, y_train.astype(np.int64), X_test / 255.0,
                    y_test.astype(np.int64), shape)


#: IDX element types by type code (big-endian on disk).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    """An IDX file: magic ``00 00 TYPE NDIM``, NDIM big-endian uint32 sizes, then the data (C-order)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{where}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{where}: IDX header truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    count = int(np.prod(dims))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{where}: IDX header says {dims} x {dtype.itemsize} bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype, count, header).reshape(dims)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _load_cifar10(path: Path) -> Dataset:
    expected = [*CIFAR_TRAIN, CIFAR_TEST]
    files = _Files(path, "cifar10", expected)
    try:
        missing = [n for n in expected if not files.has(n)]
        if missing:
            raise ValueError(f"cifar10 dataset: {path} lacks {', '.join(missing)}; expected the python batches "
                             f"{', '.join(expected)} (cifar-10-python.tar.gz or its cifar-10-batches-py folder)")
        parts = {n: _cifar_batch(files.read(n), f"{path}/{n}") for n in expected}
    finally:
        files.close()
    X_train = np.concatenate([parts[n][0] for n in CIFAR_TRAIN])
    y_train = np.concatenate([parts[n][1] for n in CIFAR_TRAIN])
    X_test, y_test = parts[CIFAR_TEST]
    return _checked("cifar10", X_train / 255.0, y_train, X_test / 255.0, y_test, (3, 32, 32))


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 3072) uint8, labels (n,) int64)`` of one pickled batch (a dict with ``data``, ``labels``)."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{where}: CIFAR-10 batch lacks 'data' or 'labels' (has {sorted(map(str, batch))})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{where}: 'data' must be (n, 3072) with n labels, got {data.shape} and {labels.shape}")
    return data, labels


def _checked(name: str, X_train, y_train, X_test, y_test, image_shape=None) -> Dataset:
    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    X_train = X_train.reshape(len(X_train), -1)
    X_test = X_test.reshape(len(X_test), -1)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"{name}: X_train has {X_train.shape[1]} features but X_test has {X_test.shape[1]}")
    for split, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"{name}: y_{split} must be 1-D with one label per row of X_{split}")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise ValueError(f"{name}: y_{split} must hold integer class labels 0..C-1")
        if not np.isfinite(X).all():
            raise ValueError(f"{name}: X_{split} has non-finite values")
    if len(X_train) == 0:
        raise ValueError(f"{name}: empty training set")
    if image_shape is not None and int(np.prod(image_shape)) != X_train.shape[1]:
        raise ValueError(f"{name}: image shape {image_shape} does not match {X_train.shape[1]} features")
    return Dataset(name, X_train, y_train.astype(np.int64), X_test, y_test.astype(np.int64),
                   None if image_shape is None else tuple(int(v) for v in image_shape))
