"""Embeddings of a zoo in weight space (paper 000): PCA / t-SNE maps of layer weights or per-layer statistics.

``layer_vectors`` and ``stat_vectors`` build one row per model; ``embed`` maps the rows to 2-D; ``accuracy_groups``
labels models low / mid / high by quantiles of an accuracy column.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from zooscope.pipelines.drift import as_checkpoint

#: Inputs wider than this are reduced by PCA before t-SNE.
TSNE_PCA_DIMS = 50
#: Up to this many models t-SNE uses the exact gradient (faster than Barnes-Hut there, and exact).
TSNE_EXACT_MAX = 300


def embed(vectors: np.ndarray, method: str = "pca", n_components: int = 2, seed: int = 0,
          perplexity: float = 30.0) -> np.ndarray:
    """Map ``vectors`` ``(n_models, d)`` to ``(n_models, n_components)`` with scikit-learn.

    ``"pca"``: ``PCA`` (components beyond ``min(n, d)`` are zero). ``"tsne"``: ``TSNE`` with PCA initialisation,
    ``perplexity`` clipped to ``n − 1``, the exact gradient up to ``TSNE_EXACT_MAX`` models (Barnes-Hut beyond),
    after a PCA to ``TSNE_PCA_DIMS`` dimensions when ``d`` is larger.
    Deterministic for a given ``seed``.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = np.asarray(vectors, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"embed needs a (n_models, d) array, got shape {X.shape}")
    n, d = X.shape
    if n < 2:
        raise ValueError(f"embed needs at least 2 models, got {n}")
    if not np.isfinite(X).all():
        raise ValueError("embed: vectors contain NaN or infinite values")
    if method == "pca":
        k = min(n_components, n, d)
        out = np.zeros((n, n_components))
        out[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(X)
        return out
    if method == "tsne":
        if n < 3:
            raise ValueError(f"t-SNE needs at least 3 models, got {n}")
        if d > TSNE_PCA_DIMS:
            X = PCA(n_components=min(TSNE_PCA_DIMS, n), random_state=seed).fit_transform(X)
        tsne = TSNE(n_components=n_components, perplexity=min(perplexity, n - 1.0), init="pca",
                    method="exact" if n <= TSNE_EXACT_MAX else "barnes_hut", random_state=seed)
        return tsne.fit_transform(X)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def layer_vectors(sources: Sequence[Any], layer_name: str) -> np.ndarray:
    """Flattened weights of one layer across models: ``(n_models, d)`` float64.

    Each source is the layer's tensor itself (an array) or a checkpoint (path, in-memory source or open
    ``Checkpoint``) from which the tensor ``layer_name`` (or ``layer_name + ".weight"``) is read. All tensors must
    have the same shape.
    """
    rows, shape = [], None
    for i, src in enumerate(sources):
        if isinstance(src, np.ndarray):
            w = src
        else:
            with as_checkpoint(src) as ckpt:
                keys = set(ckpt.keys())
                key = next((k for k in (layer_name, layer_name + ".weight") if k in keys), None)
                if key is None:
                    raise KeyError(f"{getattr(ckpt, 'path', src)}: no tensor {layer_name!r} "
                                   f"or {layer_name + '.weight'!r}")
                w = ckpt.read(key)
        if shape is None:
            shape = w.shape
        elif w.shape != shape:
            raise ValueError(f"layer {layer_name!r} of model {i} has shape {w.shape}, model 0 has {shape}")
        rows.append(np.asarray(w, dtype=np.float64).ravel())
    if not rows:
        raise ValueError("layer_vectors needs at least one model")
    return np.stack(rows)


def stat_vectors(layers_df: pd.DataFrame, columns: Sequence[str], *, model_col: str = "model_id",
                 layer_col: str = "name", standardize: bool = True) -> pd.DataFrame:
    """Per-model vectors of per-layer statistics: index ``model_col``, one column per ``(statistic, layer)``.

    Layers are ordered by ``layer_id`` when present. Features missing or NaN for some model are dropped; with
    ``standardize`` each remaining feature is z-scored across models (constant features are only centred), so that
    statistics in different units weigh alike.
    """
    missing = {model_col, layer_col, *columns} - set(layers_df.columns)
    if missing:
        raise ValueError(f"stat_vectors: layers table lacks column(s) {sorted(missing)}")
    df = layers_df
    order = (df.groupby(layer_col, sort=False)["layer_id"].min().sort_values().index
             if "layer_id" in df.columns else pd.unique(df[layer_col]))
    wide = df.pivot_table(index=model_col, columns=layer_col, values=list(columns), aggfunc="mean", dropna=False)
    wide = wide.reindex(columns=pd.MultiIndex.from_product([list(columns), list(order)]))
    wide = wide.dropna(axis=1, how="any")
    if standardize and len(wide):
        std = wide.std(ddof=0).replace(0.0, 1.0)
        wide = (wide - wide.mean()) / std
    return wide


def accuracy_groups(values: Sequence[float], labels: Sequence[str] = ("low", "mid", "high"), *,
                    edges: Sequence[float] | None = None) -> np.ndarray:
    """Label each model by the group of ``values`` (higher value → later label), as paper 000.

    Without ``edges`` the groups are quantile groups: with three labels, tertiles (edges at the 1/3 and 2/3
    quantiles, ``np.quantile``, linear), right-closed as ``pandas.qcut``. With ``edges`` (``len(labels) - 1``
    increasing values in the units of ``values``, e.g. accuracies) a value ``v`` gets label ``i`` when
    ``edges[i-1] <= v < edges[i]``. Pass accuracy (or minus an error). NaN values get ``None``. Object array.
    """
    v = np.asarray(values, dtype=np.float64)
    k = len(labels)
    if edges is not None:
        edges = np.asarray(edges, dtype=np.float64)
        if edges.shape != (k - 1,) or not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
            raise ValueError(f"accuracy group edges must be {k - 1} increasing finite numbers, got {edges.tolist()}")
    out = np.full(v.shape, None, dtype=object)
    ok = np.isfinite(v)
    if not ok.any():
        return out
    if edges is None:
        idx = np.searchsorted(np.quantile(v[ok], np.linspace(0, 1, k + 1)[1:-1]), v[ok], side="left")
    else:
        idx = np.searchsorted(edges, v[ok], side="right")
    out[ok] = np.asarray(labels, dtype=object)[idx]
    return out
