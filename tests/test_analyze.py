"""The per-model analysis pipeline: options, error rows, per-slice mode, randomize, node-strength chaining."""
import numpy as np
import pandas as pd
import pytest
import scipy.linalg

import zooscope
from zooscope.pipelines.analyze import AnalysisOptions, analyze_checkpoint, to_weightwatcher_frame
from zooscope.pipelines.summary import summarize_models
from zooscope.pipelines.readers import open_checkpoint
from zooscope.pipelines.result import merge_results


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.standard_t(3, (60, 30)), "fc1.bias": np.zeros(60),
        "fc2.weight": rng.standard_t(3, (40, 60)), "fc2.bias": np.zeros(40),
        "out.weight": rng.standard_t(3, (12, 40)),
    }


def test_eigenvalues_and_norms_against_scipy():
    sd = _mlp()
    result = analyze_checkpoint(open_checkpoint(sd), AnalysisOptions())
    for row, evals in zip(result.layers.itertuples(), result.esd):
        expected = np.sort(scipy.linalg.svdvals(sd[f"{row.name}.weight"]) ** 2)
        np.testing.assert_allclose(evals, expected, rtol=1e-12)
        assert row.log_norm == pytest.approx(np.log10(expected.sum()), rel=1e-12)
        assert row.num_evals == expected.size and row.Q == pytest.approx(row.N / row.M)
    assert result.n_params == sum(v.size for v in sd.values())


def test_bad_layer_becomes_an_error_row_and_others_go_on():
    sd = _mlp()
    sd["fc2.weight"][3, 4] = np.inf
    layers = analyze_checkpoint(open_checkpoint(sd), AnalysisOptions()).layers.set_index("name")
    assert layers.loc["fc2", "status"] == "error"
    assert "fc2.weight" in layers.loc["fc2", "error"] and "<in-memory dict>" in layers.loc["fc2", "error"]
    assert (layers.drop(index="fc2")["status"] == "ok").all()
    assert "fc2" not in set(to_weightwatcher_frame(layers.reset_index())["name"])


def test_per_slice_mode_gives_one_row_per_kernel_position():
    rng = np.random.default_rng(3)
    conv = rng.standard_normal((32, 16, 3, 3))
    pooled = analyze_checkpoint(open_checkpoint({"c.weight": conv}), AnalysisOptions()).layers
    sliced = analyze_checkpoint(open_checkpoint({"c.weight": conv}), AnalysisOptions(pool=False)).layers
    assert len(pooled) == 1 and pooled.loc[0, "rf"] == 9 and pooled.loc[0, "num_evals"] == 9 * 16
    assert list(sliced["slice_id"]) == list(range(9)) and (sliced["num_evals"] == 16).all()
    assert (sliced["rf"] == 9).all()  # the layer's receptive field on every slice row, as WeightWatcher reports
    counted = [summarize_models(t.assign(model="m"))["n_params"].item() for t in (pooled, sliced)]
    assert counted == [conv.size, conv.size]  # nine 32 x 16 slices are the layer's weights once
    # per-slice eigenvalues are scaled by kh*kw/2 = 4.5, pooled ones by 1/2 (WeightWatcher §3.4)
    top = scipy.linalg.svdvals(conv[:, :, 0, 0])[0] ** 2
    assert sliced.loc[0, "lambda_max"] == pytest.approx(4.5 * top, rel=1e-12)


def test_options_validate_and_follow_the_weightwatcher_version():
    assert AnalysisOptions().min_evals == 10 and AnalysisOptions(ww_version="0.7.7").min_evals == 8
    with pytest.raises(ValueError, match="ww_version"):
        AnalysisOptions(ww_version="0.6")
    with pytest.raises(ValueError, match="min_evals"):
        AnalysisOptions(min_evals=20000)
    with pytest.raises(TypeError, match="unknown option 'glorot_fx'"):
        zooscope.analyze(_mlp(), glorot_fx=True)
    # WeightWatcher's defaults (vectors=False, plot=False, ...) change nothing; ERG and ww2x are aliases
    plain = zooscope.analyze(_mlp(), detX=True)
    same = zooscope.analyze(_mlp(), ERG=True, glorot_fix=False, plot=False, vectors=False, tolerance=1e-6,
                            savefig="ww-img", sparsify=True)
    pd.testing.assert_frame_equal(plain, same)
    assert "slice_id" in zooscope.analyze(_mlp(), ww2x=True)
    # clip_xmax's parameters are store parameters only where they change results (older stores stay valid)
    assert "finger_thresh" not in AnalysisOptions(finger_thresh=2.0).as_params()
    assert "finger_thresh" not in AnalysisOptions(fix_fingers="clip_xmax").as_params()
    assert AnalysisOptions(fix_fingers="clip_xmax", finger_thresh=2.0).as_params()["finger_thresh"] == 2.0
    assert "tolerance" not in AnalysisOptions().as_params() and AnalysisOptions(tolerance=0.1).as_params()
    with pytest.raises(ValueError, match="tolerance"):
        AnalysisOptions(tolerance=-1.0)


def test_randomize_is_seeded_per_layer_and_independent_of_sharding():
    ckpt = open_checkpoint(_mlp())
    a = analyze_checkpoint(ckpt, AnalysisOptions(randomize=True, seed=1)).layers
    b = analyze_checkpoint(ckpt, AnalysisOptions(randomize=True, seed=1)).layers
    c = analyze_checkpoint(ckpt, AnalysisOptions(randomize=True, seed=2)).layers
    parts = merge_results([analyze_checkpoint(ckpt, AnalysisOptions(randomize=True, seed=1), keys=[k])
                           for k in ("fc1.weight", "fc2.weight", "out.weight")]).layers
    columns = ["rand_distance", "ww_softrank", "max_rand_eval", "rand_sigma_mp"]
    assert a[columns].equals(b[columns]) and a[columns].equals(parts[columns])
    assert not np.allclose(a["rand_distance"], c["rand_distance"])

    # shuffling the entries destroys a rank-one signal: the randomized top eigenvalue falls well below it
    rng = np.random.default_rng(0)
    spiked = rng.standard_normal((80, 40)) + 0.8 * np.outer(rng.standard_normal(80), rng.standard_normal(40))
    row = analyze_checkpoint(open_checkpoint({"s.weight": spiked}), AnalysisOptions(randomize=True)).layers
    assert row.loc[0, "ww_softrank"] < 0.5 and row.loc[0, "ww_maxdist"] > 0


def test_node_strength_correlation_chains_consecutive_layers():
    sd = _mlp(5)
    layers = analyze_checkpoint(open_checkpoint(sd), AnalysisOptions()).layers.set_index("name")
    expected = np.corrcoef(np.abs(sd["fc1.weight"]).sum(axis=1), np.abs(sd["fc2.weight"]).sum(axis=0))[0, 1]
    assert layers.loc["fc2", "ns_corr_prev"] == pytest.approx(expected, rel=1e-12)
    assert np.isnan(layers.loc["fc1", "ns_corr_prev"])
