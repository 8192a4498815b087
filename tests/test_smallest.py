"""The smallest eigenvalues of WᵀW by inverse subspace iteration, against LAPACK SVD (scipy)."""
import numpy as np
import pytest
import scipy.linalg
from zooscope.kernels.esd import gram_rounding
from zooscope.kernels.smallest import smallest_gram_eigenvalues


def _matrix(rng, n, m, singular_values):
    """An n×m matrix with the given singular values and random orthogonal factors."""
    k = len(singular_values)
    u = np.linalg.qr(rng.standard_normal((n, k)))[0]
    v = np.linalg.qr(rng.standard_normal((m, k)))[0]
    return (u * singular_values) @ v.T


def _inputs(w, k):
    """(reference λ ascending, λmax, a lower bound on λₖ₊₁) as the checked Gram route passes them."""
    lam = np.sort(scipy.linalg.svdvals(w) ** 2)
    return lam, lam[-1], lam[k] - gram_rounding(*w.shape, lam[-1])


@pytest.mark.parametrize("shape", [(300, 300), (500, 200), (120, 400)])
@pytest.mark.parametrize("k", [1, 3])
def test_smallest_eigenvalues_match_lapack_svd(shape, k):
    rng = np.random.default_rng(k + shape[0])
    m = min(shape)
    sv = np.concatenate([np.logspace(-6, -5.5, k), rng.uniform(0.01, 3.0, m - k)])  # λ down to 1e-13·λmax
    w = _matrix(rng, *shape, sv)
    lam, lam_max, next_lower = _inputs(w, k)
    got = smallest_gram_eigenvalues(w, k, lam_max=lam_max, next_lower=next_lower, accuracy=1e-7)
    assert got is not None and got.shape == (k,)
    np.testing.assert_allclose(got, lam[:k], rtol=1e-7)  # LAPACK's own error: about 2·eps·σmax/σ = 1.3e-9
    gram = np.linalg.eigvalsh(w.T @ w if shape[0] >= shape[1] else w @ w.T)
    assert np.max(np.abs(gram[:k] / lam[:k] - 1)) > 1e-6  # the Gram matrix alone misses 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_returned_values_meet_the_accuracy_they_claim(seed):
    rng = np.random.default_rng(seed)
    accuracy = 10.0 ** rng.uniform(-4, -1)  # loose: the iteration stops early, right at the bound
    k = int(rng.integers(1, 4))
    low = np.sort(rng.uniform(1e-5, 1e-3, k))
    sv = np.concatenate([low, low[-1] * rng.uniform(1.5, 3.0, 80 - k)])  # a gap above the k-th
    w = _matrix(rng, 80, 80, sv)
    lam, lam_max, next_lower = _inputs(w, k)
    got = smallest_gram_eigenvalues(w, k, lam_max=lam_max, next_lower=next_lower, accuracy=accuracy, seed=seed)
    assert got is not None
    assert np.all(np.abs(got / lam[:k] - 1) <= accuracy)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    w = _matrix(rng, 200, 100, np.concatenate([[1e-6], rng.uniform(0.1, 1.0, 99)]))
    _, lam_max, next_lower = _inputs(w, 1)
    first = smallest_gram_eigenvalues(w, 1, lam_max=lam_max, next_lower=next_lower, accuracy=1e-7)
    np.testing.assert_array_equal(first, smallest_gram_eigenvalues(w, 1, lam_max=lam_max, next_lower=next_lower,
                                                                  accuracy=1e-7))


def test_refuses_what_it_cannot_prove():
    rng = np.random.default_rng(1)
    w = _matrix(rng, 100, 100, np.concatenate([[1e-6], rng.uniform(0.1, 1.0, 99)]))
    lam, lam_max, next_lower = _inputs(w, 1)
    args = {"lam_max": lam_max, "accuracy": 1e-7}
    singular = w.copy()
    singular[:, 3] = 0.0
    assert smallest_gram_eigenvalues(singular, 1, next_lower=next_lower, **args) is None  # exact zero
    assert smallest_gram_eigenvalues(np.where(w > 0.1, np.nan, w), 1, next_lower=next_lower, **args) is None
    assert smallest_gram_eigenvalues(w, 47, next_lower=next_lower, **args) is None  # block over half the side
    tiny = _matrix(rng, 100, 100, np.concatenate([[1e-17], rng.uniform(0.1, 1.0, 99)]))  # σ₁ lost to rounding
    assert smallest_gram_eigenvalues(tiny, 1, next_lower=next_lower, **args) is None
    assert smallest_gram_eigenvalues(w, 1, next_lower=lam[0] * 0.5, **args) is None  # no gap above λ₁: no proof
    assert smallest_gram_eigenvalues(w, 1, next_lower=next_lower, **args) is not None
