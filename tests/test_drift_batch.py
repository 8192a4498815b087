"""Batched distance from init (kernels.drift.drift_stats_many, pipelines.drift.drift_tables) against the one-pair
reference (kernels.drift.drift_stats), exact least squares, and plan.batch_ranges."""
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from zooscope.engine.plan import batch_ranges
from zooscope.kernels import drift
from zooscope.pipelines import drift as pdrift
from zooscope.pipelines.readers import CheckpointError, open_checkpoint


def _rows(n, seed):
    """Pairs of one size n in many regimes: trained-like (w_f ≈ a·w_i + noise), a ridge over a broad background,
    float32-rounded w_i (ties), half zero weights (zero IQR at every slope), w_f = 0.5·w_i exactly (a slope with a
    single residual value), constant w_i (every slope's histogram alike), a constant layer, NaN and inf weights."""
    rng = np.random.default_rng(seed)
    wi = rng.uniform(-0.2, 0.2, (10, n))
    wf = np.empty_like(wi)
    wf[0] = 0.9 * wi[0] + 0.01 * rng.standard_normal(n)
    on = rng.random(n) < 0.5
    wf[1] = np.where(on, 0.7 * wi[1] + 0.002 * rng.standard_normal(n), rng.normal(0, 0.1, n))
    wi[2] = wi[2].astype(np.float16).astype(np.float64)
    wf[2] = wi[2] + 0.05 * rng.standard_normal(n)
    wi[3, : n // 2] = 0.0
    wf[3] = wi[3] * 1.1
    wi[4] = np.round(wi[4] * 1024) / 1024
    wf[4] = 0.5 * wi[4]
    wi[5] = 0.125
    wf[5] = rng.normal(0, 0.1, n)
    wi[6] = 0.0
    wf[6] = 0.0
    wf[7] = wi[7] + rng.laplace(0, 0.02, n)
    wf[7, 0] = np.nan
    wi[8, n // 3] = np.inf
    wf[8] = wi[8] + 0.01 * rng.standard_normal(n)
    wf[9] = np.tanh(3 * wi[9]) + 0.2 * rng.standard_cauchy(n) * 0.01
    return wi, wf


def _units(coef, r):
    """Per coefficient k of fits ``coef`` (P, d) on data with max|w_i| = ``r`` (P,): Σ_j |c_j|·r^j / r^k, the size
    of the fitted polynomial on the data in units of that coefficient (the scale of its rounding error)."""
    size = sum(np.abs(coef[:, j]) * r**j for j in range(coef.shape[1]))
    return size[:, None] / r[:, None] ** np.arange(coef.shape[1])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 60, 900, 2100])
def test_drift_stats_many_equals_the_one_pair_reference(n):
    wi, wf = _rows(n, seed=n)
    got = drift.drift_stats_many(wi, wf)
    ref = {k: np.array([drift.drift_stats(a, b)[k] for a, b in zip(wi, wf)]) for k in drift.STATS}
    for key in ("rmsd", "c_opt", "c_opt_resolution"):  # the same arithmetic: bit for bit
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    # The fits solve normal equations instead of an SVD: ≤ 1e-12 of the fitted polynomial's size per coefficient.
    r = np.array([np.abs(a[np.isfinite(a) & np.isfinite(b)]).max(initial=0.0) for a, b in zip(wi, wf)])
    for keys in (("a0", "a1"), ("b0", "b1", "b2")):
        new, old = np.stack([got[k] for k in keys], 1), np.stack([ref[k] for k in keys], 1)
        assert np.array_equal(np.isnan(new), np.isnan(old))
        fitted = ~np.isnan(old[:, 0])
        err = np.abs(new - old)[fitted]
        assert np.all(err <= 1e-12 * _units(old[fitted], r[fitted])), (keys, err)
    np.testing.assert_allclose(got["sigma_at_0"], ref["sigma_at_0"], rtol=1e-9, equal_nan=True)


def test_stacks_of_one_row_and_of_repeated_rows():
    wi, wf = _rows(300, seed=1)
    many = drift.drift_stats_many(np.repeat(wi[:2], 3, axis=0), np.repeat(wf[:2], 3, axis=0))
    one = drift.drift_stats_many(wi[1:2], wf[1:2])
    assert many["c_opt"][3] == one["c_opt"][0] and many["a1"][5] == one["a1"][0]
    with pytest.raises(ValueError, match="drift_stats_many"):
        drift.drift_stats_many(wi, wf[:, :-1])


def _exact_fit(x, v, degree):
    """``_fit_sorted``'s coefficients by exact rational least squares (normal equations in Fractions)."""
    keep = np.r_[x[1:] != x[:-1], True]
    F = [Fraction(c) * (Fraction(x[-1]) - Fraction(x[0])) / x.size for c in np.cumsum(v)]
    xs = [Fraction(a) for a in x[keep]]
    F = [f for f, k in zip(F, keep) if k]
    m = degree + 1
    A = [[sum(t ** (i + j) for t in xs) for j in range(m)] + [sum(f * t**i for t, f in zip(xs, F))]
         for i in range(m)]
    for i in range(m):  # Gauss–Jordan, exact
        A[i] = [a / A[i][i] for a in A[i]]
        for r in range(m):
            if r != i:
                A[r] = [a - A[r][i] * b for a, b in zip(A[r], A[i])]
    c = [row[-1] for row in A]
    return np.array([float((k + 1) * c[k + 1]) for k in range(degree)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fits_are_as_close_to_exact_least_squares_as_polynomial_fit(seed):
    rng = np.random.default_rng(seed)
    n = 40
    x = np.sort(rng.uniform(-0.2, 0.2, n)).astype(np.float32).astype(np.float64)
    y = x + 0.01 * rng.standard_normal(n)
    fits = drift._fits_many(x[None], y[None])
    for v, degree, got in ((y, 2, fits[0]), (y * y, 3, fits[1])):
        exact = _exact_fit(x, v, degree)
        new = got[0]
        ref = drift._fit_sorted(x, v, degree)
        unit = _units(exact[None], np.abs(x).max()[None])[0]
        assert np.all(np.abs(new - exact) <= np.maximum(4 * np.abs(ref - exact), 1e-14 * unit))


def test_bandwidth_scale_pruning_is_the_full_search():
    """_min_scale_many measures only slopes it cannot rule out; argmin and min equal _scales' over the grid."""
    for n in (50, 2000):
        wi, wf = _rows(n, seed=7)
        ok = np.isfinite(wi).all(1) & np.isfinite(wf).all(1)
        x, y = wi[ok], wf[ok]
        k, s = drift._min_scale_many(x, y, drift.C_GRID)
        full = np.stack([drift._scales(a, b, drift.C_GRID) for a, b in zip(x, y)])
        np.testing.assert_array_equal(k, np.argmin(full, axis=1))
        np.testing.assert_array_equal(s, full.min(axis=1))


def test_peak_pruning_is_the_full_argmax():
    """_best_slopes_many smooths only slopes and bins that can hold the maximum; it picks _peak_densities' argmax."""
    wi, wf = _rows(1500, seed=3)
    ok = np.isfinite(wi).all(1) & np.isfinite(wf).all(1)
    x, y = wi[ok], wf[ok]
    h = np.array([drift._bandwidth(a, b, drift.C_GRID, np.random.default_rng(0)) for a, b in zip(x, y)])
    h = np.where(h > 0, h, 1e-4)
    grid = np.broadcast_to(drift.C_GRID, (x.shape[0], drift.C_GRID.size))
    ref = [int(np.argmax(drift._peak_densities(a, b, drift.C_GRID, hh))) for a, b, hh in zip(x, y, h)]
    np.testing.assert_array_equal(drift._best_slopes_many(x, y, grid, h), ref)
    wide = np.where(np.arange(x.shape[0]) % 2 == 0, h, h * 1e-4)  # bins capped at MAX_BINS: smoothing width < 4
    ref = [int(np.argmax(drift._peak_densities(a, b, drift.C_GRID, hh))) for a, b, hh in zip(x, y, wide)]
    np.testing.assert_array_equal(drift._best_slopes_many(x, y, grid, wide), ref)


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return str(path)


def test_drift_tables_batch_many_pairs_like_one_at_a_time(tmp_path):
    rng = np.random.default_rng(4)
    pairs = []
    for arch, shapes in (("a", {"fc1.weight": (20, 8), "fc2.weight": (4, 20)}), ("b", {"w": (30, 30)})):
        init = {k: rng.uniform(-0.3, 0.3, s).astype(np.float32) for k, s in shapes.items()}
        p0 = _save(tmp_path / f"{arch}0.safetensors", init)
        for step in (1, 2, 3):
            final = {k: v + 0.02 * step * rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
            if arch == "b" and step == 2:
                final["w"][0, 0] = np.nan
            pairs.append(pdrift.DriftPair(p0, _save(tmp_path / f"{arch}{step}.safetensors", final),
                                          f"{arch}{step}", f"{arch}0", step))
    pairs.insert(2, pdrift.DriftPair(str(tmp_path / "missing.safetensors"), pairs[0].ckpt, "x", "y", 1))
    tables = pdrift.drift_tables(pairs, skip_unreadable=True, batch_pairs=200)  # several batches
    assert tables[2] is None
    for pair, table in zip(pairs, tables):
        if table is None:
            continue
        one = pdrift.drift_tables([pair])[0]
        pd.testing.assert_frame_equal(table, one)
        with open_checkpoint(pair.init) as c0, open_checkpoint(pair.ckpt) as ct:
            for row in table.itertuples():
                if row.layer == "all":
                    continue
                key = next(k for k in ct.keys() if k.removesuffix(".weight") == row.layer)
                ref = drift.drift_stats(c0.read(key).astype(np.float64), ct.read(key).astype(np.float64))
                assert row.c_opt == ref["c_opt"] or (np.isnan(row.c_opt) and np.isnan(ref["c_opt"]))
                np.testing.assert_allclose(row.a1, ref["a1"], rtol=1e-10)
    with pytest.raises(CheckpointError, match="missing"):
        pdrift.drift_tables(pairs)


def test_batch_ranges_budgets():
    sizes = [100] * 10 + [1000] + [100] * 5
    runs = batch_ranges(sizes, batch_bytes=350, batch_models=100)
    assert [i for r in runs for i in r] == list(range(len(sizes)))  # every item once, in order
    assert all(sum(sizes[i] for i in r) <= 350 or len(r) == 1 for r in runs)
    assert [len(r) for r in batch_ranges([1] * 10, batch_models=4)] == [4, 4, 2]
    assert len(batch_ranges([1] * 10, min_tasks=5)) == 5
    assert batch_ranges([]) == []
    with pytest.raises(ValueError):
        batch_ranges([1], batch_bytes=0)


def test_fit_sort_keeps_ties_in_their_original_order():
    from zooscope.kernels import drift_numba

    x = np.random.default_rng(5).integers(0, 40, (3, 500)).astype(np.float64)  # many ties
    order = np.argsort(x, axis=1)
    drift_numba.stable_ties(x, order)
    np.testing.assert_array_equal(order, np.argsort(x, axis=1, kind="stable"))


@pytest.mark.parametrize("n", [3, 4, 5, 9, 127, 129, 1000, 2000, 8193])
def test_residual_spread_is_numpys_std_and_order_statistics(n):
    """The bandwidth rule's std and quartile neighbours from one Numba pass: numpy's std bit for bit (its pairwise
    summation order), the order statistics of np.sort, with ties and zero-IQR rows."""
    from zooscope.kernels import drift_numba

    rng = np.random.default_rng(n)
    x, y = rng.uniform(-0.2, 0.2, (3, n)), rng.normal(0, 0.05, (3, n))
    x[1], y[1] = np.round(x[1] * 10) / 10, np.round(y[1] * 20) / 20
    x[2, : n // 2 + 1] = y[2, : n // 2 + 1] = 0.0
    cs = np.array([0.5, 1.0, -0.75])
    ks = np.array(sorted({int((n - 1) * q) + d for q in (0.25, 0.75) for d in (0, 1)} - {n}))
    std, order = drift_numba.residual_spread(x, y, np.arange(3), cs, ks)
    r = y - cs[:, None] * x
    np.testing.assert_array_equal(std, r.std(axis=1))
    np.testing.assert_array_equal(order, np.sort(r, axis=1)[:, ks])
