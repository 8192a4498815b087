"""``zooscope scan --base`` / manifest ``base`` / ``--peft``: fine-tunes scanned against their base model.

Per layer, a scan with a base equals ``zooscope.analyze(ft, base_model=base)`` (metrics to 1e-12 relative) and its
ESDs are the eigenvalues of (W − W_base)ᵀ(W − W_base) (difference in float32, as stored) by LAPACK (1e-10 relative
to λmax). The content hash covers the base: a rerun skips, a changed or another base is analysed again, a missing
base or a shape mismatch is that model's error row naming both files while the other models go on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

import zooscope
from test_scan import assert_same_store, copy_store, layers_by_model, make_weights, models_table
from zooscope.cli import main
from zooscope.engine import scan as scan_module
from zooscope.engine.scan import ScanUsageError, scan
from zooscope.engine.store import ZooStore
from zooscope.pipelines.derived import derived_hash
from zooscope.pipelines.readers import content_hash

METRICS = ["alpha", "D", "xmin", "sigma", "lambda_max", "log_norm", "log_spectral_norm", "stable_rank", "entropy",
           "num_pl_spikes", "N", "M"]


def _tuned(base: dict[str, np.ndarray], seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    """``base`` plus a heavy-tailed update of the same shapes (a stand-in fine-tune)."""
    delta = make_weights(seed)
    return {k: (v + scale * delta[k]).astype(v.dtype) for k, v in base.items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and two fine-tunes under one folder, and a store scanned with ``base=``."""
    root = tmp_path_factory.mktemp("base")
    base = make_weights(0)
    save_file(base, str(root / "base.safetensors"))
    (root / "ft").mkdir()
    for i in (1, 2):
        save_file(_tuned(base, 10 + i), str(root / "ft" / f"ft{i}.safetensors"))
    store = root / "zoo.zarr"
    report = zooscope.scan([root / "ft"], store, base=root / "base.safetensors", progress=False)  # the facade
    assert (report.n_ok, report.n_error) == (2, 0)
    return root, store


def test_scan_with_base_equals_analyze_with_base_model(zoo):
    root, store = zoo
    base = root / "base.safetensors"
    layers = layers_by_model(store)
    models = models_table(store).set_index("model_id")
    with ZooStore.open(str(store)) as z:
        model_ids = z.models()["model_id"]
        esds = {(model_ids[r["model_row"]], r["name"]): z.esd(i) for i, r in z.layers().iterrows()}
    for i in (1, 2):
        ft = root / "ft" / f"ft{i}.safetensors"
        assert models.loc[f"ft{i}", "base_path"] == str(base.resolve())
        assert models.loc[f"ft{i}", "content_hash"] == derived_hash(content_hash(ft), content_hash(base)) \
            != content_hash(ft)
        theirs = zooscope.analyze(str(ft), base_model=str(base)).set_index("name")
        mine = layers[layers["model_id"] == f"ft{i}"].set_index("name")
        assert sorted(mine.index) == sorted(theirs.index) and len(mine) == 3
        np.testing.assert_allclose(mine.loc[theirs.index, METRICS].to_numpy(float),
                                   theirs[METRICS].to_numpy(float), rtol=1e-12, atol=0)
        base_w, ft_w = make_weights(0), _tuned(make_weights(0), 10 + i)
        for name in mine.index:  # the stored ESD is the spectrum of the difference itself (taken in float32)
            w = (ft_w[f"{name}.weight"] - base_w[f"{name}.weight"]).astype(np.float64)
            lam = np.sort(np.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T))
            np.testing.assert_allclose(esds[(f"ft{i}", name)], lam, rtol=0, atol=1e-10 * lam[-1])
    plain = zooscope.analyze(str(root / "ft" / "ft1.safetensors")).set_index("name")  # the base changes the numbers
    assert not np.allclose(plain["lambda_max"], layers[layers["model_id"] == "ft1"].set_index("name")
                           .loc[plain.index, "lambda_max"])


def test_sharded_scan_with_base_equals_unsharded(zoo, tmp_path):
    root, store = zoo
    sharded = tmp_path / "sharded.zarr"
    report = scan([root / "ft"], sharded, base=root / "base.safetensors", shard_bytes=3000, progress=False)
    assert report.n_ok == 2
    assert_same_store(store, sharded)


def test_rerun_skips_and_a_changed_or_other_base_is_analysed_again(zoo, tmp_path, monkeypatch):
    root, store = zoo
    store = copy_store(store, tmp_path / "zoo.zarr")
    calls = []
    monkeypatch.setattr(scan_module, "content_hash", lambda p, files=None: calls.append(p) or content_hash(p, files))
    report = scan([root / "ft"], store, base=root / "base.safetensors", progress=False)
    assert (report.n_ok, report.n_skipped) == (0, 2) and calls == []  # file stats of both files match
    report = scan([root / "ft"], store, base=root / "base.safetensors", rehash=True, progress=False)
    assert report.n_skipped == 2 and sorted(map(str, calls)).count(str(root / "base.safetensors")) == 1  # once

    other = tmp_path / "other_base.safetensors"  # the same files against another base: new results
    save_file(make_weights(5), str(other))
    twin = tmp_path / "twin" / "ft1_copy.safetensors"  # byte-identical to ft1: the same result, its own row
    twin.parent.mkdir()
    twin.write_bytes((root / "ft" / "ft1.safetensors").read_bytes())
    report = scan([root / "ft", twin], store, base=other, progress=False)
    assert (report.n_ok, report.n_skipped) == (3, 0)
    rows = models_table(store).set_index(["model_id", "version"])
    assert rows.loc[("ft1_copy", 1), "content_hash"] == rows.loc[("ft1", 2), "content_hash"] \
        != rows.loc[("ft1", 1), "content_hash"]
    both = layers_by_model(store).query("model_id == 'ft1_copy' or (model_id == 'ft1' and version == 2)")
    pd.testing.assert_frame_equal(*(g.drop(columns=["model_id", "version"]).reset_index(drop=True)
                                    for _, g in both.groupby("model_id")))
    changed = tmp_path / "changed"  # a base file that changes in place: analysed again
    changed.mkdir()
    save_file(make_weights(0), str(changed / "base.safetensors"))
    assert scan([root / "ft"], store, base=changed / "base.safetensors", progress=False).n_skipped == 2
    save_file(make_weights(6), str(changed / "base.safetensors"))
    report = scan([root / "ft"], store, base=changed / "base.safetensors", progress=False)
    assert (report.n_ok, report.n_skipped) == (2, 0)
    models = models_table(store)
    assert list(models.loc[models["model_id"] == "ft1", "version"]) == [1, 2, 3]
    new = layers_by_model(store).query("model_id == 'ft1' and version == 3").set_index("name")
    theirs = zooscope.analyze(str(root / "ft" / "ft1.safetensors"),
                              base_model=str(changed / "base.safetensors")).set_index("name")
    np.testing.assert_allclose(new.loc[theirs.index, "alpha"], theirs["alpha"], rtol=1e-12)


def test_manifest_base_column_and_cli_flag(zoo, tmp_path):
    root, _ = zoo
    manifest = root / "zoo.csv"
    pd.DataFrame({"path": ["ft/ft1.safetensors", "ft/ft2.safetensors"], "base": ["base.safetensors", ""],
                  "top1_error": [0.1, 0.2]}).to_csv(manifest, index=False)
    other = root / "other.safetensors"
    save_file(make_weights(7), str(other))
    store = tmp_path / "m.zarr"
    # the manifest's base for ft1; --base for the row without one
    assert main(["scan", "--manifest", str(manifest), "--base", str(other), "--store", str(store),
                 "--no-progress"]) == 0
    models = models_table(store).set_index("model_id")
    assert models.loc["ft1", "base_path"] == str(root / "base.safetensors")
    assert models.loc["ft2", "base_path"] == str(other) and models.loc["ft2", "top1_error"] == 0.2
    assert "base" not in models.columns
    ft2 = layers_by_model(store).query("model_id == 'ft2'").set_index("name")
    theirs = zooscope.analyze(str(root / "ft" / "ft2.safetensors"), base_model=str(other)).set_index("name")
    np.testing.assert_allclose(ft2.loc[theirs.index, "alpha"], theirs["alpha"], rtol=1e-12)

    outside = tmp_path / "outside.csv"  # a base outside the manifest's folder is refused, like a path
    pd.DataFrame({"path": [str(root / "ft" / "ft1.safetensors")], "base": ["../base.safetensors"]}).to_csv(outside)
    with pytest.raises(ScanUsageError, match="outside the manifest's folder"):
        scan(store=tmp_path / "x.zarr", manifest=outside, progress=False)
    twice = root / "twice.csv"
    pd.DataFrame({"path": ["ft/ft1.safetensors"] * 2, "base": ["base.safetensors", "other.safetensors"],
                  "model_id": ["a", "b"]}).to_csv(twice, index=False)
    with pytest.raises(ScanUsageError, match="twice with different base"):
        scan(store=tmp_path / "x.zarr", manifest=twice, progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_missing_base_and_shape_mismatch_are_error_rows(zoo, tmp_path):
    root, _ = zoo
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    save_file(_tuned(make_weights(0), 20), str(models_dir / "good.safetensors"))
    wide = make_weights(0, widths=(40, 33, 24, 16))
    save_file(wide, str(models_dir / "wide.safetensors"))
    store = tmp_path / "e.zarr"
    argv = ["scan", str(models_dir), "--base", str(root / "base.safetensors"), "--store", str(store),
            "--no-progress"]
    assert main(argv) == 3
    rows = models_table(store).set_index("model_id")
    assert (rows.loc["good", "status"], rows.loc["wide", "status"]) == ("ok", "error")
    error = rows.loc["wide", "error"]
    assert str(models_dir / "wide.safetensors") in error and str(root / "base.safetensors") in error
    assert "(33,) differs from (32,)" in error
    wide_only = [models_dir / "wide.safetensors"]
    assert scan(wide_only, store, base=root / "base.safetensors", progress=False).n_skipped == 1
    report = scan(wide_only, store, base=root / "base.safetensors", retry_failed=True, progress=False)
    assert (report.n_error, report.n_skipped) == (1, 0)  # analysed again: the same error
    missing = tmp_path / "gone.safetensors"
    report = scan([models_dir / "good.safetensors"], store, base=missing, progress=False)
    assert (report.n_ok, report.n_error) == (0, 1)
    (path, message), = report.failed
    assert str(models_dir / "good.safetensors") in message and str(missing) in message
    assert scan([models_dir / "good.safetensors"], store, base=missing, progress=False).n_skipped == 1
    with ZooStore.open(str(store)) as z:
        assert z.check() == []


def _adapter(path: Path, base: dict[str, np.ndarray], seed: int) -> None:
    """A PEFT-layout LoRA adapter (rank 4, alpha 8) for the first two layers of ``base``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for name in ("fc0", "fc1"):
        out_f, in_f = base[f"{name}.weight"].shape
        tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_t(3, (4, in_f)).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_t(3, (out_f, 4)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))


def test_peft_adapters_merged_into_the_base(zoo, tmp_path):
    root, _ = zoo
    base = root / "base.safetensors"
    for i in (1, 2):
        _adapter(tmp_path / "adapters" / f"task{i}", make_weights(0), seed=i)
    store = tmp_path / "lora.zarr"
    report = scan([tmp_path / "adapters"], store, base=base, peft=True, progress=False)
    assert (report.n_ok, report.n_error) == (2, 0)
    models = models_table(store).set_index("model_id")
    assert sorted(models.index) == ["task1", "task2"] and set(models["peft"]) == {True}
    layers = layers_by_model(store)
    for i in (1, 2):
        adapter = tmp_path / "adapters" / f"task{i}"
        assert models.loc[f"task{i}", "content_hash"] == derived_hash(content_hash(adapter), content_hash(base),
                                                                      peft=True)
        theirs = zooscope.analyze(str(adapter), peft=True, base_model=str(base)).set_index("name")
        mine = layers[layers["model_id"] == f"task{i}"].set_index("name")
        np.testing.assert_allclose(mine.loc[theirs.index, METRICS].to_numpy(float),
                                   theirs[METRICS].to_numpy(float), rtol=1e-12)
    # the adapter directory is the model; alone (no base) it is another content, B·A·scale: analysed again
    assert models.loc["task1", "path"] == str(tmp_path / "adapters" / "task1")
    report = scan([tmp_path / "adapters" / "task1"], store, peft=True, progress=False)
    assert report.n_ok == 1
    alone = models_table(store).query("model_id == 'task1' and version == 2").iloc[0]
    assert alone["base_path"] == "" and alone["content_hash"] == derived_hash(
        content_hash(tmp_path / "adapters" / "task1"), peft=True)
