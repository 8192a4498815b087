"""pipelines.embed: PCA/t-SNE maps, layer and statistic vectors, accuracy groups."""
import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from zooscope.pipelines import embed as E


def _groups(seed=0, per=15, d=200):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, (3, d))
    X = np.concatenate([c + rng.normal(0, 0.5, (per, d)) for c in centers])
    return X, np.repeat([0, 1, 2], per)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embed_separates_clusters_and_is_deterministic(method):
    X, y = _groups()
    Z = E.embed(X, method=method, seed=3)
    assert Z.shape == (45, 2)
    assert silhouette_score(Z, y) > 0.5
    np.testing.assert_array_equal(Z, E.embed(X, method=method, seed=3))


def test_pca_matches_sklearn_and_small_inputs():
    X, _ = _groups(d=5)
    np.testing.assert_allclose(E.embed(X, "pca"), PCA(2, random_state=0).fit_transform(X), rtol=1e-10)
    Z = E.embed(X[:4, :1], "pca")  # one dimension only: the second component is zero
    assert Z.shape == (4, 2) and np.all(Z[:, 1] == 0)
    assert E.embed(X[:5], "tsne").shape == (5, 2)  # perplexity clipped to n - 1
    with pytest.raises(ValueError):
        E.embed(X, "umap")
    with pytest.raises(ValueError):
        E.embed(X[:1], "pca")


def test_layer_vectors_from_arrays_and_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    ws = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
    paths = []
    for i, w in enumerate(ws):
        save_file({"fc.weight": w, "fc.bias": np.zeros(4, np.float32)}, str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
    expect = np.stack([w.astype(np.float64).ravel() for w in ws])
    np.testing.assert_array_equal(E.layer_vectors(ws, "fc"), expect)
    np.testing.assert_array_equal(E.layer_vectors(paths, "fc"), expect)
    np.testing.assert_array_equal(E.layer_vectors(paths, "fc.weight"), expect)
    with pytest.raises(ValueError, match="shape"):
        E.layer_vectors([ws[0], ws[1][:2]], "fc")
    with pytest.raises(KeyError):
        E.layer_vectors(paths, "conv")


def test_stat_vectors():
    layers = pd.DataFrame({"model_id": ["a", "a", "b", "b", "c"], "name": ["l2", "l1", "l2", "l1", "l1"],
                           "layer_id": [1, 0, 1, 0, 0], "w_std": [1.0, 2.0, 3.0, 4.0, 6.0],
                           "alpha": [5.0, 6.0, 7.0, 8.0, 9.0]})
    raw = E.stat_vectors(layers, ["w_std", "alpha"], standardize=False)
    # l2 is missing for model c, so only the l1 features remain, in (statistic, layer) order
    assert list(raw.columns) == [("w_std", "l1"), ("alpha", "l1")]
    np.testing.assert_array_equal(raw.loc[["a", "b", "c"]].to_numpy(), [[2, 6], [4, 8], [6, 9]])
    z = E.stat_vectors(layers, ["w_std", "alpha"])
    np.testing.assert_allclose(z.mean().to_numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(ddof=0).to_numpy(), 1, rtol=1e-12)
    full = E.stat_vectors(layers[layers.model_id != "c"], ["w_std"], standardize=False)
    assert list(full.columns) == [("w_std", "l1"), ("w_std", "l2")]  # ordered by layer_id


def test_accuracy_groups_are_tertiles():
    v = np.random.default_rng(2).uniform(size=99)
    g = E.accuracy_groups(v)
    ref = pd.qcut(v, 3, labels=["low", "mid", "high"]).astype(object)
    np.testing.assert_array_equal(g, np.asarray(ref))
    assert [np.sum(g == k) for k in ("low", "mid", "high")] == [33, 33, 33]
    assert v[g == "high"].min() > v[g == "mid"].max() > v[g == "low"].max()
    g2 = E.accuracy_groups([0.1, np.nan, 0.9, 0.5], labels=("bad", "good"))
    assert list(g2) == ["bad", None, "good", "bad"]
