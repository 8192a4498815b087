"""``analyze(vectors=True)``: WeightWatcher 0.7.7's eigenvector localization metrics (``apply_analyze_eigenvectors``)
against its own ``RMT_Util`` functions (1e-10 relative, on the same eigenvectors), its columns and what its
``vector_metrics`` / ``vector_histograms`` figures plot (read back from its pyplot figures and from ours; 1e-10),
and its file names. The models have generic random (Student-t) weights: no repeated eigenvalue, so every
eigenvector is defined up to its sign, which no metric depends on."""
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

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope.kernels import vectors as kv  # noqa: E402
from zooscope.pipelines.vectors import COLUMNS, METRICS  # noqa: E402

RTOL = 1e-10


def _model():
    """Dense layers (one square, whose W·Wᵀ side WeightWatcher takes) and a Conv2D, weights in fp64 so that
    WeightWatcher reads the same matrices."""
    net = torch.nn.Sequential(torch.nn.Linear(90, 40), torch.nn.Linear(40, 40), torch.nn.Conv2d(12, 16, 3))
    return heavy_tailed_(net, seed=4).double()


def test_metrics_match_weightwatchers_functions_on_the_same_eigenvectors():
    from weightwatcher.RMT_Util import discrete_entropy, localization_ratio, participation_ratio

    rng = np.random.default_rng(0)
    evals, V = kv.gram_eigenvectors(rng.standard_t(3, size=(3, 90, 40)))
    assert V.shape == (3, 40, 40) and np.all(np.diff(evals, axis=1) > 0)
    np.testing.assert_allclose(np.einsum("bnk,bnk->bk", V, V), 1.0, rtol=1e-12)  # unit eigenvectors
    flat = np.ones((6, 2))  # |v| constant: np.histogram's ±0.5 range; and a one-hot vector
    flat[:, 1] = np.eye(6)[2]
    reference = {"vec_entropy": discrete_entropy, "loc_ratio": localization_ratio, "part_ratio": participation_ratio}
    for vectors in (V, flat):
        ours = kv.eigenvector_metrics(vectors)
        batch = vectors.reshape(-1, *vectors.shape[-2:])
        for name, function in reference.items():
            theirs = np.array([[function(v[:, c]) for c in range(v.shape[1])] for v in batch])
            np.testing.assert_allclose(ours[name], theirs.reshape(ours[name].shape), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(kv.localization_ratio(flat), [6, 1])  # spread over all 6 components / one
    np.testing.assert_allclose(kv.participation_ratio(flat), [6 ** 0.25, 1])
    with pytest.raises(ValueError, match="N >= M"):
        kv.gram_eigenvectors(np.zeros((1, 3, 5)))


def test_square_matrices_take_weightwatchers_side():
    W = np.random.default_rng(1).standard_normal((1, 30, 30))
    evals, V = kv.gram_eigenvectors(W)
    np.testing.assert_allclose(W[0] @ W[0].T @ V[0], V[0] * evals[0], atol=1e-10)  # eigenvectors of W·Wᵀ, not WᵀW


@contextlib.contextmanager
def _quiet():
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _heights(patch) -> np.ndarray:
    """The bar heights a histogram patch draws: one bar (WeightWatcher's), or all 100 of a filled step (ours)."""
    if isinstance(patch, matplotlib.patches.Rectangle):
        return np.array([patch.get_height()])
    return patch.get_xy()[1:200:2, 1]


def _panels(fig) -> dict:
    """What a vector figure plots: per panel the scatter's x and y (``metrics`` figure) and the x of its xmin line
    (None without one), or the bar heights of its bulk then tail histograms (``histograms`` figure)."""
    axes = fig.axes
    if fig._suptitle.get_text().startswith("Vector Localization Metrics"):
        return {"kind": "metrics", "y": [ax.collections[0].get_offsets()[:, 1] for ax in axes],
                "x": [ax.collections[0].get_offsets()[:, 0] for ax in axes],
                "xmin": [ax.lines[0].get_xdata()[0] if ax.lines else None for ax in axes]}
    return {"kind": "histograms", "heights": [np.concatenate([_heights(p) for p in ax.patches]) for ax in axes]}


@pytest.fixture(scope="module")
def weightwatcher_run():
    """WeightWatcher's frame, the names of its vector figure files and what they plot (captured when it shows
    them; its ``savefig`` records the file name instead of rendering the PNG)."""
    names, shown = [], []

    def show(*args, **kwargs):
        fig = plt.gcf()
        if fig._suptitle is not None and fig._suptitle.get_text().startswith("Vector"):
            shown.append(_panels(fig))

    with _quiet(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "show", show)
        mp.setattr(plt, "savefig", lambda path, *args, **kwargs: names.append(str(path).rsplit("/", 1)[-1]))
        mp.setattr(plt, "tight_layout", lambda *args, **kwargs: None)  # layout only: half of its plotting time
        frame = ww_module.WeightWatcher(model=_model()).analyze(min_evals=10, vectors=True, plot=True,
                                                                savefig="ww-img")
    plt.close("all")
    return frame, {name for name in names if ".vector_" in name}, shown


@pytest.fixture(scope="module")
def zooscope_run(tmp_path_factory):
    """zooscope's frame, the names of its vector figure files and what they plot (captured when saved, not
    rendered: ``test_vectors_options`` writes real files)."""
    names, saved = [], []

    def savefig(fig, path, *args, **kwargs):
        names.append(path.name)
        if ".vector_" in path.name:
            saved.append(_panels(fig))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", savefig)
        frame = zooscope.analyze(_model(), min_evals=10, vectors=True, plot=True, ww_compat=True,
                                 savefig=str(tmp_path_factory.mktemp("zs")))
    return frame, {name for name in names if ".vector_" in name}, saved


def _split(data: list[np.ndarray], n_bulk: int) -> dict[str, float]:
    """The columns ``vectors=True`` derives from a figure's per-eigenvector data split after ``n_bulk``."""
    out = {}
    for name, values in zip(METRICS, data):
        for part, part_values in (("bulk", values[:n_bulk]), ("tail", values[n_bulk:])):
            out[f"{part}_mean_{name}"] = part_values.mean() if part_values.size else np.nan
            out[f"{part}_var_{name}"] = part_values.var() if part_values.size else np.nan
    return out


def test_figures_and_columns_match_weightwatcher(weightwatcher_run, zooscope_run):
    theirs, their_files, their_figs = weightwatcher_run
    ours, our_files, our_figs = zooscope_run
    assert our_files == their_files and len(our_files) == 2 * len(ours) == 6  # ww.layer{id}.vector_{metrics,...}.png
    assert list(ours.columns) == list(theirs.columns) and set(COLUMNS) <= set(ours.columns)
    assert [f["kind"] for f in our_figs] == [f["kind"] for f in their_figs] == ["metrics", "histograms"] * 3
    moved = 0
    for row in range(len(ours)):
        mine, ref = our_figs[2 * row], their_figs[2 * row]
        for panel, (y, y_ref) in enumerate(zip(mine["y"], ref["y"])):  # 3 metrics, then the eigenvalues
            np.testing.assert_array_equal(mine["x"][panel], np.arange(y_ref.size))
            np.testing.assert_allclose(y, y_ref, rtol=RTOL, err_msg=f"row {row} panel {panel}")
        n_bulk = int(mine["xmin"][0]) + 1
        their_bulk = int(ref["xmin"][0]) + 1
        assert len(set(mine["xmin"])) == 1 and len(set(ref["xmin"])) == 1
        # WeightWatcher compares its eig() eigenvalues with the xmin of its SVD ESD, so xmin's own eigenvector
        # lands in its bulk or tail by rounding; zooscope counts on the ESD (docs/DIFFERENCES.md, row 41)
        assert n_bulk == int(np.sum(ref["y"][3] < theirs.loc[row, "xmin"] * (1 - 1e-12)))
        assert their_bulk - n_bulk in (0, 1)
        moved += their_bulk != n_bulk
        expected = _split(ref["y"][:3], n_bulk)
        for column in COLUMNS:
            np.testing.assert_allclose(ours.loc[row, column], expected[column], rtol=RTOL, err_msg=column)
            if their_bulk == n_bulk:
                np.testing.assert_allclose(ours.loc[row, column], theirs.loc[row, column], rtol=RTOL, err_msg=column)
        np.testing.assert_allclose([theirs.loc[row, c] for c in COLUMNS],
                                   [_split(ref["y"][:3], their_bulk)[c] for c in COLUMNS], rtol=1e-12)
        for heights, heights_ref in zip(our_figs[2 * row + 1]["heights"], their_figs[2 * row + 1]["heights"]):
            if their_bulk == n_bulk:
                np.testing.assert_allclose(heights, heights_ref, rtol=RTOL)
    assert moved < len(ours)  # at least one row compares column for column


def test_vectors_options(tmp_path):
    model = _model()
    plain = zooscope.analyze(model, min_evals=10)
    with_vectors = zooscope.analyze(model, min_evals=10, vectors=True)  # columns only: no figure, nothing written
    assert list(with_vectors.drop(columns=list(COLUMNS)).columns) == list(plain.columns)
    np.testing.assert_array_equal(with_vectors["alpha"], plain["alpha"])
    assert with_vectors[list(COLUMNS)].notna().all().all()
    sliced = zooscope.analyze(model, min_evals=10, vectors=True, pool=False)
    assert len(sliced) == 11 and sliced[list(COLUMNS)].notna().all().all()
    conv = heavy_tailed_(torch.nn.Sequential(torch.nn.Conv2d(12, 16, (1, 2))), seed=5)
    zooscope.analyze(conv, vectors=True, pool=False, plot=True, savefig=str(tmp_path))
    image = matplotlib.image.imread(tmp_path / "ww.layer1:1.vector_metrics.png")  # WeightWatcher's plot_id of a slice
    assert image.shape[0] > 500 and image.std() > 0.05  # a drawn figure
    assert (tmp_path / "ww.layer1:0.vector_histograms.png").exists()
    for refused in ({"intra": True}, {"stacked": True}, {"inverse": True}, {"conv2d_fft": True}):
        with pytest.raises(ValueError, match="vectors=True"):
            zooscope.analyze(model, vectors=True, **refused)
    with pytest.raises(ValueError, match="vectors must be True or False"):
        zooscope.analyze(model, vectors="yes")
    assert zooscope.analyze(torch.nn.Linear(3, 2), vectors=True, plot=True, savefig=str(tmp_path)).empty  # no layer


@pytest.mark.parametrize("options", [{"fft": True}, {"pool": False, "conv2d_norm": False}, {"channels": "last"}])
def test_vectors_are_those_of_the_analysed_matrices(options):
    """The matrices read again for the eigenvectors are the analysed ones (rescaled, FFT'd, per slice): each row's
    eigenvalues are its ESD."""
    from zooscope.pipelines.analyze import AnalysisOptions, analyze_checkpoint
    from zooscope.pipelines.readers import open_checkpoint
    from zooscope.pipelines.vectors import layer_vectors

    opts = AnalysisOptions(min_evals=10, weightstats=False, **options)
    with open_checkpoint(_model()) as ckpt:
        result = analyze_checkpoint(ckpt, opts)
        rows = result.layers
        slices = rows["slice_id"].astype(int) if "slice_id" in rows else [None] * len(rows)
        vectors = layer_vectors(ckpt, opts, list(zip(rows["name"], slices)))
    assert len(vectors) == len(rows) == (11 if "pool" in options else 3)
    for vec, esd in zip(vectors, result.esd):
        np.testing.assert_allclose(vec.evals, esd, rtol=0, atol=1e-10 * esd.max())
