"""Model summaries: ``ww`` mode against weightwatcher's own ``get_summary``; robust filters against pandas."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from zooscope.pipelines.summary import SUMMARY_METRICS, model_summary, summarize_models


def esds(n_layers=6, seed=0):
    rng = np.random.default_rng(seed)
    return [np.sort(rng.pareto(1.5 + 0.3 * i, 120) * 0.3 + 0.05) for i in range(n_layers)]


def zoo_layers(evs, failed=(2,), error=(), alphas=None, types=None) -> pd.DataFrame:
    """A zooscope layer table (failed fits: status 'failed' and NaN alpha-dependent columns)."""
    alphas = alphas if alphas is not None else [2.5 + 0.7 * i for i in range(len(evs))]
    rows = []
    for i, ev in enumerate(evs):
        status = "error" if i in error else "failed" if i in failed else "ok"
        a = np.nan if status != "ok" else alphas[i]
        rows.append({
            "layer_id": 10 + i, "name": f"l{i}", "layer_type": (types or ["dense"] * len(evs))[i],
            "N": 40 + i, "M": 30, "rf": 1 if i % 2 else 9, "status": status, "alpha": a,
            "log_norm": np.log10(ev.sum()), "log_spectral_norm": np.log10(ev.max()),
            "alpha_weighted": a * np.log10(ev.max()), "log_alpha_norm": np.log10(np.sum(ev**a)),
            "stable_rank": ev.sum() / ev.max(), "mp_softrank": 0.1 * i,
        })
    return pd.DataFrame(rows)


def ww_details(evs, layers) -> pd.DataFrame:
    """The same layers as WeightWatcher 0.7 writes them (apply_norm_metrics with alpha = -1 on failure)."""
    rows = []
    for ev, (_, r) in zip(evs, layers.iterrows()):
        if r["status"] == "error":
            continue  # WeightWatcher has no row for a layer it could not analyse
        a = -1.0 if r["status"] == "failed" else r["alpha"]
        rows.append({"log_norm": np.log10(np.sum(ev)), "alpha": a, "alpha_weighted": a * np.log10(np.max(ev)),
                     "log_alpha_norm": np.log10(np.sum([e**a for e in ev])),
                     "log_spectral_norm": np.log10(np.max(ev)), "stable_rank": np.sum(ev) / np.max(ev),
                     "mp_softrank": r["mp_softrank"]})
    return pd.DataFrame(rows)


def test_ww_mode_matches_weightwatcher_get_summary():
    ww = pytest.importorskip("weightwatcher")
    evs = esds()
    layers = zoo_layers(evs, failed=(2, 4), error=(5,))
    expected = ww.WeightWatcher().get_summary(ww_details(evs, layers))
    got = model_summary(layers, "ww", esd=lambda row: evs[row.name])
    assert set(expected) == set(SUMMARY_METRICS)
    for metric, value in expected.items():
        np.testing.assert_allclose(got[metric], value, rtol=1e-12, err_msg=metric)
    assert got["n_layers"] == 5 and got["n_used"] == 5
    # the failed fits really count: alpha's mean includes two -1 values
    assert got["alpha"] < layers["alpha"].mean()


def test_ww_mode_without_esd_skips_failed_log_alpha_norm():
    evs = esds()
    layers = zoo_layers(evs, failed=(1,))
    got = model_summary(layers, "ww")
    ok = layers[layers.status == "ok"]
    np.testing.assert_allclose(got["log_alpha_norm"], ok["log_alpha_norm"].mean(), rtol=1e-12)
    np.testing.assert_allclose(got["alpha"], (ok["alpha"].sum() - 1) / len(layers), rtol=1e-12)


def test_robust_mode_filters_like_pandas():
    evs = esds(8)
    alphas = [2.5, 9.5, 3.0, 4.0, 8.0, 12.0, 3.3, 5.1]
    types = ["embedding", "dense", "dense", "conv2d", "dense", "dense", "dense", "dense"]
    layers = zoo_layers(evs, failed=(3,), error=(6,), alphas=alphas, types=types)
    keep = (layers.status == "ok") & (layers.alpha <= 8.0) & (layers.layer_type != "embedding")
    got = model_summary(layers, "robust")
    for metric in SUMMARY_METRICS:
        np.testing.assert_allclose(got[metric], layers.loc[keep, metric].mean(), rtol=1e-12, err_msg=metric)
    assert got["n_used"] == int(keep.sum()) == 3 and got["n_layers"] == 7
    edge = model_summary(layers, "robust", drop_first_last=True, drop_types=())
    keep_fl = (layers.status == "ok") & (layers.alpha <= 8.0) & ~layers.layer_id.isin([10, 17])
    np.testing.assert_allclose(edge["alpha"], layers.loc[keep_fl, "alpha"].mean(), rtol=1e-12)


def test_summarize_models_one_row_per_model():
    evs_a, evs_b = esds(4, seed=1), esds(3, seed=2)
    a, b = zoo_layers(evs_a, failed=()), zoo_layers(evs_b, failed=(0,), error=(2,))
    layers = pd.concat([a.assign(model_row=0), b.assign(model_row=1)], ignore_index=True)
    out = summarize_models(layers, "robust")
    assert list(out["model_row"]) == [0, 1]
    assert "robust_alpha" in out and "alpha" not in out
    np.testing.assert_allclose(out["robust_alpha"], [a.alpha.mean(), b.alpha.iloc[1]], rtol=1e-12)
    assert list(out["n_layers"]) == [4, 2]
    expected_params = [int((a.N * a.M * a.rf).sum()), int((b.N * b.M * b.rf).iloc[:2].sum())]
    assert list(out["n_params"]) == expected_params
    with pytest.raises(ValueError, match="unknown summary mode"):
        model_summary(a, "median")
    with pytest.raises(ValueError, match="model key column"):
        summarize_models(a)
