"""``analyze(plot=True, savefig=DIR)``: WeightWatcher 0.7.7's per-layer ESD figure files, by name, against the files
WeightWatcher itself writes for the same model, and what they draw (checked from the figures' data)."""
import contextlib
import io
import logging
import warnings

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
torch = pytest.importorskip("torch")
ww_module = pytest.importorskip("weightwatcher")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope.pipelines.plots import eigenvalue_gaps_plot, esd_linear_plot, level_stats_plot  # noqa: E402


def _model():
    return heavy_tailed_(torch.nn.Sequential(torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 40),
                                             torch.nn.Conv2d(8, 16, 3)), seed=2)


@pytest.fixture(scope="module")
def weightwatcher_files(tmp_path_factory) -> set[str]:
    """The names of the figure files WeightWatcher writes for ``_model()`` with ``plot=True, deltas=True``."""
    out = tmp_path_factory.mktemp("ww")
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww_module.WeightWatcher(model=_model()).analyze(min_evals=10, plot=True, deltas=True, savefig=str(out))
    return {p.name for p in out.iterdir()}


def test_plot_writes_weightwatchers_esd_files(tmp_path, weightwatcher_files):
    model = _model()
    theirs = {name for name in weightwatcher_files if name.endswith((".esd.png", ".esd2.png"))}
    ours = zooscope.analyze(model, min_evals=10, plot=True, savefig=str(tmp_path / "zs"), mp_fit=True)
    assert {p.name for p in (tmp_path / "zs").iterdir()} == theirs
    assert len(theirs) == 2 * len(ours) == 6
    image = matplotlib.image.imread(tmp_path / "zs" / "ww.layer1.esd.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.05  # a drawn figure, not a blank one
    with pytest.raises(ValueError, match="savefig"):
        zooscope.analyze(model, plot=True, savefig=False)


def test_linear_esd_draws_the_histogram_xmin_and_mp_bulk():
    evals = np.random.default_rng(0).gamma(2.0, size=500)
    fig = esd_linear_plot(evals, xmin=3.0, title="t", bulk=(0.5, 4.0))
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches[:100]])
    expected, _ = np.histogram(evals, bins=100, density=True)
    np.testing.assert_allclose(heights, expected, rtol=1e-12)
    assert ax.lines[0].get_xdata()[0] == 3.0  # xmin
    bulk = ax.patches[-1]  # axvspan's rectangle, in data x from bulk_min to bulk_max
    np.testing.assert_allclose([bulk.get_x(), bulk.get_x() + bulk.get_width()], [0.5, 4.0], rtol=1e-12)


def test_deltas_writes_weightwatchers_spacing_figures(tmp_path, weightwatcher_files):
    kinds = (".deltaEs.png", ".level-stats.png")
    theirs = {name for name in weightwatcher_files if name.endswith(kinds)}
    zooscope.analyze(_model(), min_evals=10, plot=True, deltas=True, savefig=str(tmp_path))
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(kinds)} == theirs
    assert len(theirs) == 6


def test_spacing_figures_draw_the_log_gaps_and_xmin():
    evals = np.sort(np.random.default_rng(1).pareto(2.0, size=300) + 0.1)
    evals[10] = evals[11]  # a repeated eigenvalue: a zero gap, log10 = -inf, left out
    gaps = np.log10(np.diff(evals[:11])), np.log10(np.diff(evals[11:]))
    fig = eigenvalue_gaps_plot(evals, xmin=evals[200], title="t")
    ax = fig.axes[0]
    points = ax.collections[0].get_offsets()
    np.testing.assert_array_equal(points[:, 0], np.r_[np.arange(10), np.arange(11, 299)])
    np.testing.assert_allclose(points[:, 1], np.r_[gaps[0], gaps[1]], rtol=1e-12)
    assert ax.lines[0].get_xdata()[0] == 200  # xmin's index among the ascending eigenvalues
    heights = np.array([p.get_height() for p in level_stats_plot(evals, title="t").axes[0].patches])
    np.testing.assert_allclose(heights, np.histogram(points[:, 1], bins=100, density=True)[0], rtol=1e-12)
