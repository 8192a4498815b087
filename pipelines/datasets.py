"""Small classification datasets that need no download: scikit-learn's bundled sets, ``mnist1d`` when
installed, or a user ``.npz``. Used by ``pipelines.sweep`` to train zoos."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """A train/test split: ``X_*`` are ``(n, d)`` float64 features, ``y_*`` are ``(n,)`` int64 labels in
    ``0 .. n_classes-1``."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

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
    """Load ``name``: one of ``available_datasets()`` or a path to an ``.npz`` with X_train, y_train, X_test, y_test.

    scikit-learn sets get a fixed stratified split (``test_size``, ``split_seed``) and features standardised
    with the training set's mean and standard deviation. ``mnist1d`` uses its own generated split (as is).
    A ``.npz`` is used as given (no scaling).
    """
    text = str(name)
    if text.endswith(".npz"):
        return _load_npz(Path(text))
    if text in SKLEARN_DATASETS:
        return _load_sklearn(text, test_size=test_size, split_seed=split_seed)
    if text == "mnist1d":
        return _load_mnist1d()
    raise ValueError(f"unknown dataset {text!r}: use one of {available_datasets()} or a path to a .npz file")


def _load_sklearn(name: str, *, test_size: float, split_seed: int) -> Dataset:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=split_seed, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    return _checked(name, scaler.transform(X_train), y_train, scaler.transform(X_test), y_test)


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
    return _checked(str(path), *arrays)


def _checked(name: str, X_train, y_train, X_test, y_test) -> Dataset:
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
    return Dataset(name, X_train, y_train.astype(np.int64), X_test, y_test.astype(np.int64))
