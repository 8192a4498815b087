"""WeightWatcher's options that change which matrices are analysed: ``conv2d_fft``, ``fft``, ``channels`` and
``inverse``, against ``weightwatcher`` 0.7.7 on the same torch module, through ``zooscope.analyze``, the batch
engine, ``zooscope scan`` and the CLI.

Tolerance against WeightWatcher: 1e-6 relative on every spectral column. WeightWatcher reads weights as float32
and NumPy 2 keeps float32 in ``np.fft.fft2`` (complex64), while zooscope transforms in fp64: on this model the
FFT options differ from stock WeightWatcher by at most 6e-7 (``D``; 2e-6 on ``alpha`` with ``inverse``); fed the
weights in fp64 (``torch_T_to_np`` patched) WeightWatcher agrees to 1e-13. WeightWatcher 0.7.7 crashes on
``fft=True`` (``ww_layer.skippe``, a typo) and on any ``channels`` (``channels(channels, str)``); ``fft`` is
compared with the typo patched, ``channels`` with a closed form (the same weights stored in PyTorch's layout).
"""
import contextlib
import io
import logging
import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
ww_module = pytest.importorskip("weightwatcher")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope import _analyze  # noqa: E402
from zooscope.cli import main  # noqa: E402
from zooscope.engine.store import ZooStore  # noqa: E402
from zooscope.pipelines.analyze import AnalysisOptions, analyze_checkpoint  # noqa: E402
from zooscope.pipelines.batch import analyze_batch  # noqa: E402
from zooscope.pipelines.readers import CheckpointError, open_checkpoint  # noqa: E402

RTOL = 1e-6
COLUMNS = ["N", "M", "rf", "num_evals", "alpha", "D", "xmin", "sigma", "num_pl_spikes", "lambda_max", "log_norm",
           "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "matrix_rank",
           "sv_max", "sv_min", "rank_loss", "weak_rank_loss"]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """Square and rectangular kernels (min(kh, kw) differs from kh·kw), and two dense layers."""
    return heavy_tailed_(torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 24, 5), torch.nn.Conv2d(24, 20, (3, 5)),
        torch.nn.Flatten(), torch.nn.Linear(40, 30), torch.nn.Linear(30, 64),
    ), seed=1)


def _weightwatcher(model, monkeypatch, *, fp64: bool, **kwargs) -> pd.DataFrame:
    """WeightWatcher 0.7.7's frame; ``fp64``: its weights read as float64 instead of float32."""
    if fp64:
        monkeypatch.setattr(ww_module.weightwatcher, "torch_T_to_np", lambda t: t.to("cpu").double().numpy())
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww_module.WeightWatcher(model=model).analyze(**kwargs).set_index("longname")


def _compare(ours: pd.DataFrame, theirs: pd.DataFrame) -> None:
    ours = ours.set_index("longname")
    assert sorted(ours.index) == sorted(theirs.index)
    for column in COLUMNS:
        np.testing.assert_allclose(ours.loc[theirs.index, column].to_numpy(dtype=float),
                                   theirs[column].to_numpy(dtype=float), rtol=RTOL, atol=0, err_msg=column)


def _ours(model, **kwargs) -> pd.DataFrame:
    return zooscope.analyze(model, ww_version="0.7.7", ww_compat=True, **kwargs)


# ------------------------------------------------------------------------------- conv2d_fft, fft against WeightWatcher


@pytest.mark.parametrize("fp64", [False, True], ids=["stock", "fp64-weights"])
@pytest.mark.parametrize("options", [dict(conv2d_fft=True), dict(conv2d_fft=True, max_evals=100)],
                         ids=["conv2d_fft", "max_evals"])  # max_evals: Conv2D layers are filtered by N only
def test_conv2d_fft_matches_weightwatcher(net, monkeypatch, fp64, options):
    theirs = _weightwatcher(net, monkeypatch, fp64=fp64, **options)
    assert set(theirs["rf"]) == {1.0} and len(theirs) == 5
    _compare(_ours(net, **options), theirs)


@pytest.mark.parametrize("options", [dict(fft=True), dict(fft=True, conv2d_fft=True), dict(fft=True, min_evals=30)],
                         ids=["fft", "fft+conv2d_fft", "fft-filter"])  # fft filters pooled Conv2D layers on M
def test_fft_matches_weightwatcher_with_its_typo_fixed(net, monkeypatch, options):
    with pytest.raises(AttributeError, match="skippe"):  # WeightWatcher 0.7.7 cannot run it at all
        _weightwatcher(net, monkeypatch, fp64=True, **options)
    monkeypatch.setattr(ww_module.weightwatcher.WWLayer, "skippe", property(lambda layer: layer.skipped),
                        raising=False)
    theirs = _weightwatcher(net, monkeypatch, fp64=True, **options)
    assert len(theirs) == (2 if "min_evals" in options else 5)
    _compare(_ours(net, **options), theirs)


def test_describe_plans_conv2d_fft_layers_as_weightwatcher(net):
    theirs = ww_module.WeightWatcher(model=net).describe(conv2d_fft=True, max_evals=100).set_index("longname")
    ours = zooscope.describe(net, conv2d_fft=True, max_evals=100).set_index("name")
    ours = ours[ours["skip_reason"] == ""]
    assert sorted(ours.index) == sorted(theirs.index)
    for column in ("N", "M", "rf", "num_evals"):
        assert ours.loc[theirs.index, column].tolist() == theirs[column].tolist(), column
    assert ours.loc["0", "n_slices"] == 16 * 32  # one 32 x 32 FFT matrix per (out, in) kernel


def test_conv2d_fft_matrices_are_the_real_parts_of_the_padded_kernel_ffts():
    """The ESD from first principles: numpy's FFT of each zero-padded kernel, scipy's singular values."""
    import scipy.linalg

    w = np.random.default_rng(0).standard_normal((6, 4, 3, 2))
    result = analyze_checkpoint(open_checkpoint({"c.weight": w}), AnalysisOptions(conv2d_fft=True, min_evals=8))
    padded = np.zeros((6, 4, 32, 32))
    padded[:, :, :3, :2] = w
    sv = np.concatenate([scipy.linalg.svdvals(np.fft.fft2(k).real) for k in padded.reshape(-1, 32, 32)])
    expected = np.sort(0.5 * sv**2)[-2 * 6 * 4:]  # the min(kh, kw)·N·M largest, conv2d_norm's 1/2
    np.testing.assert_allclose(result.esd[0], expected, rtol=1e-10)
    assert result.layers.loc[0, ["N", "M", "rf", "num_evals"]].tolist() == [6, 4, 1, 48]


# ------------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("options", [dict(inverse=True), dict(inverse=True, conv2d_fft=True),
                                     dict(inverse=True, fft=True, tolerance=1e-2)],
                         ids=["inverse", "inverse+conv2d_fft", "inverse+fft"])
def test_inverse_with_ww_compat_matches_weightwatcher(net, monkeypatch, options):
    if options.get("fft"):
        monkeypatch.setattr(ww_module.weightwatcher.WWLayer, "skippe", property(lambda layer: layer.skipped),
                            raising=False)
    _compare(_ours(net, **options), _weightwatcher(net, monkeypatch, fp64=True, **options))


@pytest.mark.parametrize("options", [dict(intra=True, sparsify=False), dict(stacked=True)], ids=["intra", "stacked"])
def test_inverse_of_composite_rows_matches_weightwatcher(monkeypatch, options):
    mlp = heavy_tailed_(torch.nn.Sequential(torch.nn.Linear(80, 60), torch.nn.Linear(60, 50),
                                            torch.nn.Linear(50, 30)), seed=1)
    theirs = _weightwatcher(mlp, monkeypatch, fp64=True, inverse=True, **options)
    ours = _ours(mlp, inverse=True, **options)
    for column in COLUMNS:
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), rtol=RTOL,
                                   err_msg=column)


@pytest.mark.parametrize("pool", [True, False])
def test_inverse_inverts_every_eigenvalue(net, pool):
    """Without ww_compat every slice is inverted once (WeightWatcher inverts a pooled Conv2D slice b of B
    B - b times); singular-value columns stay those of W, weak_rank_loss counts the inverse ESD."""
    plain, _ = _analyze(net, pool=pool, tolerance=1e-2)
    inverse, frame = _analyze(net, pool=pool, tolerance=1e-2, inverse=True)
    for lam, inv in zip(plain.esd, inverse.esd):
        np.testing.assert_allclose(inv, np.sort(1 / lam), rtol=1e-15)
    expected = [np.count_nonzero(1 / lam < 1e-2) for lam in plain.esd]
    assert inverse.layers["weak_rank_loss"].tolist() == expected and max(expected) > 0
    for column in ("sv_max", "sv_min", "rank_loss", "N", "M", "num_evals"):
        assert inverse.layers[column].equals(plain.layers[column]), column
    assert frame["lambda_max"].to_numpy() == pytest.approx([1 / lam[0] for lam in plain.esd], rel=1e-15)


def test_inverse_of_a_singular_layer_is_an_error_row_naming_file_and_layer():
    rng = np.random.default_rng(2)
    singular = rng.standard_normal((40, 20))
    singular[:, 3] = 0.0
    weights = {"a.weight": rng.standard_normal((40, 20)), "b.weight": singular}
    layers = analyze_checkpoint(open_checkpoint(weights), AnalysisOptions(inverse=True)).layers.set_index("name")
    assert layers.loc["a", "status"] == "ok" and layers.loc["b", "status"] == "error"
    assert "'b.weight'" in layers.loc["b", "error"] and "singular" in layers.loc["b", "error"]
    assert list(zooscope.analyze(weights, inverse=True)["name"]) == ["a"]


# ------------------------------------------------------------------------------- channels


def _keras_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Conv kernels as Keras stores them: (out, in, kh, kw) -> (kh, kw, in, out), (out, in, k) -> (k, in, out)."""
    axes = {3: (2, 1, 0), 4: (2, 3, 1, 0)}
    return {k: np.ascontiguousarray(v.transpose(axes[v.ndim])) if v.ndim in axes else v for k, v in state.items()}


@pytest.fixture(scope="module")
def conv_state() -> dict[str, np.ndarray]:
    model = heavy_tailed_(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 7), torch.nn.Conv1d(12, 20, 5),
                                              torch.nn.Conv2d(16, 32, (3, 5)), torch.nn.Linear(30, 50)), seed=3)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_channels_first_reads_keras_layout_kernels(conv_state, tmp_path):
    """A Keras-layout npz with channels='first' gives every column of the PyTorch-layout weights (node strengths
    included); channels='last' is the default layout."""
    path = tmp_path / "keras_layout.npz"
    np.savez(path, **_keras_layout(conv_state))
    reference = analyze_checkpoint(open_checkpoint(conv_state), AnalysisOptions(min_evals=8)).layers
    keras = analyze_checkpoint(open_checkpoint(str(path)), AnalysisOptions(min_evals=8, channels="first")).layers
    assert reference["layer_type"].tolist() == ["conv2d", "conv1d", "conv2d", "dense"]
    assert reference["ns_mean"].notna().all()
    pd.testing.assert_frame_equal(keras, reference, check_exact=False, rtol=1e-12)
    untransposed = analyze_checkpoint(open_checkpoint(str(path)), AnalysisOptions(min_evals=8)).layers
    assert not untransposed.set_index("name").loc["0", ["N", "M"]].equals(
        reference.set_index("name").loc["0", ["N", "M"]])  # without the option a Keras kernel is misread
    last = zooscope.analyze(conv_state, channels="last", min_evals=8)
    pd.testing.assert_frame_equal(last, zooscope.analyze(conv_state, min_evals=8))
    half = tmp_path / "half.npz"  # a Keras-layout base: W - W/2 read through the delta checkpoint
    np.savez(half, **{k: v / 2 for k, v in _keras_layout(conv_state).items()})
    delta = zooscope.analyze(str(path), base_model=str(half), channels="first", min_evals=8)
    np.testing.assert_allclose(delta["lambda_max"], reference["lambda_max"] / 4, rtol=1e-12)
    described = zooscope.describe(str(path), channels="first", min_evals=8).set_index("name")
    assert described.loc["0", "shape"] == (3, 3, 7, 7) and described.loc["1", "shape"] == (20, 12, 5)


def test_channels_must_match_a_format_that_knows_its_layout(net, monkeypatch):
    with pytest.raises(CheckpointError, match="channels='first' contradicts the module format"):
        zooscope.analyze(net, channels="first")
    pd.testing.assert_frame_equal(zooscope.analyze(net, channels="last"), zooscope.analyze(net))
    with pytest.raises(TypeError, match="not callable"):  # WeightWatcher 0.7.7's set_channels bug
        _weightwatcher(net, monkeypatch, fp64=False, channels="last")


# ------------------------------------------------------------------------------- options, batches, scan, CLI


def test_options_validate_and_are_store_parameters_only_when_set():
    assert AnalysisOptions().as_params() == AnalysisOptions(channels=None, inverse=False).as_params()
    assert not {"conv2d_fft", "fft", "channels", "inverse"} & AnalysisOptions().as_params().keys()
    params = AnalysisOptions(conv2d_fft=True, fft=True, channels="first", inverse=True).as_params()
    assert (params["conv2d_fft"], params["fft"], params["channels"], params["inverse"]) == (True, True, "first", True)
    with pytest.raises(ValueError, match="'channels'.*'first', 'last'"):
        AnalysisOptions(channels="FIRST")
    with pytest.raises(ValueError, match="needs pool=True"):  # as WeightWatcher's valid_params
        zooscope.analyze({"w": np.ones((3, 3))}, conv2d_fft=True, pool=False)
    with pytest.raises(ValueError, match="randomize"):
        AnalysisOptions(conv2d_fft=True, randomize=True)
    with pytest.raises(ValueError, match="'inverse'"):
        AnalysisOptions(inverse="yes")


def test_batches_keep_fft_layers_apart_from_same_shaped_slices():
    """A Conv2D 3x3 kernel's FFT stack (9 matrices of 32 x 32) and a Conv1d(32, 32, 9)'s slices share a shape
    bucket and a depth: each layer and each model of a batch gets what it gets alone."""
    rng = np.random.default_rng(4)
    models = [{"c.weight": rng.standard_t(3, (3, 3, 7, 7)), "s.weight": rng.standard_t(3, (32, 32, 9)),
               "d.weight": rng.standard_t(3, (64, 32))} for _ in range(3)]
    options = AnalysisOptions(conv2d_fft=True, inverse=True, weightstats=False, fit_backend="numba")
    batch = analyze_batch([(m, None) for m in models], options).result
    alone = [analyze_checkpoint(open_checkpoint(m), options, keys=[k]) for m in models for k in m]
    assert batch.layers["num_evals"].tolist() == [7 * 9, 32 * 9, 32] * 3
    for i, single in enumerate(alone):
        np.testing.assert_array_equal(batch.esd[i], single.esd[0])
        cols = ["alpha", "D", "sv_min", "rank_loss", "log_norm"]
        np.testing.assert_array_equal(batch.layers.loc[i, cols].to_numpy(float), single.layers.loc[0, cols])


def test_scan_and_cli_take_the_options(conv_state, tmp_path, capsys):
    path = tmp_path / "m.npz"
    np.savez(path, **_keras_layout(conv_state))
    flags = ["--channels", "first", "--conv2d-fft", "--inverse", "--min-evals", "8"]
    assert main(["scan", str(path), "--store", str(tmp_path / "s.zarr"), "--cluster", "none", "--no-progress",
                 *flags]) == 0
    expected = zooscope.analyze(str(path), channels="first", conv2d_fft=True, inverse=True, min_evals=8)
    with ZooStore.open(tmp_path / "s.zarr") as store:
        assert {k: store.params[k] for k in ("channels", "conv2d_fft", "inverse")} == \
            {"channels": "first", "conv2d_fft": True, "inverse": True}
    stored = zooscope.open(str(tmp_path / "s.zarr")).layers.set_index("name")
    np.testing.assert_allclose(stored.loc[expected["name"], "alpha"], expected["alpha"], rtol=1e-12)
    assert main(["analyze", str(path), "--out", str(tmp_path / "a.csv"), *flags]) == 0
    written = pd.read_csv(tmp_path / "a.csv")
    np.testing.assert_allclose(written["alpha"], expected["alpha"], rtol=1e-12)
    assert main(["analyze", str(path), "--conv2d-fft", "--slices"]) == 2
    assert "pool=True" in capsys.readouterr().err
