"""``zooscope scan`` in-process: plan, store round trip, reruns, bad files, versions, locking, sharding."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from zooscope.cli import main
from zooscope.engine import scan as scan_module
from zooscope.engine.plan import plan, split_keys
from zooscope.engine.scan import ScanUsageError, collect_inputs, scan
from zooscope.engine.store import StoreLockedError, ZooStore
from zooscope.pipelines.analyze import AnalysisOptions, analyze_path
from zooscope.pipelines.readers import content_hash, open_checkpoint
from zooscope.pipelines.summary import model_summary

#: Columns that depend on when or how fast a scan ran, not on the weights.
TIMING_COLUMNS = {"seconds", "scanned_at", "file_stat"}


def make_weights(seed: int, widths=(40, 32, 24, 16)) -> dict[str, np.ndarray]:
    """A small MLP state dict with heavy-tailed (Student-t) weights, so that power-law fits succeed."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
        out[f"fc{i}.weight"] = (rng.standard_t(3, size=(n, m)) / np.sqrt(m)).astype(np.float32)
        out[f"fc{i}.bias"] = rng.normal(size=n).astype(np.float32)
    return out


def write_zoo(root: Path, n: int = 4, seed: int = 0) -> list[Path]:
    """``n`` safetensors MLPs of different widths under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"mlp{i}.safetensors"
        save_file(make_weights(seed + i, widths=(40 + 4 * i, 32, 24, 16)), str(path))
        paths.append(path)
    return paths


def layers_by_model(store: str | Path) -> pd.DataFrame:
    """The store's layer table keyed by (model_id, version, layer_id, name) instead of store row numbers."""
    with ZooStore.open(str(store)) as zoo:
        models = zoo.models()
        layers = zoo.layers()
    key = models[["version"]].rename_axis("model_row").reset_index()  # the layers carry model_id
    out = layers.merge(key, on="model_row").drop(columns=["model_row", "esd_start"])
    return out.sort_values(["model_id", "version", "layer_id", "name"]).reset_index(drop=True)


def models_table(store: str | Path) -> pd.DataFrame:
    with ZooStore.open(str(store)) as zoo:
        models = zoo.models()
    keep = [c for c in models.columns if c not in TIMING_COLUMNS]
    return models[keep].sort_values(["model_id", "version"]).reset_index(drop=True)


def assert_same_store(a: str | Path, b: str | Path) -> None:
    """Bitwise-equal layer and model tables (timing columns ignored) and equal ESDs."""
    pd.testing.assert_frame_equal(layers_by_model(a), layers_by_model(b), check_exact=True)
    pd.testing.assert_frame_equal(models_table(a), models_table(b), check_exact=True)
    with ZooStore.open(str(a)) as za, ZooStore.open(str(b)) as zb:
        for zoo in (za, zb):
            assert zoo.check() == []
        ea = _esds_by_key(za)
        eb = _esds_by_key(zb)
    assert ea.keys() == eb.keys()
    for key in ea:
        np.testing.assert_array_equal(ea[key], eb[key])


def _esds_by_key(zoo: ZooStore) -> dict[tuple, np.ndarray]:
    models, layers = zoo.models(), zoo.layers()
    return {(models.loc[row["model_row"], "model_id"], row["layer_id"], row["name"]): zoo.esd(layer_row)
            for layer_row, row in layers.iterrows()}


# --- plan ---------------------------------------------------------------------------------------------------


def test_split_keys_groups_by_shard_file_then_byte_budget():
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 500, "d": 10, "e": 10}
    files = {"a": "f1", "b": "f1", "c": "f1", "huge": "f1", "d": "f2", "e": "f2"}
    groups = split_keys(list(sizes), sizes.__getitem__, files.__getitem__, budget=80)
    assert groups == [(["a", "b"], 80), (["c"], 40), (["huge"], 500), (["d", "e"], 20)]


def test_plan_skips_committed_and_duplicate_content(tmp_path):
    a, b, c = write_zoo(tmp_path / "zoo", n=3)
    dup = tmp_path / "zoo" / "copy_of_a.safetensors"
    dup.write_bytes(a.read_bytes())
    sources = collect_inputs([tmp_path / "zoo"])
    tasks = plan(sources, done_hashes={content_hash(b)})
    assert [Path(t.path).name for t in tasks] == ["copy_of_a.safetensors", "mlp2.safetensors"]
    assert all(t.keys is None and (t.shard, t.n_shards) == (0, 1) for t in tasks)
    assert tasks[1].nbytes == c.stat().st_size and tasks[1].content_hash == content_hash(c)


def test_plan_splits_large_model_into_contiguous_whole_tensor_shards(tmp_path):
    (path,) = write_zoo(tmp_path, n=1)
    (source,) = collect_inputs([path])
    weights = make_weights(0, widths=(40, 32, 24, 16))
    tasks = plan([source], done_hashes=(), shard_bytes=40 * 32 * 4)
    keys = [k for t in tasks for k in t.keys]
    with open_checkpoint(path) as ckpt:
        assert keys == ckpt.keys() and sorted(keys) == sorted(weights)  # each tensor once, in checkpoint order
    assert [t.shard for t in tasks] == list(range(len(tasks))) and {t.n_shards for t in tasks} == {len(tasks)}
    assert len(tasks) > 1 and all(t.nbytes <= 40 * 32 * 4 for t in tasks)
    assert sum(t.nbytes for t in tasks) == sum(w.nbytes for w in weights.values())
    assert len({t.content_hash for t in tasks}) == 1
    assert plan([source], done_hashes=(), shard_bytes=10**9)[0].keys is None  # below the budget: one task


def test_plan_splits_hf_directory_by_shard_file(tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    weights = make_weights(1)
    names = sorted(weights)  # safetensors files list their tensors sorted by name
    parts = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for file, keys in parts.items():
        save_file({k: weights[k] for k in keys}, str(model / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    first = sum(weights[k].nbytes for k in names[:3])  # the larger shard file fits the budget, the model not
    tasks = plan(collect_inputs([model]), done_hashes=(), shard_bytes=first + 100)
    assert [list(t.keys) for t in tasks] == [names[:3], names[3:]]
    assert [t.nbytes for t in tasks] == [first, sum(weights[k].nbytes for k in names[3:])]


# --- scan into a store ----------------------------------------------------------------------------------------
# Creating a store costs seconds (one zarr array per column), so the tests share one scanned zoo and copy it.


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """Three models scanned in-process from a manifest: ``(zoo dir, manifest, store, paths)``."""
    root = tmp_path_factory.mktemp("scanned")
    paths = write_zoo(root / "zoo", n=3)
    manifest = root / "zoo.csv"
    pd.DataFrame({"path": [f"zoo/{p.name}" for p in paths], "model_id": [p.stem for p in paths],
                  "top1_error": [0.3, 0.2, 0.1], "series": ["mlp"] * 3}).to_csv(manifest, index=False)
    store = root / "zoo.zarr"
    report = scan(store=store, manifest=manifest, progress=False)
    assert (report.n_ok, report.n_error, report.n_skipped, report.exit_code) == (3, 0, 0, 0)
    return root / "zoo", manifest, store, paths


def copy_store(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


def test_scan_round_trip_matches_direct_analysis(scanned):
    _, _, store, paths = scanned
    with ZooStore.open(str(store)) as zoo:
        assert zoo.check() == []
        models, layers = zoo.models(), zoo.layers()
        assert sorted(models["model_id"]) == ["mlp0", "mlp1", "mlp2"]
        empty = layers.columns[layers.isna().all()].tolist()
        assert empty == [], f"a default scan stores only columns it computed; all-NaN: {empty}"
        age = pd.Timestamp.now(tz="UTC") - pd.to_datetime(models["scanned_at"], utc=False)  # ISO 8601 with +00:00
        assert ((age >= pd.Timedelta(0)) & (age < pd.Timedelta(hours=1))).all(), models["scanned_at"]
        for model_row, model in models.iterrows():
            i = int(model["model_id"][-1])
            assert model["path"] == str(paths[i].resolve()) and model["content_hash"] == content_hash(paths[i])
            assert (model["status"], model["version"], model["series"]) == ("ok", 1, "mlp")
            assert model["top1_error"] == pytest.approx([0.3, 0.2, 0.1][i])
            direct = analyze_path(str(paths[i]), AnalysisOptions(fit_backend="numba"))  # the scan's route
            mine = layers[layers["model_row"] == model_row].sort_values("layer_id")
            assert model["n_layers"] == len(direct.layers) == len(mine) == 3
            assert model["n_params"] == direct.n_params > 0
            for col in ("alpha", "D", "xmin", "lambda_max", "log_norm", "stable_rank", "N", "M"):
                np.testing.assert_array_equal(mine[col].to_numpy(float), direct.layers[col].to_numpy(float), col)
            for layer_row, evals in zip(mine.index, direct.esd):
                np.testing.assert_array_equal(zoo.esd(layer_row), evals)
            ww = model_summary(direct.layers, "ww", esd=lambda r: direct.esd[r.name])
            robust = model_summary(direct.layers, "robust")
            assert model["alpha"] == pytest.approx(ww["alpha"], rel=1e-12)
            assert model["robust_alpha_weighted"] == pytest.approx(robust["alpha_weighted"], rel=1e-12)


def test_progress_in_a_log_is_plain_lines(scanned, tmp_path, monkeypatch, capsys):
    """stderr is not a terminal here: a line per progress step (every shard with LOG_EVERY_S = 0), ending complete."""
    from zooscope.engine import run

    _, manifest, _, _ = scanned
    monkeypatch.setattr(run, "LOG_EVERY_S", 0.0)
    report = scan(store=tmp_path / "log.zarr", manifest=manifest, cluster="none", shard_bytes=3000)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("scan: ")]
    assert report.n_ok == 3 and len(lines) > 3  # sharded: more shards than models
    assert lines[0].startswith("scan: models 0/3  shards 1/") and "s left" in lines[0]
    assert lines[-1].startswith("scan: models 3/3  shards ") and "left" not in lines[-1]
    done, total = re.search(r"  (\S+ \S+)/(\S+ \S+)  ", lines[-1]).groups()
    assert done == total and done.endswith("kB")


def test_sharded_model_rows_equal_unsharded(scanned, tmp_path):
    _, manifest, store, _ = scanned
    report = scan(store=tmp_path / "sharded.zarr", manifest=manifest, shard_bytes=3000, progress=False)
    assert report.n_ok == 3
    assert_same_store(store, tmp_path / "sharded.zarr")


def test_rerun_adds_nothing_and_a_changed_file_adds_version_2(scanned, tmp_path, monkeypatch):
    zoo_dir, _, store, _ = scanned
    store = copy_store(store, tmp_path / "zoo.zarr")
    before = layers_by_model(store)
    calls = []
    monkeypatch.setattr(scan_module, "content_hash", lambda p, files=None: calls.append(p) or content_hash(p, files))
    report = scan([zoo_dir], store, progress=False)  # same files, same paths: not even hashed again
    assert (report.n_ok, report.n_error, report.n_skipped) == (0, 0, 3) and calls == []
    report = scan([zoo_dir], store, rehash=True, progress=False)
    assert report.n_skipped == 3 and len(calls) == 3
    pd.testing.assert_frame_equal(layers_by_model(store), before)

    moved = Path(shutil.copytree(zoo_dir, tmp_path / "moved"))  # new paths, same content: hashed, skipped
    changed = moved / "mlp1.safetensors"
    save_file(make_weights(99), str(changed))
    report = scan([moved], store, progress=False)
    assert (report.n_ok, report.n_skipped) == (1, 2)
    models = models_table(store)
    mlp1 = models[models["model_id"] == "mlp1"]
    assert list(mlp1["version"]) == [1, 2] and list(mlp1["content_hash"].iloc[1:]) == [content_hash(changed)]
    layers = layers_by_model(store)
    pd.testing.assert_frame_equal(layers[layers["version"] == 1].reset_index(drop=True), before)
    new = layers[(layers["model_id"] == "mlp1") & (layers["version"] == 2)]
    direct = analyze_path(str(changed), AnalysisOptions(fit_backend="numba"))
    np.testing.assert_array_equal(new["alpha"].to_numpy(), direct.layers["alpha"].to_numpy())


def test_bad_files_give_error_rows_and_exit_3(scanned, tmp_path, capsys):
    zoo_dir, _, store, paths = scanned
    store = copy_store(store, tmp_path / "zoo.zarr")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(paths[0].read_bytes()[:-100])
    missing = tmp_path / "gone.safetensors"
    argv = ["scan", str(zoo_dir), str(bad), str(missing), "--store", str(store), "--no-progress"]
    assert main(argv) == 3
    out = capsys.readouterr().out
    assert "0 ok, 2 failed, 3 already in the store" in out and str(bad) in out and str(missing) in out
    models = models_table(store)
    errors = models[models["status"] == "error"].set_index("model_id")
    assert sorted(errors.index) == ["broken", "gone"]
    assert "truncated" in errors.loc["broken", "error"] and str(bad) in errors.loc["broken", "error"]
    assert str(missing) in errors.loc["gone", "error"]
    assert (models.loc[models["status"] == "ok", "n_layers"] == 3).all() and (errors["n_layers"] == 0).all()
    with ZooStore.open(str(store)) as zoo:
        assert zoo.check() == [] and len(zoo.layers()) == 9
    # the same bad files are not retried; a repaired file is analysed as the model's next version
    assert main(argv) == 0
    save_file(make_weights(50), str(bad))
    report = scan([zoo_dir, bad], store, progress=False)
    assert (report.n_ok, report.n_skipped) == (1, 3)
    repaired = models_table(store).query("model_id == 'broken'")
    assert list(repaired["version"]) == [1, 2] and list(repaired["status"]) == ["error", "ok"]


def test_second_writer_is_refused(scanned, tmp_path, capsys):
    zoo_dir, _, store, _ = scanned
    store = copy_store(store, tmp_path / "zoo.zarr")
    with ZooStore.open(str(store), "a"):
        with pytest.raises(StoreLockedError):
            scan([zoo_dir], store, progress=False)
        assert main(["scan", str(zoo_dir), "--store", str(store), "--no-progress"]) == 2
    assert "lock" in capsys.readouterr().err.lower()
    assert scan([zoo_dir], store, progress=False).n_skipped == 3  # released: the next writer gets in


def test_other_analysis_options_are_refused_on_an_existing_store(scanned, tmp_path):
    zoo_dir, _, store, _ = scanned
    store = copy_store(store, tmp_path / "zoo.zarr")
    with pytest.raises(ScanUsageError, match="seed"):
        scan([zoo_dir], store, options=AnalysisOptions(seed=1), progress=False)


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_usage_errors_and_option_mapping(tmp_path, capsys):
    from zooscope.cli import build_parser
    from zooscope.commands.scan import options_from_args

    assert main(["scan", "--store", str(tmp_path / "s.zarr")]) == 2  # no paths
    write_zoo(tmp_path / "zoo", n=1)
    assert main(["scan", str(tmp_path / "zoo"), "--store", str(tmp_path / "s.zarr"), "--cluster", "nope"]) == 2
    assert "unknown cluster profile 'nope'" in capsys.readouterr().err and not (tmp_path / "s.zarr").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", "x", "--store", "s.zarr", "--shard-bytes", "lots"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    assert "examples:" in capsys.readouterr().out
    args = build_parser().parse_args(["scan", "m.pt", "--store", "s", "--detx", "--mp-fit", "--ww-version",
                                      "0.7.7", "--fit-backend", "numpy", "--seed", "3", "--shard-bytes", "1KiB"])
    options = options_from_args(args)
    assert (options.detX, options.mp_fit, options.randomize, options.min_evals) == (True, True, False, 8)
    assert (options.fit_backend, options.seed, options.esd_backend, args.shard_bytes) == ("numpy", 3, "auto", 1024)
    with pytest.raises(ScanUsageError):
        scan([], tmp_path / "s.zarr")


def test_scan_takes_the_saved_routing_table(tmp_path, monkeypatch):
    from zooscope.engine import tune
    from zooscope.kernels.esd import Route, RoutingTable

    monkeypatch.setenv("ZOOSCOPE_HOME", str(tmp_path / "home"))
    (path,) = write_zoo(tmp_path / "zoo", n=1)
    scan([path], store=tmp_path / "untuned.zarr", cluster="none", progress=False)
    assert set(layers_by_model(tmp_path / "untuned.zarr")["esd_backend"]) == {"numpy-gram-checked"}

    tune.save_table(RoutingTable(routes=(Route("fp64", 32, 1, "numpy-svd"),)))  # every fp64 stack → numpy-svd
    scan([path], store=tmp_path / "tuned.zarr", cluster="none", progress=False)
    tuned = layers_by_model(tmp_path / "tuned.zarr")
    assert set(tuned["esd_backend"]) == {"numpy-svd"}
    untuned = layers_by_model(tmp_path / "untuned.zarr")
    np.testing.assert_allclose(tuned["alpha"].to_numpy(float), untuned["alpha"].to_numpy(float), rtol=1e-10)
    # a table changes speed, not results: rescanning into the untuned store is allowed (and finds nothing new)
    assert scan([path], store=tmp_path / "untuned.zarr", cluster="none", progress=False).n_skipped == 1
