"""Spectral metrics against direct formulas and against weightwatcher 0.7.7's own functions on the same λ."""
import logging

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import jensenshannon

from zooscope.kernels.esd import eigenvalues
from zooscope.kernels.spectral import detx, mp_fit, norm_metrics, randomize_metrics, randomized_eigenvalues

logging.disable(logging.WARNING)
RMT_Util = pytest.importorskip("weightwatcher.RMT_Util")
import weightwatcher  # noqa: E402

MP_RTOL = 1e-9  # stated tolerance vs weightwatcher's mp_fit; in practice the numbers are bit-identical


def _layer(n, m, kind, seed, batch=1):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3.0, size=(batch, n, m)) if kind == "t" else rng.standard_normal((batch, n, m))
    return w, np.sort(eigenvalues(w, backend="scipy-gesdd").ravel())


@pytest.mark.parametrize("alpha", [2.7, 4.1])
def test_norm_metrics_direct_formulas(alpha):
    _, lam = _layer(120, 40, "t", 0)
    got = norm_metrics(lam, alpha, n=120, m=40)
    assert got["norm"] == pytest.approx(np.sum(lam), rel=1e-14)
    assert got["log_norm"] == pytest.approx(np.log10(np.sum(lam)), rel=1e-14)
    assert got["lambda_max"] == got["spectral_norm"] == lam[-1]
    assert got["log_spectral_norm"] == pytest.approx(np.log10(lam[-1]), rel=1e-14)
    assert got["alpha_weighted"] == pytest.approx(alpha * np.log10(lam[-1]), rel=1e-14)
    assert got["log_alpha_norm"] == pytest.approx(np.log10(np.sum(lam**alpha)), rel=1e-12)
    assert got["stable_rank"] == pytest.approx(np.sum(lam) / lam[-1], rel=1e-14)
    assert got["matrix_rank"] == 40
    p = lam / lam.sum()
    assert got["entropy"] == pytest.approx(-np.sum(p * np.log(p)) / np.log(40), rel=1e-8)  # ε = 1e-10 is tiny


def test_norm_metrics_match_weightwatcher_rmt_util():
    w, lam = _layer(200, 80, "t", 1)
    w[0, :, 60:] = 0.0  # rank 60: exercises matrix_rank and the entropy normaliser
    lam = np.sort(eigenvalues(w, backend="scipy-gesdd").ravel())
    got = norm_metrics(lam, 3.3, n=200, m=80)
    sv = np.sqrt(lam)
    assert got["matrix_rank"] == RMT_Util.matrix_rank(sv, 200) == 60
    assert got["entropy"] == pytest.approx(RMT_Util.matrix_entropy(sv, 200), rel=1e-12)
    assert got["stable_rank"] == pytest.approx(RMT_Util.stable_rank(lam), rel=1e-14)


def test_nan_alpha_gives_nan_alpha_columns_only():
    _, lam = _layer(60, 30, "n", 2)
    got = norm_metrics(lam, float("nan"), n=60, m=30)
    assert np.isnan(got["alpha_weighted"]) and np.isnan(got["log_alpha_norm"])
    assert all(np.isfinite(v) for k, v in got.items() if k not in {"alpha_weighted", "log_alpha_norm"})


def test_zero_matrix_gives_nan_ratios_instead_of_raising():
    # A zero-initialised layer: every λ is 0. Python-float 0/0 used to raise ZeroDivisionError and abort the run.
    lam = np.sort(eigenvalues(np.zeros((1, 40, 20)), backend="scipy-gesdd").ravel())
    with np.errstate(all="raise"):
        got = norm_metrics(lam, float("nan"), n=40, m=20)
    assert got["norm"] == got["lambda_max"] == 0.0 and got["matrix_rank"] == 0
    assert got["log_norm"] == got["log_spectral_norm"] == -np.inf
    assert np.isnan(got["stable_rank"]) and np.isnan(got["entropy"]) and np.isnan(got["alpha_weighted"])
    with np.errstate(all="ignore"):
        assert RMT_Util.matrix_rank(np.sqrt(lam), 40) == 0 and np.isnan(RMT_Util.stable_rank(lam))


def _ww_mp_fit(lam, n, m):
    num_spikes, sigma_mp, mp_softrank, bulk_min, bulk_max, w_scale = weightwatcher.WeightWatcher().mp_fit(
        lam, n, m, 1, "layer", 0, 0, False, False, "", "blue", 0.5, True, lam
    )
    return dict(num_spikes=num_spikes, sigma_mp=sigma_mp, mp_softrank=mp_softrank, W_scale=w_scale,
                bulk_max=bulk_max, bulk_min=bulk_min)


@pytest.mark.parametrize(
    "n,m,kind,batch",
    [(150, 50, "t", 1), (120, 60, "n", 1), (70, 70, "t", 1), (48, 16, "t", 4)],
    ids=["heavy-Q3", "gauss-Q2", "quarter-circle-Q1", "conv-stack"],
)
def test_mp_fit_matches_weightwatcher(n, m, kind, batch):
    _, lam = _layer(n, m, kind, 3, batch)
    got, ref = mp_fit(lam, n=n, m=m), _ww_mp_fit(lam, n, m)
    assert got["num_spikes"] == ref["num_spikes"]
    for key in ("sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min"):
        assert got[key] == pytest.approx(ref[key], rel=MP_RTOL, abs=1e-12), key


def test_detx_matches_a_direct_loop_and_weightwatcher():
    for seed, (n, m) in enumerate([(200, 90), (64, 64), (300, 30)]):
        _, lam = _layer(n, m, "t", seed)
        got = detx(lam)
        x = lam * len(lam) / lam.sum()
        idx, num = 1, len(lam)
        for i in range(len(x) - 1, 0, -1):
            if np.prod(x[i:]) < 1.0:
                idx, num = i, len(x) - i
                break
        assert got["detX_num"] == num
        assert got["detX_val"] == pytest.approx(lam[idx], rel=1e-14)
        assert got["detX_val_unrescaled"] == pytest.approx(x[idx], rel=1e-12)
        rescaled, _ = RMT_Util.rescale_eigenvalues(lam)
        assert RMT_Util.detX_constraint(rescaled, rescale=False) == (num, idx)


def test_randomize_is_reproducible_and_shaped_like_weightwatcher():
    w, _ = _layer(40, 12, "t", 4, batch=3)  # 36 eigenvalues < 100: five replicas
    a = randomized_eigenvalues(w, rng=np.random.default_rng(11))
    b = randomized_eigenvalues(w, rng=np.random.default_rng(11))
    c = randomized_eigenvalues(w, rng=np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5 * 36,) and not np.array_equal(a, c)
    assert np.all(np.diff(a) >= 0)
    big, _ = _layer(150, 110, "t", 5)
    assert randomized_eigenvalues(big, rng=np.random.default_rng(0)).shape == (110,)


def test_randomized_matrix_is_an_entry_permutation():
    w, _ = _layer(30, 10, "t", 6)
    single = randomized_eigenvalues(w, rng=np.random.default_rng(1), replicas=1)
    shuffled = np.random.default_rng(1).permuted(w.reshape(1, -1), axis=1).reshape(w.shape)[0]
    np.testing.assert_allclose(single, np.sort(scipy.linalg.svdvals(shuffled) ** 2), rtol=1e-12)
    assert single.sum() == pytest.approx((w**2).sum(), rel=1e-12)  # a shuffle keeps the Frobenius norm


def test_randomize_metrics():
    n, m = 150, 50
    w, lam = _layer(n, m, "t", 7)
    rng = np.random.default_rng(3)
    pooled = randomized_eigenvalues(w, rng=rng)
    single = randomized_eigenvalues(w, rng=rng, replicas=1)
    got = randomize_metrics(lam, pooled, single, n=n, m=m)
    assert got["rand_distance"] == pytest.approx(jensenshannon(lam, single), rel=1e-12)
    assert got["rand_distance"] == pytest.approx(RMT_Util.jensen_shannon_distance(lam, single), rel=1e-9)
    assert 0 < got["rand_distance"] <= np.sqrt(np.log(2))
    assert got["ww_softrank"] == pytest.approx(single.max() / lam.max(), rel=1e-15)
    assert got["ww_maxdist"] == pytest.approx(lam.max() - single.max(), rel=1e-15)
    assert got["max_rand_eval"] == pooled.max()
    ref = _ww_mp_fit(pooled, n, m)
    assert got["rand_num_spikes"] == ref["num_spikes"]
    assert got["rand_sigma_mp"] == pytest.approx(ref["sigma_mp"], rel=MP_RTOL)
    assert got["rand_bulk_max"] == pytest.approx(ref["bulk_max"], rel=MP_RTOL)
    with pytest.raises(ValueError, match="one value per eigenvalue"):
        randomize_metrics(lam, pooled, single[1:], n=n, m=m)
