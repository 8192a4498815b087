"""kernels.weightstats against direct numpy/scipy computations."""
import numpy as np
import pytest
from scipy import stats

from zooscope.kernels import weightstats as ws
from zooscope.kernels import weightstats_numba


@pytest.fixture
def w():
    rng = np.random.default_rng(1)
    return (rng.standard_t(df=5, size=(64, 48)) * 0.05).astype(np.float32)


def test_moments_match_numpy_scipy(w):
    m = ws.moments(w)
    x = w.astype(np.float64).ravel()
    assert m["w_mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert m["w_std"] == pytest.approx(x.std(), rel=1e-12)
    assert m["w_skew"] == pytest.approx(stats.skew(x), rel=1e-10)
    assert m["w_kurtosis"] == pytest.approx(stats.kurtosis(x, fisher=True), rel=1e-10)
    assert (m["w_min"], m["w_max"]) == (x.min(), x.max())
    for q in (1, 5, 25, 50, 75, 95, 99):
        assert m[f"w_q{q:02d}"] == pytest.approx(np.quantile(x, q / 100), rel=1e-12)
    assert m["w_count"] == x.size and m["w_nonfinite"] == 0


def test_frac_zero_and_tolerance():
    x = np.array([0.0, 1e-5, 5e-4, 0.2, -1.0, 0.5])
    assert ws.moments(x)["w_frac_zero"] == pytest.approx(3 / 6)  # |w| < 1e-3 * 1.0
    assert ws.moments(x, zero_tol=1e-4)["w_frac_zero"] == pytest.approx(2 / 6)


def test_nonfinite_policy(w):
    x = w.astype(np.float64).ravel().copy()
    x[[3, 10]] = [np.nan, np.inf]
    m = ws.moments(x)
    good = np.delete(x, [3, 10])
    assert m["w_nonfinite"] == 2 and m["w_count"] == good.size
    assert m["w_mean"] == pytest.approx(good.mean(), rel=1e-12)
    assert np.isnan(ws.moments(np.full(4, np.nan))["w_mean"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        ws.layer_stats(x.reshape(-1, 2))


def test_constant_tensor_skew_is_nan():
    m = ws.moments(np.full((3, 3), 0.7))
    assert np.isnan(m["w_skew"]) and np.isnan(m["w_kurtosis"]) and m["w_std"] == 0


def test_histogram_matches_numpy(w):
    counts, edges = ws.histogram(w, bins=17)
    ref_c, ref_e = np.histogram(w.astype(np.float64), bins=17)
    np.testing.assert_array_equal(counts, ref_c)
    np.testing.assert_allclose(edges, ref_e, rtol=1e-15)
    counts, edges = ws.histogram(w, bins=5, range=(-0.1, 0.1))
    np.testing.assert_array_equal(counts, np.histogram(w, bins=5, range=(-0.1, 0.1))[0])
    assert counts.dtype == np.float64


def test_kde_matches_scipy_and_subsamples(w):
    grid = np.linspace(-0.3, 0.3, 41)
    np.testing.assert_allclose(ws.kde(w, grid), stats.gaussian_kde(w.ravel().astype(np.float64))(grid),
                               rtol=1e-10)
    np.testing.assert_allclose(ws.kde(w, grid, bandwidth="silverman"),
                               stats.gaussian_kde(w.ravel().astype(np.float64), "silverman")(grid), rtol=1e-10)
    big = np.random.default_rng(2).normal(0, 1, 50_000)
    g = np.linspace(-3, 3, 13)
    sub = ws.kde(big, g, max_points=5000, seed=3)
    np.testing.assert_array_equal(sub, ws.kde(big, g, max_points=5000, seed=3))
    np.testing.assert_allclose(sub, stats.norm.pdf(g), atol=0.03)  # subsample still estimates N(0,1)


def test_node_strength_by_hand():
    lin = np.array([[1.0, -2.0, 3.0], [-0.5, 0.0, 0.5]])  # (out=2, in=3)
    np.testing.assert_allclose(ws.node_strength(lin), [6.0, 1.0])
    np.testing.assert_allclose(ws.out_strength(lin), [1.5, 2.0, 3.5])
    np.testing.assert_allclose(ws.node_strength(lin.T, layout="in_out"), [6.0, 1.0])  # HF Conv1D (in, out)
    np.testing.assert_allclose(ws.out_strength(lin.T, layout="in_out"), [1.5, 2.0, 3.5])
    conv = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2) - 10  # (Cout, Cin, kh, kw)
    expect_in = [sum(abs(conv[o, c, i, j]) for c in range(3) for i in range(2) for j in range(2)) for o in range(2)]
    expect_out = [sum(abs(conv[o, c, i, j]) for o in range(2) for i in range(2) for j in range(2)) for c in range(3)]
    np.testing.assert_allclose(ws.node_strength(conv), expect_in)
    np.testing.assert_allclose(ws.out_strength(conv), expect_out)
    with pytest.raises(ValueError):
        ws.node_strength(np.ones(3))


def test_strength_correlation():
    rng = np.random.default_rng(4)
    w1, w2 = rng.normal(size=(20, 7)), rng.normal(size=(5, 20))
    a, b = np.abs(w1).sum(1), np.abs(w2).sum(0)
    assert ws.strength_correlation(a, b) == pytest.approx(stats.pearsonr(a, b)[0], rel=1e-12)
    assert ws.chained_strength_correlation(w1, w2) == pytest.approx(stats.pearsonr(a, b)[0], rel=1e-12)
    assert np.isnan(ws.chained_strength_correlation(w1, rng.normal(size=(5, 19))))
    assert np.isnan(ws.strength_correlation(np.ones(5), np.arange(5.0)))
    assert np.isnan(ws.strength_correlation([1.0], [2.0]))
    with pytest.raises(ValueError, match="do not chain"):
        ws.strength_correlation(np.ones(3), np.ones(4))


def test_layer_stats_entry_point(w):
    stats_, counts, edges = ws.layer_stats(w, bins=32)
    ns = np.abs(w.astype(np.float64)).sum(axis=1)
    assert stats_["ns_mean"] == pytest.approx(ns.mean(), rel=1e-12)
    assert stats_["ns_std"] == pytest.approx(ns.std(), rel=1e-12)
    assert stats_["w_std"] == pytest.approx(w.astype(np.float64).std(), rel=1e-12)
    assert counts.shape == (32,) and edges.shape == (33,) and counts.sum() == w.size
    hf, _, _ = ws.layer_stats(w.T, bins=8, layer_type="conv1d")  # HF Conv1D stores (in, out)
    assert hf["ns_mean"] == pytest.approx(ns.mean(), rel=1e-12)
    one, _, _ = ws.layer_stats(w[0], bins=8)
    assert np.isnan(one["ns_mean"])


def test_central_moments_are_exact_to_rounding():
    """The compensated sums against exact rational arithmetic on heavy-tailed rows, one with a mean ~1e-13 of its
    values, one far from zero: m2, m3, m4 within 1e-14 relative of the exact value."""
    from fractions import Fraction

    rng = np.random.default_rng(7)
    x = rng.standard_t(2, size=(4, 3000)) * 1e3
    x[1] -= x[1].mean()  # mean ~1e-13 of the values
    x[2] = np.abs(x[2]) + 1e6  # a large offset from zero
    mean = x.mean(axis=1)
    got = weightstats_numba.central_moments(x, mean, ws.ZERO_TOL)
    for g in range(x.shape[0]):
        m = Fraction(float(mean[g]))
        d = [Fraction(float(v)) - m for v in x[g]]
        for k, col in ((2, 0), (3, 1), (4, 2)):
            exact = float(sum(v**k for v in d) / len(d))
            assert got[g, col] == pytest.approx(exact, rel=1e-14, abs=1e-300), (g, k)
        assert (got[g, 3], got[g, 4]) == (x[g].min(), x[g].max())


@pytest.mark.parametrize("row", [
    np.arange(65, dtype=np.float64),  # values on the bin edges
    np.r_[np.zeros(10), 1e-300 * np.arange(1, 6)],  # a tiny range
    np.full(7, -2.5),  # constant: the range widened by 0.5
    np.random.default_rng(3).standard_t(1, size=5000),  # long, heavy-tailed
])
def test_histogram_rows_equal_numpy_bin_for_bin(row):
    for bins in (1, 8, 64):
        counts, edges = ws.histogram_rows(np.stack([row, row[::-1]]), bins)
        ref_c, ref_e = np.histogram(row, bins=bins)
        for g in range(2):
            np.testing.assert_array_equal(counts[g], ref_c)
            np.testing.assert_array_equal(edges[g], ref_e)


def test_strength_correlation_rows_equal_scipy_row_by_row():
    rng = np.random.default_rng(4)
    a, b = rng.pareto(2.0, size=(6, 40)), rng.pareto(2.0, size=(6, 40))
    b[1] = a[1] * 3 + 1  # exactly correlated: clipped to 1
    a[2] = 0.7  # constant: undefined
    got = ws.strength_correlation_rows(a, b)
    for r in range(6):
        if r == 2:
            assert np.isnan(got[r])
        else:
            assert got[r] == pytest.approx(stats.pearsonr(a[r], b[r])[0], rel=1e-12)
    assert np.isnan(ws.strength_correlation_rows(a[:, :1], b[:, :1])).all()


@pytest.mark.parametrize("n", [1, 2, 7, 100, 2304, (1 << 19) + 3])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_quantile_rows_equal_numpy_bit_for_bit(n, dtype):
    """Order statistics taken in the stored dtype, interpolated in fp64: numpy's quantiles of the fp64 values,
    exactly, also with ties, signed zeros and a constant row."""
    x = np.random.default_rng(n).standard_t(3, size=(4, n)).astype(dtype)
    x[0, : n // 2] = x[0, 0]  # ties
    x[1, ::3], x[1, 1::3] = 0.0, -0.0
    x[3] = x[3, 0]  # constant
    q = (0.0, *ws.QUANTILES, 1.0)
    np.testing.assert_array_equal(ws.quantile_rows(x, q), np.quantile(x.astype(np.float64), q, axis=1))
    sorted_at = np.sort(x, axis=1)[:, ws.quantile_ranks(n, q)]  # the same interpolation from sorted rows
    np.testing.assert_array_equal(ws.quantiles_at_ranks(sorted_at, n, q), np.quantile(x.astype(np.float64), q, axis=1))


def test_order_statistics_of_ranges_that_cannot_be_binned():
    """A row whose range overflows fp64 (its largest values cannot be subtracted from its minimum) and one whose
    range is subnormal (its reciprocal overflows): still the sorted rows' values at every rank."""
    x = np.array([[1e-300, -1e308, 1e308, 0.0, 5.0, -3.0, 1.7e308, 2.0],
                  [1e-310, 2e-310, 3e-310, 0.0, 1e-320, -1e-315, 4e-310, 5e-324]])
    ranks = np.arange(x.shape[1])
    np.testing.assert_array_equal(weightstats_numba.order_statistics(x, ranks), np.sort(x, axis=1))


def test_quantile_rows_do_not_depend_on_numba_threads():
    """Many rows on one or on every Numba thread: numpy's quantiles, bit for bit, and the moments of the layers equal
    those of each layer alone."""
    import numba

    x = np.random.default_rng(7).standard_t(3, size=(301, 16, 16, 3, 3)).astype(np.float32)
    rows = x.reshape(len(x), -1)
    q = ws.QUANTILES
    reference = np.quantile(rows.astype(np.float64), q, axis=1)
    threads = numba.get_num_threads()
    try:
        for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n_threads)
            np.testing.assert_array_equal(ws.quantile_rows(rows, q), reference)
    finally:
        numba.set_num_threads(threads)
    many, _, _, _ = ws.layer_stats_many(x)
    for i in (0, 150, 300):
        one = ws.moments(x[i])
        assert all(many[k][i] == one[k] for k in ws.MOMENT_KEYS)
