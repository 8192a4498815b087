"""kernels.drift (paper 001 Eq. 3, Appendix B) and pipelines.drift against direct computations."""
import numpy as np
import pandas as pd
import pytest

from zooscope.kernels import drift
from zooscope.pipelines import drift as pdrift
from zooscope.pipelines.readers import open_checkpoint

A, A0, A1, S0, K = 0.1, 0.02, 1.3, 0.03, 0.5


def _synthetic(seed, n=200_000):
    """w_i ~ U(-A, A) (as Glorot-uniform); w_f | w_i ~ N(A0 + A1 w_i, S0² + K w_i²).

    So ⟨w_f⟩ = A0 + A1 w, ⟨w_f²⟩ = (A0² + S0²) + 2 A0 A1 w + (A1² + K) w², σ(0) = S0."""
    rng = np.random.default_rng(seed)
    wi = rng.uniform(-A, A, n)
    return wi, A0 + A1 * wi + np.sqrt(S0**2 + K * wi**2) * rng.standard_normal(n)


def test_rmsd_eq3():
    rng = np.random.default_rng(0)
    w0, wt = rng.normal(size=(30, 20)), rng.normal(size=(30, 20))
    assert drift.rmsd(w0, wt) == pytest.approx(np.sqrt(np.mean((wt - w0) ** 2)), rel=1e-13)
    assert drift.rmsd(w0, w0) == 0.0
    with pytest.raises(ValueError):
        drift.rmsd(w0, wt[:5])


@pytest.mark.parametrize("seed", [0, 1])
def test_cumsum_fits_recover_parameters(seed):
    # Tolerances are about 6 standard deviations of each estimate over seeds at n = 200k.
    wi, wf = _synthetic(seed)
    a0, a1 = drift.cumsum_linear_fit(wi, wf)
    assert a0 == pytest.approx(A0, abs=1.5e-3) and a1 == pytest.approx(A1, abs=0.02)
    b0, b1, b2 = drift.cumsum_second_moment_fit(wi, wf)
    assert b0 == pytest.approx(A0**2 + S0**2, abs=1e-4)
    assert b1 == pytest.approx(2 * A0 * A1, abs=5e-3)
    assert b2 == pytest.approx(A1**2 + K, abs=0.06)
    assert drift.sigma_at(wi, wf, 0.0) == pytest.approx(S0, rel=0.04)
    assert drift.sigma_at(wi, wf, 0.05) == pytest.approx(np.sqrt(S0**2 + K * 0.05**2), rel=0.04)


def test_cumsum_fit_is_the_appendix_recipe():
    """Against B.2 written out directly: scaled cumulative sum, quadratic fit by np.polyfit, derivative."""
    rng = np.random.default_rng(5)
    wi, wf = rng.uniform(-1, 1, 3000), rng.normal(size=3000)
    o = np.argsort(wi)
    F = (wi.max() - wi.min()) / wi.size * np.cumsum(wf[o])
    c2, c1, _ = np.polyfit(wi[o], F, 2)
    assert drift.cumsum_linear_fit(wi, wf) == pytest.approx((c1, 2 * c2), rel=1e-8, abs=1e-12)


def _ridge(c, seed, n=100_000):
    """Half the pairs on w_f = c·w_i + N(0, 0.002²), half a broad background N(0, 0.1²)."""
    rng = np.random.default_rng(seed)
    wi = rng.uniform(-0.1, 0.1, n)
    on = rng.random(n) < 0.5
    return wi, np.where(on, c * wi + 0.002 * rng.standard_normal(n), rng.normal(0, 0.1, n))


@pytest.mark.parametrize("c,seed", [(0.8, 0), (1.0, 1), (0.3, 2)])
def test_peak_slope_recovers_slope_within_resolution(c, seed):
    wi, wf = _ridge(c, seed)
    c_opt, res = drift.peak_slope(wi, wf)
    assert 0 < res < 0.01
    assert abs(c_opt - c) <= res


@pytest.mark.parametrize("c,seed", [(0.8, 4), (0.3, 5)])
def test_bandwidth_slope_found_on_a_subsample_is_the_full_grids(c, seed, monkeypatch):
    wi, wf = _ridge(c, seed, n=30_000)
    fast = drift._bandwidth(wi, wf, drift.C_GRID, np.random.default_rng(0))
    monkeypatch.setattr(drift, "SCALE_PAIRS", wi.size)  # quartiles of every slope on every pair
    full = drift._bandwidth(wi, wf, drift.C_GRID, np.random.default_rng(0))
    assert fast == pytest.approx(full, rel=1e-12)


def test_peak_slope_maximises_b6_directly():
    """B.6 by brute force: max over b of the count of residuals w_f − c·w_i in [b, b + δ], on a fine c grid."""
    wi, wf = _ridge(0.6, 3, n=40_000)
    c_opt, res = drift.peak_slope(wi, wf)
    cs = np.linspace(0.5, 0.7, 201)
    delta = 0.002
    best = []
    for c in cs:
        r = np.sort(wf - c * wi)
        best.append(np.max(np.searchsorted(r, r + delta, side="right") - np.arange(r.size)))
    c_ref = cs[int(np.argmax(best))]
    assert abs(c_opt - c_ref) <= 2 * res


def test_conditional_quantiles_and_joint_histogram():
    rng = np.random.default_rng(6)
    wi, wf = rng.uniform(-1, 1, 5000), rng.normal(size=5000)
    centers, Q = drift.conditional_quantiles(wi, wf, bins=10)
    edges = np.linspace(wi.min(), wi.max(), 11)
    for k in (0, 4, 9):
        sel = (wi >= edges[k]) & ((wi < edges[k + 1]) if k < 9 else (wi <= edges[k + 1]))
        np.testing.assert_allclose(Q[k], np.quantile(wf[sel], (0.25, 0.5, 0.75)), rtol=1e-12)
    np.testing.assert_allclose(centers, 0.5 * (edges[1:] + edges[:-1]), rtol=1e-12)
    H, xe, ye = drift.joint_histogram(wi, wf, bins=12)
    H2, xe2, ye2 = np.histogram2d(wi, wf, bins=12)
    np.testing.assert_array_equal(H, H2)
    np.testing.assert_array_equal(xe, xe2)


def test_drift_stats_keys_and_values():
    wi, wf = _synthetic(7, n=50_000)
    d = drift.drift_stats(wi, wf)
    assert set(d) == {"rmsd", "a0", "a1", "b0", "b1", "b2", "sigma_at_0", "c_opt", "c_opt_resolution"}
    assert d["rmsd"] == pytest.approx(np.sqrt(np.mean((wf - wi) ** 2)), rel=1e-12)
    assert d["a1"] == pytest.approx(drift.cumsum_linear_fit(wi, wf)[1], rel=1e-12)


# ---- pipelines.drift -------------------------------------------------------------------------------------------

def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture
def two_checkpoints(tmp_path):
    rng = np.random.default_rng(8)
    init = {"fc1.weight": rng.uniform(-0.2, 0.2, (40, 30)).astype(np.float32),
            "fc1.bias": np.zeros(40, np.float32),
            "conv.weight": rng.uniform(-0.3, 0.3, (8, 4, 3, 3)).astype(np.float32),
            "fc2.weight": rng.uniform(-0.2, 0.2, (10, 40)).astype(np.float32)}
    final = {k: (v * 1.1 + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in init.items()}
    return _save(tmp_path / "init.safetensors", init), _save(tmp_path / "final.safetensors", final), init, final


def test_drift_table_matches_direct(two_checkpoints):
    p0, p1, init, final = two_checkpoints
    t = pdrift.drift_table(p0, p1, model_id="m@10", init_model_id="m@0", step=10)
    assert list(t.columns) == pdrift.DRIFT_COLUMNS
    with open_checkpoint(p1) as ck:
        keys = [k for k in ck.keys() if k != "fc1.bias"]  # ≥2-D tensors in checkpoint order
    assert list(t["layer"]) == [k.removesuffix(".weight") for k in keys] + ["all"]
    assert sorted(keys) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert (t["model_id"] == "m@10").all() and (t["init_model_id"] == "m@0").all() and (t["step"] == 10).all()
    for key, (_, row) in zip(keys, t.iloc[:3].iterrows()):
        w0, w1 = init[key].astype(np.float64).ravel(), final[key].astype(np.float64).ravel()
        assert row["n_weights"] == w0.size
        assert row["rmsd"] == pytest.approx(np.sqrt(np.mean((w1 - w0) ** 2)), rel=1e-12)
        ref = drift.drift_stats(w0, w1)
        for col in ("a0", "a1", "b0", "b1", "b2", "sigma_at_0", "c_opt"):
            np.testing.assert_allclose(row[col], ref[col], rtol=1e-10, atol=1e-14, equal_nan=True)
    all_i = np.concatenate([init[k].astype(np.float64).ravel() for k in keys])
    all_f = np.concatenate([final[k].astype(np.float64).ravel() for k in keys])
    whole = t.iloc[3]
    assert whole["n_weights"] == all_i.size
    assert whole["rmsd"] == pytest.approx(np.sqrt(np.mean((all_f - all_i) ** 2)), rel=1e-12)
    assert whole["a1"] == pytest.approx(drift.cumsum_linear_fit(all_i, all_f)[1], rel=1e-10)
    assert whole["a1"] == pytest.approx(1.1, abs=0.02)


def test_drift_table_subsamples_beyond_cap(two_checkpoints):
    p0, p1, init, final = two_checkpoints
    t = pdrift.drift_table(p0, p1, model_id="b", init_model_id="a", step=1, max_pairs=500, seed=3)
    full = pdrift.drift_table(p0, p1, model_id="b", init_model_id="a", step=1)
    np.testing.assert_allclose(t["rmsd"], full["rmsd"], rtol=1e-12)  # RMSD always uses every weight
    np.testing.assert_allclose(t["n_weights"], full["n_weights"])
    assert not np.array_equal(t["a1"], full["a1"])  # fc1 (1200 weights) and 'all' were subsampled ...
    assert t["a1"].to_numpy() == pytest.approx(full["a1"].to_numpy(), abs=0.15)  # ... to 500 pairs: noisier
    again = pdrift.drift_table(p0, p1, model_id="b", init_model_id="a", step=1, max_pairs=500, seed=3)
    pd.testing.assert_frame_equal(t, again)


def test_drift_table_rejects_mismatch(tmp_path, two_checkpoints):
    from zooscope.pipelines.readers import CheckpointError

    p0, _, init, _ = two_checkpoints
    bad = _save(tmp_path / "bad.safetensors", {**init, "fc2.weight": np.zeros((10, 41), np.float32)})
    with pytest.raises(CheckpointError, match="fc2.weight"):
        pdrift.drift_table(p0, bad, model_id="x", init_model_id="y", step=1)


def test_pair_checkpoints_by_id_and_path():
    m = pd.DataFrame({
        "path": ["w10/s0/e0.safetensors", "w10/s0/e5.safetensors", "w10/s0/e1.safetensors", "other.pt"],
        "model_id": ["a0", "a5", "a1", "solo"],
        "init": ["w10/s0/e0.safetensors", "a0", "./w10/s0/e0.safetensors", None],
        "epoch": [0, 5, 1, np.nan],
    })
    assert pdrift.pair_checkpoints(m) == [("a1", "a0", 1.0), ("a5", "a0", 5.0)]
    with pytest.raises(ValueError, match="neither a model_id nor a path"):
        pdrift.pair_checkpoints(m.assign(init=["a0", "zz", "a0", None]))
    with pytest.raises(ValueError, match="step"):
        pdrift.pair_checkpoints(m.drop(columns="epoch"))


def test_drift_from_manifest(two_checkpoints):
    p0, p1, _, _ = two_checkpoints
    m = pd.DataFrame({"path": [str(p0), str(p1)], "model_id": ["i", "f"], "init": ["i", "i"], "step": [0, 7]})
    t = pdrift.drift_from_manifest(m)
    assert set(t["model_id"]) == {"f"} and (t["step"] == 7).all() and len(t) == 4


def test_time_to_loss():
    s = pd.DataFrame({"init_model_id": ["a"] * 3 + ["b"] * 3, "width": [10] * 3 + [100] * 3,
                      "step": [1, 2, 4] * 2, "train_loss": [1.0, 0.4, 0.1, 0.5, 0.2, 0.05],
                      "rmsd": [0.1, 0.2, 0.3, 0.01, 0.02, 0.03]})
    t = pdrift.time_to_loss(s, 0.3).set_index("init_model_id")
    assert t.loc["a", "t_theta"] == 4 and t.loc["a", "rmsd_theta"] == 0.3
    assert t.loc["b", "t_theta"] == 2 and t.loc["b", "rmsd_theta"] == 0.02 and t.loc["b", "width"] == 100
    assert np.isnan(pdrift.time_to_loss(s, 0.01)["t_theta"]).all()


def test_report_sections_only_with_data():
    from zooscope.pipelines import report_training as rt

    rng = np.random.default_rng(9)
    models, rows = [], []
    for width in (10, 100):
        models.append({"model_id": f"w{width}e0", "width": width, "step": 0, "train_loss": 2.3})
        for step in (1, 10):
            loss = 2.3 / (1 + step * width / 10)
            models.append({"model_id": f"w{width}e{step}", "width": width, "step": step, "train_loss": loss})
            rows.append({"model_id": f"w{width}e{step}", "init_model_id": f"w{width}e0", "step": step,
                         "layer": "all", "rmsd": 0.1 * step / width})
    models, drift_df = pd.DataFrame(models), pd.DataFrame(rows)
    wi = rng.uniform(-0.1, 0.1, 5000)
    secs = rt.sections(models, None, None, drift_df, pairs={"fc2": (wi, wi + 0.01 * rng.normal(size=5000))})
    assert [s.anchor for s in secs] == ["drift-rmsd", "drift-theta", "drift-joint"]
    assert all(s.html.count("data:image/png;base64,") >= 1 for s in secs)
    assert "<table" in secs[1].html  # the Fig. 6 numbers
    assert rt.sections(models, None, None, None) == []
    assert [s.anchor for s in rt.sections(None, None, None, drift_df)] == ["drift-rmsd"]


def test_report_group_sections():
    from zooscope.pipelines import report_training as rt

    rng = np.random.default_rng(10)
    models = pd.DataFrame({"model_id": [f"m{i}" for i in range(9)], "test_acc": np.linspace(0.1, 0.9, 9)})
    layers = pd.DataFrame([{"model_id": f"m{i}", "name": n, "layer_id": k, "w_std": rng.uniform(0.1, 0.2),
                            "ns_mean": rng.uniform(1, 2)} for i in range(9) for k, n in enumerate(["a", "b"])])
    counts = rng.integers(0, 10, (len(layers), 8)).astype(float)
    edges = np.tile(np.linspace(-1, 1, 9), (len(layers), 1))
    secs = rt.sections(models, layers, (counts, edges), None)
    assert [s.anchor for s in secs] == ["stats-groups", "stats-strength", "stats-tsne"]
    weights = {f"m{i}": rng.normal(0, 0.1 * (i + 1), 500) for i in range(9)}
    assert rt.sections(models, None, None, None, weights=weights)[0].anchor == "stats-groups"


def test_drift_table_skips_integer_tensors_without_reading_them(tmp_path, two_checkpoints, monkeypatch):
    """A 2-D integer buffer in the final checkpoint (absent from the init) is neither read nor counted."""
    from zooscope.pipelines.readers import Checkpoint

    p0, _, init, final = two_checkpoints
    p1 = _save(tmp_path / "final_int.safetensors", {**final, "index_map": np.arange(12, dtype=np.int64).reshape(3, 4)})
    read = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, key: read.append(key) or original(self, key))
    t = pdrift.drift_table(p0, p1, model_id="b", init_model_id="a", step=1)
    assert "index_map" not in read and "index_map" not in set(t["layer"])
    keys = ["conv.weight", "fc1.weight", "fc2.weight"]
    all_i = np.concatenate([init[k].astype(np.float64).ravel() for k in keys])
    all_f = np.concatenate([final[k].astype(np.float64).ravel() for k in keys])
    whole = t[t["layer"] == "all"].iloc[0]
    assert whole["n_weights"] == all_i.size
    assert whole["rmsd"] == pytest.approx(np.sqrt(np.mean((all_f - all_i) ** 2)), rel=1e-12)
