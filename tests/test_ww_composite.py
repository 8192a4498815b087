"""WeightWatcher 0.7.7's composite layers, ``intra`` (consecutive-layer products, with and without ``sparsify``) and
``stacked`` (all layers in one matrix), against ``weightwatcher.WeightWatcher(model=m).analyze(...)`` on the same
torch modules, and against numpy where zooscope deliberately differs (docs/DIFFERENCES.md).

WeightWatcher reads torch weights as float32 and multiplies/standardises them in float32; here it is made to read
them as float64 (``torch_T_to_np`` patched), so both tools do the same arithmetic and agree to rounding.
Tolerance: 1e-6 relative (in practice ~1e-12); ``sv_min`` of rank-deficient matrices is noise, compared to 1e-12
absolute.
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
ww_impl = pytest.importorskip("weightwatcher.weightwatcher")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope.pipelines import composite  # noqa: E402
from zooscope.pipelines.analyze import AnalysisOptions  # noqa: E402
from zooscope.pipelines.layers import plan_layers  # noqa: E402
from zooscope.pipelines.readers import open_checkpoint  # noqa: E402

RTOL = 1e-6
nn = torch.nn
COLUMNS = ["layer_id", "N", "M", "rf", "num_evals", "alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes",
           "lambda_max", "sv_max", "sv_min", "rank_loss", "weak_rank_loss", "matrix_rank", "norm", "log_norm",
           "spectral_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy"]
OPTIONS = dict(min_evals=8, ww_version="0.7.7")  # WeightWatcher 0.7.7's small-N fit for the small layers


def _models():
    return {
        # every pair chains one way only: WeightWatcher's pairing is the composition of the two layers
        "mlp": nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 80), nn.Linear(80, 30), nn.Linear(30, 50)),
        "conv": nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 24, 3), nn.Conv2d(24, 40, 1), nn.Linear(40, 60),
                              nn.Linear(60, 30)),
        # square and repeated sizes: WeightWatcher multiplies them in another order (or by the wrong side)
        "square": nn.Sequential(nn.Linear(50, 50), nn.Linear(50, 50), nn.Linear(50, 30), nn.Linear(30, 50),
                                nn.Linear(50, 64)),
    }


@pytest.fixture(scope="module")
def models():
    return {name: heavy_tailed_(model, seed=i) for i, (name, model) in enumerate(_models().items())}


@pytest.fixture
def ww_fp64(monkeypatch):
    """WeightWatcher reading torch weights as float64 (it narrows them to float32 by default)."""
    monkeypatch.setattr(ww_impl, "torch_T_to_np", lambda T: T.to("cpu").double().numpy())
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)

    def run(model, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ww_module.WeightWatcher(model=model).analyze(min_evals=8, **kwargs)
    return run


def _compare(ours: pd.DataFrame, theirs: pd.DataFrame) -> None:
    assert len(ours) == len(theirs) > 0
    for column in COLUMNS:
        a, b = ours[column].to_numpy(dtype=float), theirs[column].to_numpy(dtype=float)
        atol = 1e-12 if column == "sv_min" else 0.0
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=column)
    assert list(ours["layer_type"]) == list(theirs["layer_type"])
    assert list(ours["warning"]) == list(theirs["warning"]) and list(ours["status"]) == list(theirs["status"])


def _layer_names(model) -> list[str]:
    return [info.name for info in plan_layers(open_checkpoint(model), min_evals=8) if info.skip_reason is None]


@pytest.mark.parametrize("name,ww_compat", [("mlp", False), ("mlp", True), ("conv", False), ("conv", True),
                                            ("square", True)])
def test_intra_matches_weightwatcher(models, ww_fp64, name, ww_compat):
    model = models[name]
    theirs = ww_fp64(model, intra=True, sparsify=False)
    ours = zooscope.analyze(model, intra=True, sparsify=False, ww_compat=ww_compat, **OPTIONS)
    _compare(ours, theirs)
    names = _layer_names(model)
    assert list(ours["name"]) == [f"{a} X {b}" for a, b in zip(names, names[1:])]  # every consecutive pair chains
    assert ours["Xflag"].all() and theirs["Xflag"].all()


def test_intra_default_is_the_composition_where_weightwatcher_pairs_otherwise(models, ww_fp64):
    """On square/repeated sizes WeightWatcher multiplies A·B (or A'·B) instead of the composition B·A: zooscope's
    ESD is the singular values of B·A/(‖A‖‖B‖), the largest (second layer's M) of them (numpy SVD)."""
    model = models["square"]
    result, ours = zooscope._analyze(model, intra=True, sparsify=False, **OPTIONS)
    weights = [m.weight.detach().double().numpy() for m in model]
    for i, (A, B) in enumerate(zip(weights, weights[1:])):
        sv = np.linalg.svd(B @ A / (np.linalg.norm(A) * np.linalg.norm(B)), compute_uv=False)
        expected = np.sort(sv)[-min(B.shape):]
        np.testing.assert_allclose(result.esd[i], expected, rtol=RTOL)
        assert ours.loc[i, "N"] == max(B.shape[0], A.shape[1]) and ours.loc[i, "M"] == min(B.shape[0], A.shape[1])
    theirs = ww_fp64(model, intra=True, sparsify=False)
    assert not np.allclose(ours["alpha"], theirs["alpha"], rtol=1e-3)  # the quirk is real, and only under ww_compat


@pytest.mark.parametrize("ww_compat", [False, True])
def test_intra_sparsify_matches_weightwatcher_given_the_same_masks(models, ww_fp64, monkeypatch, ww_compat):
    """WeightWatcher draws its 0/1 masks from the unseeded global ``np.random.randint``; fed zooscope's seeded
    masks (transposed for the composition order B·S·A, WeightWatcher computing Aᵀ·S·Bᵀ), the numbers agree."""
    model = models["mlp"]
    infos = [i for i in plan_layers(open_checkpoint(model), min_evals=8) if i.skip_reason is None]
    seed = 5
    masks = [composite.sparsify_mask((seed, a.layer_id, b.layer_id), a.shape[0])  # side: a's out = b's in
             for a, b in zip(infos, infos[1:])]
    served = iter(m if ww_compat else m.T for m in masks)
    monkeypatch.setattr(np.random, "randint", lambda high, size: next(served).astype(int).ravel())
    theirs = ww_fp64(model, intra=True)  # sparsify=True is WeightWatcher's default
    assert next(served, None) is None  # one mask per pair, all used
    ours = zooscope.analyze(model, intra=True, seed=seed, ww_compat=ww_compat, **OPTIONS)
    _compare(ours, theirs)
    plain = zooscope.analyze(model, intra=True, sparsify=False, **OPTIONS)
    assert not np.allclose(ours["lambda_max"], plain["lambda_max"])
    again = zooscope.analyze(model, intra=True, seed=seed, ww_compat=ww_compat, **OPTIONS)
    pd.testing.assert_frame_equal(ours, again)  # seeded: the same masks every run


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_stacked_matches_weightwatcher_with_ww_compat(models, ww_fp64, name):
    theirs = ww_fp64(models[name], stacked=True)
    ours = zooscope.analyze(models[name], stacked=True, ww_compat=True, **OPTIONS)
    _compare(ours, theirs)
    assert list(ours["name"]) == ["stacked"] and list(theirs["name"]) == ["Stacked Layer"]


def test_stacked_keeps_every_eigenvalue_by_default(models, ww_fp64):
    """WeightWatcher keeps only as many eigenvalues of the stacked matrix as its first layer has (``num_components``
    copied from that layer); zooscope keeps all M, whose largest are WeightWatcher's."""
    model = models["mlp"]
    result, ours = zooscope._analyze(model, stacked=True, **OPTIONS)
    compat, theirs = zooscope._analyze(model, stacked=True, ww_compat=True, **OPTIONS)
    assert ours.loc[0, "num_evals"] == ours.loc[0, "M"] == 80 and theirs.loc[0, "num_evals"] == 40
    np.testing.assert_allclose(result.esd[0][-40:], compat.esd[0], rtol=1e-12)
    np.testing.assert_allclose(ours.loc[0, "lambda_max"], ww_fp64(model, stacked=True).loc[0, "lambda_max"],
                               rtol=RTOL)
    # where the first layer is the widest, nothing is dropped and the default is WeightWatcher's
    wide = heavy_tailed_(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 48)), seed=7)
    _compare(zooscope.analyze(wide, stacked=True, **OPTIONS), ww_fp64(wide, stacked=True))


def test_composite_options_are_validated_and_recorded():
    with pytest.raises(ValueError, match="cannot be combined"):
        AnalysisOptions(intra=True, stacked=True)
    with pytest.raises(ValueError, match="randomize"):
        AnalysisOptions(intra=True, randomize=True)
    with pytest.raises(ValueError, match="'stacked'"):
        AnalysisOptions(stacked=1)
    with pytest.raises(ValueError, match="plot=True"):
        zooscope.analyze(nn.Linear(20, 30), deltas=True)
    assert not {"intra", "stacked", "sparsify"} & set(AnalysisOptions(sparsify=False).as_params())
    assert AnalysisOptions(intra=True).as_params()["sparsify"] is True
    assert AnalysisOptions(stacked=True).as_params()["stacked"] is True


def test_a_bad_layer_makes_its_composite_rows_errors():
    rng = np.random.default_rng(0)
    weights = {f"l{i}.weight": rng.standard_t(3, size=(30, 30)) for i in range(3)}
    weights["l1.weight"][2, 3] = np.nan
    intra = zooscope.analyze(weights, intra=True, sparsify=False)
    assert len(intra) == 0  # both pairs contain l1: error rows, which the WeightWatcher frame drops
    from zooscope.pipelines.analyze import analyze_checkpoint

    rows = analyze_checkpoint(open_checkpoint(weights), AnalysisOptions(intra=True)).layers
    assert list(rows["status"]) == ["error", "error"] and rows["error"].str.contains("l1.weight").all()
    rows = analyze_checkpoint(open_checkpoint(weights), AnalysisOptions(stacked=True)).layers
    assert list(rows["status"]) == ["error"] and "NaN" in rows.loc[0, "error"]


def test_scan_stores_the_composite_rows_of_analyze(tmp_path):
    """``zooscope scan --intra`` (and ``--stacked``) store what ``analyze`` computes, with the options recorded as
    store parameters; composite layers span the model, so they refuse sharding."""
    from safetensors.numpy import save_file

    from zooscope.cli import main
    from zooscope.engine.scan import ScanUsageError, scan
    from zooscope.engine.store import ZooStore
    from zooscope.pipelines.analyze import analyze_path

    rng = np.random.default_rng(3)
    paths = []
    for i in range(2):
        widths = (36 + 4 * i, 40, 24, 32)
        weights = {f"fc{j}.weight": (rng.standard_t(3, size=(n, m)) / np.sqrt(m)).astype(np.float32)
                   for j, (m, n) in enumerate(zip(widths[:-1], widths[1:]))}
        paths.append(tmp_path / "zoo" / f"m{i}.safetensors")
        paths[-1].parent.mkdir(exist_ok=True)
        save_file(weights, str(paths[-1]))
    same_route = dict(fit_backend="numba")  # the scan's power-law route
    for flags, options in ((["--intra"], AnalysisOptions(intra=True, **same_route)),
                           (["--stacked"], AnalysisOptions(stacked=True, **same_route))):
        store = str(tmp_path / f"{flags[0][2:]}.zarr")
        assert main(["scan", str(tmp_path / "zoo"), "--store", store, "--cluster", "none", "--no-progress",
                     *flags]) == 0
        with ZooStore.open(store) as zoo:
            params = zoo.params
            assert (params.get("intra", False), params.get("stacked", False)) == (options.intra, options.stacked)
            models, layers = zoo.models(), zoo.layers()
            for model_row, model in models.iterrows():
                direct = analyze_path(str(paths[int(model["model_id"][-1])]), options)
                mine = layers[layers["model_row"] == model_row]
                assert list(mine["name"]) == list(direct.layers["name"])
                for column in ("alpha", "D", "xmin", "lambda_max", "N", "M", "num_evals"):
                    np.testing.assert_array_equal(mine[column].to_numpy(float),
                                                  direct.layers[column].to_numpy(float), column)
                for layer_row, evals in zip(mine.index, direct.esd):
                    np.testing.assert_array_equal(zoo.esd(layer_row), evals)
        assert list(mine["name"]) == (["fc0 X fc1", "fc1 X fc2"] if options.intra else ["stacked"])
        with pytest.raises(ScanUsageError, match="intra|stacked"):  # the store's parameters differ
            scan([tmp_path / "zoo"], store, progress=False)
    with pytest.raises(ScanUsageError, match="shard_bytes"):
        scan([tmp_path / "zoo"], tmp_path / "sharded.zarr", options=AnalysisOptions(intra=True), shard_bytes=1000,
             progress=False)
