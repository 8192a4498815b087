"""Meta-regression: OLS, R², MSE and rank correlations against statsmodels/scipy; grouping, validation, files, CLI."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats

from zooscope.cli import main
from zooscope.pipelines.regress import (
    GROUP_COLUMNS, SUMMARY_COLUMNS, fit_one, load_metrics_csv, load_outputs, regress, write_outputs,
)


def zoo(sizes=(6, 5, 3), seed=0) -> pd.DataFrame:
    """One row per model: groups of the given sizes, two metrics linearly related to the error plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for g, size in enumerate(sizes):
        for k in range(size):
            alpha = rng.uniform(2, 5)
            rows.append({"model": f"s{g}m{k}", "dataset": "imagenet", "series": f"s{g}",
                         "top1_error": 10 + 4 * alpha + rng.normal(0, 1.0), "alpha": alpha,
                         "log_norm": rng.normal(2, 0.5)})
    return pd.DataFrame(rows)


def test_ols_matches_statsmodels_and_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.7 - 1.3 * x + rng.normal(0, 0.8, size=40)
    got = fit_one(x, y, n_boot=0)
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    lr = stats.linregress(x, y)
    assert got["status"] == "ok" and got["n"] == 40
    np.testing.assert_allclose([got["intercept"], got["slope"]], ols.params, rtol=1e-10)
    np.testing.assert_allclose([got["intercept"], got["slope"]], [lr.intercept, lr.slope], rtol=1e-12)
    np.testing.assert_allclose(got["r2"], ols.rsquared, rtol=1e-10)
    np.testing.assert_allclose(got["mse"], ols.ssr / 40, rtol=1e-10)  # MSE = SSR/n, not SSR/(n-2)
    np.testing.assert_allclose(got["rmse"], np.sqrt(ols.ssr / 40), rtol=1e-10)


def test_rank_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=30), 1)  # ties on purpose
    y = x**3 + rng.normal(0, 0.5, size=30)
    got = fit_one(x, y, n_boot=0)
    np.testing.assert_allclose(got["kendall_tau"], stats.kendalltau(x, y).statistic, rtol=1e-12)
    np.testing.assert_allclose(got["spearman_rho"], stats.spearmanr(x, y).statistic, rtol=1e-12)


def test_bootstrap_interval_contains_r2_and_is_reproducible():
    models = zoo(sizes=(12, 9))
    a = regress(models, "top1_error", by=("series",), metrics=["alpha", "log_norm"], n_boot=400, seed=7)
    b = regress(models, "top1_error", by=("series",), metrics=["alpha", "log_norm"], n_boot=400, seed=7)
    c = regress(models, "top1_error", by=("series",), metrics=["alpha", "log_norm"], n_boot=400, seed=8)
    g = a.groups
    assert (g["status"] == "ok").all()
    assert ((g["r2_ci_low"] <= g["r2"]) & (g["r2"] <= g["r2_ci_high"])).all()
    assert ((g["r2_ci_low"] >= 0) & (g["r2_ci_high"] <= 1)).all()
    pd.testing.assert_frame_equal(a.groups, b.groups)
    assert not np.allclose(a.groups["r2_ci_low"], c.groups["r2_ci_low"])
    # one group's interval does not depend on which other metrics are fitted
    only = regress(models, "top1_error", by=("series",), metrics=["alpha"], n_boot=400, seed=7).groups
    np.testing.assert_allclose(only["r2_ci_low"], g[g.metric == "alpha"]["r2_ci_low"], rtol=0)


def test_groups_below_minimum_are_dropped_and_counted():
    res = regress(zoo(sizes=(6, 4, 3)), "top1_error", metrics=["alpha", "log_norm"], min_models=4, n_boot=0)
    assert sorted(res.groups["series"].unique()) == ["s0", "s1"]
    assert res.small_groups == {"alpha": 1, "log_norm": 1}
    assert any("fewer than 4 models" in m for m in res.messages)
    assert list(res.groups.columns) == ["dataset", "series", *GROUP_COLUMNS]
    with pytest.raises(ValueError, match="min_models"):
        regress(zoo(), "top1_error", metrics=["alpha"], min_models=2)


def test_per_group_fits_and_summary_match_statsmodels_and_pandas():
    models = zoo(sizes=(7, 6, 5, 8))
    res = regress(models, "top1_error", by=("series",), metrics=["alpha", "log_norm"], n_boot=0)
    for _, row in res.groups.iterrows():
        sub = models[models.series == row["series"]]
        ols = sm.OLS(sub["top1_error"].to_numpy(), sm.add_constant(sub[row["metric"]].to_numpy())).fit()
        np.testing.assert_allclose([row["r2"], row["mse"]], [ols.rsquared, ols.ssr / len(sub)], rtol=1e-10)
    expected = res.groups.groupby("metric", sort=False).agg(
        n_groups=("r2", "size"), r2_mean=("r2", "mean"), r2_std=("r2", "std"),
        mse_mean=("mse", "mean"), mse_std=("mse", "std"))  # pandas std is ddof=1
    got = res.summary.set_index("metric")
    assert list(res.summary.columns) == list(SUMMARY_COLUMNS)
    np.testing.assert_allclose(got.loc[expected.index, expected.columns].to_numpy(float),
                               expected.to_numpy(float), rtol=1e-12)
    np.testing.assert_allclose(got.loc["alpha", "r2_std"], np.std(res.groups.query("metric == 'alpha'").r2, ddof=1))


def test_csv_with_missing_values_drops_and_counts(tmp_path):
    models = zoo(sizes=(8,))
    models.loc[1, "top1_error"] = np.nan
    models.loc[[2, 3], "alpha"] = np.nan
    path = tmp_path / "m.csv"
    models.to_csv(path, index=False)
    res = regress(load_metrics_csv(path), "top1_error", metrics=["alpha", "log_norm"], n_boot=0)
    assert res.dropped == {"alpha": 3, "log_norm": 1}
    assert res.groups.set_index("metric")["n"].to_dict() == {"alpha": 5, "log_norm": 7}
    assert any("alpha: dropped 3 row(s) with a missing value" in m for m in res.messages)


def test_csv_with_non_numeric_metric_names_the_column(tmp_path):
    models = zoo(sizes=(6,))
    models["alpha"] = models["alpha"].astype(object)
    models.loc[4, "alpha"] = "n/a?"
    path = tmp_path / "m.csv"
    models.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"metric column 'alpha' is not numeric.*'n/a\?' in row 4"):
        regress(load_metrics_csv(path), "top1_error", metrics=["alpha"])


def test_constant_x_group_is_a_not_fittable_row():
    models = zoo(sizes=(6, 6))
    models.loc[models.series == "s1", "alpha"] = 3.0
    res = regress(models, "top1_error", by=("series",), metrics=["alpha"], n_boot=50)
    row = res.groups.set_index("series").loc["s1"]
    assert row["status"] == "not fittable: constant x" and row["n"] == 6 and np.isnan(row["r2"])
    assert res.groups.set_index("series").loc["s0", "status"] == "ok"
    assert res.summary.set_index("metric").loc["alpha", "n_groups"] == 1
    assert any("not fittable: constant x" in m for m in res.messages)


def test_input_validation_messages(tmp_path):
    models = zoo()
    with pytest.raises(ValueError, match="y column 'acc' not in the table"):
        regress(models, "acc", metrics=["alpha"])
    with pytest.raises(ValueError, match=r"grouping column\(s\) \['arch'\]"):
        regress(models, "top1_error", by=("arch",), metrics=["alpha"])
    with pytest.raises(ValueError, match=r"metric column\(s\) \['nope'\]"):
        regress(models, "top1_error", metrics=["nope"])
    (tmp_path / "x.csv").write_text("name,alpha\na,1\n")
    with pytest.raises(ValueError, match="needs a 'model' column"):
        load_metrics_csv(tmp_path / "x.csv")


def test_exclude_removes_models():
    models = zoo(sizes=(8,))
    res = regress(models, "top1_error", metrics=["alpha"], exclude=["s0m0", "s0m1", "ghost"], n_boot=0)
    assert res.excluded == 2 and res.groups["n"].iloc[0] == 6
    assert any("ghost" in m for m in res.messages)


def test_write_outputs_and_read_back(tmp_path):
    res = regress(zoo(sizes=(6, 5)), "top1_error", metrics=["alpha", "log_norm"], n_boot=100)
    write_outputs(res, tmp_path)
    groups = pd.read_csv(tmp_path / "groups.csv")
    assert list(groups.columns) == ["dataset", "series", *GROUP_COLUMNS]
    assert list(pd.read_csv(tmp_path / "summary.csv").columns) == list(SUMMARY_COLUMNS)
    assert (tmp_path / "groups.md").read_text().startswith("| dataset")
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(f"imagenet__{s}__{m}.png" for s in ("s0", "s1") for m in ("alpha", "log_norm"))
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    back = load_outputs(tmp_path)
    np.testing.assert_allclose(back.groups["r2"], res.groups["r2"], rtol=1e-12)
    assert back.by == res.by and back.metrics == res.metrics


def test_cli_regress_csv(tmp_path, capsys):
    models = zoo(sizes=(6, 5))
    models.to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "ex.txt").write_text("# outliers\ns0m0\n")
    rc = main(["regress", str(tmp_path / "m.csv"), "--y", "top1_error", "--by", "series", "--metrics",
               "alpha,log_norm", "--exclude-file", str(tmp_path / "ex.txt"), "--n-boot", "50",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    groups = pd.read_csv(tmp_path / "out" / "groups.csv")
    assert groups.set_index(["series", "metric"]).loc[("s0", "alpha"), "n"] == 5
    bad = models.assign(alpha=models["alpha"].astype(object))
    bad.loc[0, "alpha"] = "oops"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    rc = main(["regress", str(tmp_path / "bad.csv"), "--y", "top1_error", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "metric column 'alpha' is not numeric" in capsys.readouterr().err
    rc = main(["regress", str(tmp_path / "missing.csv"), "--y", "e", "--out", str(tmp_path / "o3")])
    assert rc == 2 and "no such store directory or CSV file" in capsys.readouterr().err
    rc = main(["regress", str(tmp_path / "m.csv"), "--y", "top1_error", "--min-models", "9",
               "--out", str(tmp_path / "o4")])
    assert rc == 2 and "no group has at least 9 models" in capsys.readouterr().err


def test_infinite_values_are_dropped_like_missing_ones():
    models = zoo(sizes=(12,))
    models.loc[models.index[:2], "top1_error"] = [np.inf, -np.inf]
    models.loc[models.index[5], "alpha"] = np.nan
    res = regress(models, "top1_error", by=(), metrics=["alpha"], n_boot=0)
    assert res.dropped == {"alpha": 3}
    keep = np.isfinite(models["top1_error"]) & models["alpha"].notna()
    lr = stats.linregress(models.loc[keep, "alpha"], models.loc[keep, "top1_error"])
    row = res.groups.iloc[0]
    assert row["status"] == "ok" and row["n"] == 9
    np.testing.assert_allclose([row["slope"], row["intercept"]], [lr.slope, lr.intercept], rtol=1e-12)


def test_fit_one_empty_and_mismatched_inputs():
    assert fit_one(np.zeros(0), np.zeros(0), n_boot=0)["status"] == "not fittable: 0 points"
    with pytest.raises(ValueError, match="same length"):
        fit_one(np.arange(5.0), np.arange(4.0), n_boot=0)
