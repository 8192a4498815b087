"""Options are validated up front (scikit-learn style messages), backends are not store parameters, the seed
reaches the bootstrap, ``regress`` takes the latest versions and ``zooscope.scan`` needs a store."""
import numpy as np
import pandas as pd
import pytest

import zooscope
from zooscope.cli import main
from zooscope.engine.store import ZooStore
from zooscope.kernels import powerlaw
from zooscope.kernels.backends import cupy_available
from zooscope.pipelines.analyze import AnalysisOptions, analyze_checkpoint
from zooscope.pipelines.readers import open_checkpoint
from zooscope.pipelines.regress import regress


@pytest.mark.parametrize("option, value, accepted", [
    ("esd_backend", "bogus", "'numpy-svd'"),
    ("esd_backend", "cupy", "'auto'"),
    ("precision", "fp128", "'fp64', 'fp32'"),
    ("fit_backend", "cud", "'numpy', 'numba', 'cuda'"),
    ("pl_mode", "wwfit", "'ww', 'powerlaw'"),
    ("ww_version", "0.7.9", "'0.7.5', '0.7.7'"),
    ("hist_bins", -3, "integer >= 1"),
    ("hist_bins", 0, "integer >= 1"),
    ("hist_bins", 2.5, "integer >= 1"),
    ("bootstrap", -1, "integer >= 0"),
    ("bootstrap", True, "integer >= 0"),
    ("seed", -4, "integer >= 0"),
    ("seed", "7", "integer >= 0"),
    ("max_evals", "big", "integer >= 1"),
    ("min_evals", 0, "integer >= 1"),
    ("mp_fit", "yes", "True or False"),
    ("tolerance", -1e-6, "number >= 0"),
])
def test_bad_option_names_option_value_and_accepted_values(option, value, accepted):
    with pytest.raises(ValueError) as err:
        AnalysisOptions(**{option: value})
    text = str(err.value)
    assert f"'{option}'" in text and repr(value) in text and accepted in text


def test_hist_bins_zero_is_accepted_without_weightstats():
    assert AnalysisOptions(weightstats=False, hist_bins=0).hist_bins == 0


def test_backends_are_not_store_parameters_and_old_stores_stay_openable(tmp_path):
    params = AnalysisOptions(fit_backend="numpy", esd_backend="scipy-gesdd").as_params()
    assert not {"esd_backend", "fit_backend", "esd_table"} & params.keys()
    assert params == AnalysisOptions().as_params()
    old = {**params, "esd_backend": "auto", "fit_backend": "numba"}  # what stores recorded before
    ZooStore.open(tmp_path / "old.zarr", "a", params=old).close()
    with ZooStore.open(tmp_path / "old.zarr", "a", params=params) as store:
        assert store.params["fit_backend"] == "numba"
    with pytest.raises(ValueError, match="seed"):  # a real parameter still differs
        ZooStore.open(tmp_path / "old.zarr", "a", params={**params, "seed": 1})


@pytest.mark.skipif(cupy_available(), reason="needs a machine without CuPy")
@pytest.mark.parametrize("flags, option", [(["--esd-backend", "cupy-svd"], "esd_backend"),
                                           (["--fit-backend", "cuda"], "fit_backend")])
def test_cli_analyze_unavailable_backend_is_one_line_exit_2(tmp_path, capsys, flags, option):
    path = tmp_path / "m.npz"
    np.savez(path, w=np.random.default_rng(0).standard_normal((30, 20)))
    assert main(["analyze", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"'{option}'" in err


def test_cli_scan_bad_option_exit_2_before_the_store_exists(tmp_path, capsys):
    path = tmp_path / "m.npz"
    np.savez(path, w=np.ones((30, 20)))
    assert main(["scan", str(path), "--store", str(tmp_path / "s.zarr"), "--seed", "-1"]) == 2
    assert "'seed'" in capsys.readouterr().err and not (tmp_path / "s.zarr").exists()


def _heavy(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"l{i}.weight": rng.standard_t(3, size=(120, 80)) for i in range(2)}


def test_seed_reaches_the_bootstrap():
    weights = _heavy(0)

    def run(seed):
        with open_checkpoint(weights) as ckpt:
            return analyze_checkpoint(ckpt, AnalysisOptions(bootstrap=12, seed=seed, weightstats=False))

    a, b, c = run(5), run(5), run(6)
    cols = ["p_value", "alpha_ci_low", "alpha_ci_high"]
    assert np.isfinite(a.layers[cols].to_numpy()).all()
    pd.testing.assert_frame_equal(a.layers[cols], b.layers[cols])
    assert not a.layers[cols].equals(c.layers[cols])
    # the reference: the kernel's own fit of the same eigenvalues with that seed, on the route the analysis took
    ref = powerlaw.fit(a.esd[1], backend=a.layers.loc[1, "fit_backend"], bootstrap=12, seed=5)
    assert (ref.p_value, ref.alpha_ci_low, ref.alpha_ci_high) == tuple(a.layers.loc[1, cols])


def test_regress_uses_the_latest_version_unless_told_otherwise():
    rng = np.random.default_rng(1)
    n = 8
    latest = pd.DataFrame({"model_id": [f"m{i}" for i in range(n)], "version": 2,
                           "alpha": rng.uniform(2, 6, n)})
    latest["top1_error"] = 3 * latest["alpha"] + rng.normal(0, 0.1, n)
    older = latest.assign(version=1, top1_error=rng.uniform(0, 100, n))
    table = pd.concat([older, latest], ignore_index=True)
    got = regress(table, "top1_error", by=(), metrics=["alpha"], n_boot=0)
    ref = regress(latest, "top1_error", by=(), metrics=["alpha"], n_boot=0)
    assert got.groups["n"].item() == n and got.groups["r2"].item() == ref.groups["r2"].item()
    assert any("latest version" in m for m in got.messages)
    every = regress(table, "top1_error", by=(), metrics=["alpha"], n_boot=0, all_versions=True)
    assert every.groups["n"].item() == 2 * n


def test_scan_facade_requires_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "m.npz", w=np.ones((30, 20)))
    with pytest.raises(TypeError, match="store"):
        zooscope.scan([tmp_path / "m.npz"])
    assert not (tmp_path / "zoo.zarr").exists()


@pytest.mark.parametrize("argv, flag", [
    (["analyze", "m.npz", "--limit", "-1"], "--limit"),
    (["show", "s.zarr", "--limit", "x"], "--limit"),
    (["scan", "m.npz", "--store", "s.zarr", "--commit-seconds", "-1"], "--commit-seconds"),
    (["scan", "m.npz", "--store", "s.zarr", "--commit-seconds", "nan"], "--commit-seconds"),
    (["scan", "m.npz", "--store", "s.zarr", "--workers", "0"], "--workers"),
    (["regress", "s.zarr", "--y", "a", "--out", "r", "--n-boot", "-5"], "--n-boot"),
    (["regress", "s.zarr", "--y", "a", "--out", "r", "--min-models", "2"], "--min-models"),
])
def test_cli_numbers_checked_when_parsed(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as code:
        main(argv)
    err = capsys.readouterr().err
    assert code.value.code == 2 and flag in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()
