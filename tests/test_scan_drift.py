"""A scan of a manifest with an ``init`` column stores distance-from-initialization rows in ``/drift``."""
import numpy as np
import pandas as pd
from safetensors.numpy import save_file

import zooscope
from zooscope.kernels.drift import rmsd
from zooscope.pipelines.drift import drift_table


def _write_run(tmp_path, rng):
    w0 = {"fc1.weight": rng.uniform(-0.3, 0.3, (40, 20)), "fc2.weight": rng.uniform(-0.3, 0.3, (12, 40))}
    rows = []
    for step, scale in [(0, 0.0), (5, 0.05), (50, 0.2)]:
        weights = {k: v + scale * rng.standard_normal(v.shape) for k, v in w0.items()}
        save_file(weights, str(tmp_path / f"e{step}.safetensors"))
        rows.append({"path": f"e{step}.safetensors", "model_id": f"run-e{step}", "init": "run-e0", "step": step})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return w0


def test_scan_stores_drift_and_a_rerun_adds_none(tmp_path):
    rng = np.random.default_rng(0)
    _write_run(tmp_path, rng)
    store = tmp_path / "zoo.zarr"
    report = zooscope.scan(manifest=tmp_path / "manifest.csv", store=store, cluster="none", progress=False)
    assert report.n_ok == 3 and report.n_drift == 2

    drift = zooscope.open(str(store)).drift
    assert set(drift["model_id"]) == {"run-e5", "run-e50"}
    assert set(drift["layer"]) == {"fc1", "fc2", "all"}
    expected = drift_table(str(tmp_path / "e0.safetensors"), str(tmp_path / "e50.safetensors"),
                           model_id="run-e50", init_model_id="run-e0", step=50)
    got = drift[drift["model_id"] == "run-e50"].set_index("layer").loc[expected["layer"]]
    for column in ("rmsd", "a0", "a1", "c_opt"):
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column].to_numpy(float), rtol=1e-12)
    # RMSD grows with the perturbation scale, as the checkpoints were built.
    rm = drift[drift["layer"] == "all"].set_index("step")["rmsd"]
    assert rm.loc[5] < rm.loc[50]

    again = zooscope.scan(manifest=tmp_path / "manifest.csv", store=store, cluster="none", progress=False)
    assert again.n_drift == 0 and len(zooscope.open(str(store)).drift) == len(drift)


def test_drift_all_row_is_rmsd_over_every_weight(tmp_path):
    rng = np.random.default_rng(1)
    w0 = _write_run(tmp_path, rng)
    store = tmp_path / "zoo.zarr"
    zooscope.scan(manifest=tmp_path / "manifest.csv", store=store, cluster="none", progress=False)
    from safetensors.numpy import load_file

    wt = load_file(str(tmp_path / "e5.safetensors"))
    flat0 = np.concatenate([w0[k].ravel() for k in sorted(w0)])
    flatt = np.concatenate([wt[k].ravel() for k in sorted(w0)])
    drift = zooscope.open(str(store)).drift
    value = drift[(drift["model_id"] == "run-e5") & (drift["layer"] == "all")]["rmsd"].item()
    assert abs(value - rmsd(flat0, flatt)) <= 1e-12 * rmsd(flat0, flatt)


def test_init_may_name_a_checkpoint_path_relative_to_the_manifest(tmp_path):
    _write_run(tmp_path, np.random.default_rng(2))
    manifest = pd.read_csv(tmp_path / "manifest.csv").assign(init="e0.safetensors")
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    report = zooscope.scan(manifest=tmp_path / "manifest.csv", store=tmp_path / "zoo.zarr", cluster="none",
                           progress=False)
    assert report.n_drift == 2
    assert set(zooscope.open(str(tmp_path / "zoo.zarr")).drift["init_model_id"]) == {"run-e0"}
