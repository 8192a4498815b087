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
from zooscope.pipelines.plots import esd_linear_plot  # noqa: E402


def _model():
    return heavy_tailed_(torch.nn.Sequential(torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 40),
                                             torch.nn.Conv2d(8, 16, 3)), seed=2)


def test_plot_writes_weightwatchers_esd_files(tmp_path):
    model = _model()
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww_module.WeightWatcher(model=model).analyze(min_evals=10, plot=True, savefig=str(tmp_path / "ww"))
    theirs = {p.name for p in (tmp_path / "ww").iterdir() if p.name.endswith((".esd.png", ".esd2.png"))}
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
