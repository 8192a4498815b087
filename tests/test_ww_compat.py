"""zooscope.analyze against WeightWatcher (installed from PyPI, CPU) on small real torch models.

Tolerance: 1e-6 relative on every shared metric column (the issue's requirement; in practice the fp64
paths agree to ~1e-12). Layers are matched by module path (WeightWatcher's ``longname``).
"""
import logging

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
ww_module = pytest.importorskip("weightwatcher")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402

RTOL = 1e-6
METRICS = [
    "alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "lambda_max", "spectral_norm", "norm", "log_norm",
    "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "matrix_rank",
    "num_evals", "sv_max", "sv_min", "rank_loss", "weak_rank_loss", "rf",
]


def _mlp() -> torch.nn.Module:
    return heavy_tailed_(torch.nn.Sequential(
        torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 40),
    ), seed=1)


class _SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(400, 24)
        self.conv1 = torch.nn.Conv2d(3, 16, 3)
        self.conv2 = torch.nn.Conv2d(16, 64, 3)
        self.conv3 = torch.nn.Conv2d(64, 48, 2)
        self.head = torch.nn.Linear(48, 30)


def _cnn() -> torch.nn.Module:
    return heavy_tailed_(_SmallCNN(), seed=2)


def _weightwatcher(model: torch.nn.Module, **kwargs) -> pd.DataFrame:
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = ww_module.WeightWatcher(model=model)
    return watcher.analyze(min_evals=10, **kwargs).set_index("longname")


def _compare(ours: pd.DataFrame, theirs: pd.DataFrame, columns: list[str]) -> None:
    ours = ours.set_index("longname")
    assert set(ours.index) == set(theirs.index), (sorted(ours.index), sorted(theirs.index))
    for column in columns:
        a = ours.loc[theirs.index, column].to_numpy(dtype=float)
        b = theirs[column].to_numpy(dtype=float)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12, err_msg=column)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_default_columns_match_weightwatcher(make):
    model = make()
    theirs = _weightwatcher(model)
    ours = zooscope.analyze(model, ww_compat=True)
    _compare(ours, theirs, METRICS)
    assert list(ours["status"]) == list(theirs.loc[ours["longname"], "status"])
    assert list(ours["warning"]) == list(theirs.loc[ours["longname"], "warning"])
    # WeightWatcher numbers every module of named_modules(); so does the facade for an nn.Module.
    assert list(ours["layer_id"]) == list(theirs.loc[ours["longname"], "layer_id"])


def test_layer_ids_are_weightwatchers_and_unique_with_attention():
    """MultiheadAttention's in_proj_weight has no module of its own (WeightWatcher skips it, zooscope analyses
    it): it is numbered after the last module, every other layer as WeightWatcher numbers it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 32), torch.nn.TransformerEncoderLayer(32, 4, 64),
                                torch.nn.Linear(32, 11))
    theirs = _weightwatcher(model)
    ours = zooscope.analyze(model).set_index("longname")
    assert ours["layer_id"].is_unique
    assert list(ours.loc[theirs.index, "layer_id"]) == list(theirs["layer_id"])
    assert ours.loc["1.self_attn.in_proj", "layer_id"] == len(list(model.named_modules()))
    shifted = zooscope.analyze(model, start_ids=5).set_index("longname")
    assert list(shifted.loc[theirs.index, "layer_id"]) == list(_weightwatcher(model, start_ids=5)["layer_id"])


def test_per_slice_mode_matches_weightwatcher():
    """pool=False: one row per Conv2D kernel position (M = 16 eigenvalues on conv1, so 0.7.7's small-N fit)."""
    model = _cnn()
    theirs = _weightwatcher(model, pool=False).reset_index().set_index(["longname", "slice_id"])
    ours = zooscope.analyze(model, ww_compat=True, min_evals=10, pool=False, ww_version="0.7.7")
    ours = ours.set_index(["longname", "slice_id"])
    assert sorted(ours.index) == sorted(theirs.index) and len(ours) > 9
    for column in METRICS:
        np.testing.assert_allclose(ours.loc[theirs.index, column].to_numpy(float), theirs[column].to_numpy(float),
                                   rtol=RTOL, atol=1e-12, err_msg=column)


def test_conv_sv_min_is_the_global_minimum_without_ww_compat():
    """WeightWatcher's Conv2D sv_min is the largest slice minimum (ww_compat reproduces it, see above); the native
    value is the smallest singular value of the pooled, rescaled slices, from a direct SVD."""
    model = _cnn()
    ours = zooscope.analyze(model).set_index("longname")
    theirs = _weightwatcher(model)
    for name in ("conv1", "conv2", "conv3"):
        W = getattr(model, name).weight.detach().double().numpy()
        slices = W.reshape(W.shape[0], W.shape[1], -1).transpose(2, 0, 1) / np.sqrt(2)  # conv2d_norm, pooled
        smallest = min(np.linalg.svd(s, compute_uv=False).min() for s in slices)
        np.testing.assert_allclose(ours.loc[name, "sv_min"], smallest, rtol=1e-6)  # the checked route's bound
        assert ours.loc[name, "sv_min"] < theirs.loc[name, "sv_min"]


def test_summary_of_default_run_matches_weightwatcher():
    """The model-level plain means equal WeightWatcher's get_summary on the same details."""
    from zooscope.pipelines.summary import model_summary

    model = _cnn()
    watcher = ww_module.WeightWatcher(model=model)
    details = watcher.analyze(min_evals=10)
    theirs = watcher.get_summary(details)
    ours = model_summary(zooscope.analyze(model).assign(status=lambda d: np.where(
        d["status"] == "success", "ok", "failed")), mode="ww")
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), rel=RTOL), key


def test_optional_metric_groups_match_weightwatcher():
    """mp_fit and detX columns against WeightWatcher on the MLP (deterministic options only)."""
    model = _mlp()
    theirs = _weightwatcher(model, mp_fit=True, detX=True)
    ours = zooscope.analyze(model, mp_fit=True, detX=True, ww_compat=True)
    _compare(ours, theirs, ["num_spikes", "mp_softrank", "W_scale", "detX_num", "detX_val",
                            "detX_val_unrescaled", "num_ERG_spikes", "ERG_gap"])
    # sigma_mp comes from a Nelder–Mead polish; WeightWatcher's and ours stop within the optimiser's tolerance.
    _compare_loose = ours.set_index("longname").loc[theirs.index]
    np.testing.assert_allclose(_compare_loose["sigma_mp"], theirs["sigma_mp"], rtol=1e-3)
    np.testing.assert_allclose(_compare_loose["bulk_max"], theirs["bulk_max"], rtol=2e-3)


@pytest.mark.parametrize("options", [
    {}, dict(mp_fit=True), dict(randomize=True), dict(detX=True), dict(fix_fingers="clip_xmax"), dict(pool=False),
], ids=["default", "mp_fit", "randomize", "detX", "clip_xmax", "per-slice"])
def test_column_layout_matches_weightwatcher(options):
    """The same columns in the same order as WeightWatcher's details, for each option that adds columns."""
    model = _cnn()
    theirs = _weightwatcher(model, **options)
    ours = zooscope.analyze(model, ww_compat=True, min_evals=10, **options)
    assert [c for c in ours.columns if c != "longname"] == list(theirs.columns)  # theirs: longname is the index


def test_clip_xmax_parameters_match_weightwatcher():
    """finger_thresh (and max_fingers, which WeightWatcher only honours from half the eigenvalues up)."""
    model = _mlp()
    options = dict(fix_fingers="clip_xmax", finger_thresh=2.0, max_fingers=30)
    theirs = _weightwatcher(model, **options)
    ours = zooscope.analyze(model, ww_compat=True, **options)
    _compare(ours, theirs, ["alpha", "D", "xmin", "num_fingers", "raw_alpha"])
    default = zooscope.analyze(model, ww_compat=True, fix_fingers="clip_xmax").set_index("longname")
    assert (ours.set_index("longname")["num_fingers"] != default["num_fingers"]).any()


def test_tolerance_sets_weak_rank_loss_as_in_weightwatcher():
    model = _cnn()
    theirs = _weightwatcher(model, tolerance=5.0)  # counts eigenvalues in 4 of 5 layers
    ours = zooscope.analyze(model, ww_compat=True, tolerance=5.0)
    _compare(ours, theirs, ["weak_rank_loss"])
    default = zooscope.analyze(model, ww_compat=True).set_index("longname")["weak_rank_loss"]
    assert (ours.set_index("longname")["weak_rank_loss"] > default).any()


def test_failed_fit_is_nan_by_default_and_minus_one_in_compat_mode():
    """A layer whose eigenvalues all fall below WeightWatcher's 1e-5 threshold fails the fit."""
    model = torch.nn.Sequential(torch.nn.Linear(50, 40))
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
    theirs = _weightwatcher(model)
    native = zooscope.analyze(model)
    compat = zooscope.analyze(model, ww_compat=True)
    assert native.loc[0, "status"] == "failed" and np.isnan(native.loc[0, "alpha"])
    assert theirs["status"].iloc[0] == "failed"
    _compare(compat, theirs, ["alpha", "D", "xmin", "sigma", "num_pl_spikes", "alpha_weighted", "log_alpha_norm",
                              "log_norm"])
    assert compat.loc[0, "warning"] == theirs["warning"].iloc[0]
