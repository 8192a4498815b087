"""The Zarr store: round trips, column evolution, commit protocol under crashes, the writer lock, readers, check."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from zooscope.cli import main as cli_main
from zooscope.engine.lock import LOCK_NAME
from zooscope.engine.store import StoreLockedError, ZooStore, open_store
from zooscope.pipelines.result import ModelResult

BINS = 6


def make_result(rng: np.random.Generator, k: int, *, extra: dict | None = None, hist: bool = True) -> ModelResult:
    """A model of ``k`` layers with random metrics, ESDs of varying length and histograms."""
    layers = pd.DataFrame({
        "layer_id": np.arange(k, dtype=np.int64) * 2,
        "name": [f"block{i}.fc" for i in range(k)],
        "N": rng.integers(20, 60, k), "M": rng.integers(10, 20, k),
        "status": ["ok"] * k,
        "alpha": rng.uniform(1.5, 6.0, k),
    })
    for col, values in (extra or {}).items():
        layers[col] = values
    esd = [np.sort(rng.exponential(size=int(m))) for m in layers["M"]]
    counts = rng.integers(0, 50, (k, BINS)).astype(float) if hist else np.zeros((k, 0))
    edges = np.sort(rng.normal(size=(k, BINS + 1)), axis=1) if hist else np.zeros((k, 1))
    return ModelResult(layers=layers, esd=esd, hist_counts=counts, hist_edges=edges, n_params=int(rng.integers(1e5)))


def stored_models(path) -> pd.DataFrame:
    return open_store(path).models.reset_index(drop=True)


def read_attrs(path) -> dict:
    with open(os.path.join(path, "zarr.json")) as fh:
        return json.load(fh)["attributes"]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_round_trip_with_varying_columns_and_error_rows(tmp_path, rng):
    path = tmp_path / "zoo.zarr"
    a = make_result(rng, 3)
    b = make_result(rng, 2, extra={"w_mean": [0.1, -0.2], "warning": ["", "over-trained"]})
    c = make_result(rng, 4, extra={"num_pl_spikes": np.array([3, 4, 5, 6])})
    d = make_result(rng, 2, extra={"num_pl_spikes": [7.0, np.nan]}, hist=False)  # int column receives NaN
    rows = [{"model_id": "a", "path": "/z/a.pt", "content_hash": "ha", "series": "s1", "top1_error": 0.25},
            {"model_id": "b", "path": "/z/b.pt", "content_hash": "hb", "epochs": 12},
            {"model_id": "bad", "path": "/z/bad.pt", "content_hash": "hbad", "error": "bad.pt: truncated file"},
            {"model_id": "c", "path": "/z/c.pt", "content_hash": "hc", "series": "s2", "top1_error": 0.5},
            {"model_id": "d", "path": "/z/d.pt", "content_hash": "hd"}]
    results = [a, b, None, c, d]
    with ZooStore.open(path, "a", params={"min_evals": 10}, flush_every=2) as store:
        for row, res in zip(rows, results):
            store.append(row, res)
    view = open_store(path)
    models = view.models
    assert list(models["model_id"]) == ["a", "b", "bad", "c", "d"]
    assert list(models["status"]) == ["ok", "ok", "error", "ok", "ok"]
    assert list(models["error"]) == ["", "", "bad.pt: truncated file", "", ""]
    assert list(models["version"]) == [1] * 5
    assert list(models["n_layers"]) == [3, 2, 0, 4, 2]
    assert models["series"].tolist() == ["s1", "", "", "s2", ""]
    np.testing.assert_array_equal(models["top1_error"], [0.25, np.nan, np.nan, 0.5, np.nan])
    # int columns missing from some rows read back as NaN (missing), never as -1
    np.testing.assert_array_equal(models["epochs"], [np.nan, 12, np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(models["n_params"], [a.n_params, b.n_params, np.nan, c.n_params, d.n_params])
    assert view.params == {"min_evals": 10}

    layers = view.layers
    ok = [a, b, c, d]
    expected = pd.concat([r.layers for r in ok], ignore_index=True)
    expected["w_mean"] = expected["w_mean"].astype(float)  # NaN for layers without it
    expected["warning"] = expected["warning"].fillna("")
    # num_pl_spikes: missing for a, b (NaN, not -1), then c's ints and d's NaN
    expected["num_pl_spikes"] = [np.nan] * 5 + [3.0, 4.0, 5.0, 6.0, 7.0, np.nan]
    expected["model_row"] = np.repeat([0, 1, 3, 4], [3, 2, 4, 2])
    counts = np.array([len(e) for r in ok for e in r.esd])
    expected["esd_start"] = np.cumsum(counts) - counts
    expected["esd_count"] = counts
    got = layers.reset_index(drop=True)[list(expected.columns)]
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got["num_pl_spikes"].dtype == np.float64 and got["N"].dtype == np.int64
    every = [e for r in ok for e in r.esd]
    for i, e in enumerate(every):
        np.testing.assert_array_equal(view.esd(i), e)
    for got_e, e in zip(view.esds(), every):
        np.testing.assert_array_equal(got_e, e)
    np.testing.assert_array_equal(view.store.esds([7, 2])[1], every[2])
    for i, (cnt, edg) in enumerate(zip(np.concatenate([a.hist_counts, b.hist_counts, c.hist_counts]),
                                       np.concatenate([a.hist_edges, b.hist_edges, c.hist_edges]))):
        got_c, got_e = view.hist(i)
        np.testing.assert_array_equal(got_c, cnt)
        np.testing.assert_array_equal(got_e, edg)
    assert np.isnan(view.hist(9)[0]).all() and np.isnan(view.hist(10)[1]).all()  # d had no histograms
    rows = [10, 0, 4]  # hists reads several rows at once, in the order asked, equal to hist row by row
    for got, one in zip(view.store.hists(rows), zip(*(view.hist(i) for i in rows))):
        np.testing.assert_array_equal(got, np.stack(one))
    assert list(view.store.layers(["c"])["name"]) == list(c.layers["name"])
    assert view.check() == []
    with pytest.raises(IndexError):
        view.esd(11)


def test_reopen_append_continues_versions_and_duplicates(tmp_path, rng):
    path = tmp_path / "zoo.zarr"
    first = [make_result(rng, 2), make_result(rng, 3)]
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "m", "content_hash": "h1"}, first[0])
        store.append({"model_id": "n", "content_hash": "h2"}, first[1])
    with ZooStore.open(path, "a") as store:
        assert len(store) == 2 and store.committed_hashes() == {"h1", "h2"}
        with pytest.raises(ValueError, match="already in the store"):
            store.append({"model_id": "m", "content_hash": "h1"}, first[0])
        with pytest.raises(ValueError, match="next version is 2"):
            store.append({"model_id": "m", "content_hash": "h3", "version": 5}, first[0])
        third = make_result(rng, 2)
        store.append({"model_id": "m", "content_hash": "h3"}, third)  # the file changed: version 2
        assert store.model_versions() == {"m": (2, "h3"), "n": (1, "h2")}
    view = open_store(path)
    assert list(view.models["version"]) == [1, 1, 2]
    layers = view.layers
    assert list(layers["model_row"]) == [0, 0, 1, 1, 1, 2, 2]
    np.testing.assert_array_equal(view.esd(6), third.esd[1])
    np.testing.assert_array_equal(view.esd(0), first[0].esd[0])
    latest = open_store(path, latest=True)
    assert list(latest.models["model_id"]) == ["n", "m"] and list(latest.models.index) == [1, 2]
    assert list(latest.layers["model_row"]) == [1, 1, 1, 2, 2]
    some = view.store.models(latest=True, columns=["content_hash", "no_such_column"])
    assert list(some["content_hash"]) == ["h2", "h3"] and "path" not in some
    pd.testing.assert_frame_equal(view.store.models(columns=["version"]), view.models[["version"]])
    assert view.check() == []


def test_drift_append_and_read(tmp_path):
    path = tmp_path / "zoo.zarr"
    d1 = pd.DataFrame({"model_id": ["w10"] * 3, "checkpoint": [0, 5, 10], "layer": ["fc1"] * 3,
                       "rmsd": [0.0, 0.12, 0.2]})
    d2 = pd.DataFrame({"model_id": ["w20"] * 2, "checkpoint": [0, 5], "layer": ["fc2"] * 2,
                       "rmsd": [0.0, 0.3], "c_opt": [np.nan, 0.9]})
    with ZooStore.open(path, "a") as store:
        store.append_drift(d1)
        assert store.counters["n_drift"] == 3  # append_drift commits at once
        store.append_drift(d2)
    got = open_store(path).drift.reset_index(drop=True)
    expected = pd.concat([d1, d2], ignore_index=True)
    pd.testing.assert_frame_equal(got[list(expected.columns)], expected, check_dtype=False)


def test_xarray_reads_tables(tmp_path, rng):
    path = tmp_path / "zoo.zarr"
    results = [make_result(rng, 3), make_result(rng, 2)]
    with ZooStore.open(path, "a") as store:
        for i, res in enumerate(results):
            store.append({"model_id": f"m{i}", "content_hash": f"h{i}"}, res)
    layers = open_store(path).layers
    ds = xr.open_zarr(path, group="layers", consolidated=False)
    assert ds.sizes["layer"] == len(layers)
    np.testing.assert_array_equal(ds["alpha"].values, layers["alpha"])
    assert [str(v) for v in ds["name"].values] == list(layers["name"])
    via = open_store(path).to_xarray("layers")
    np.testing.assert_array_equal(via["esd_count"].values, layers["esd_count"])
    hist = open_store(path).to_xarray("hist")
    np.testing.assert_array_equal(hist["counts"].values, np.concatenate([r.hist_counts for r in results]))


def test_readers_see_committed_rows_only(tmp_path, rng):
    path = tmp_path / "zoo.zarr"
    with ZooStore.open(path, "a", flush_every=100) as store:
        store.append({"model_id": "m0", "content_hash": "h0"}, make_result(rng, 2))
        reader = ZooStore.open(path, "r")  # readers need no lock
        assert len(reader) == 0 and len(reader.layers()) == 0
        store.flush()
        store.append({"model_id": "m1", "content_hash": "h1"}, make_result(rng, 2))
        reader.reload()
        assert len(reader) == 1 and list(reader.layers()["model_row"]) == [0, 0]
    reader.reload()
    assert len(reader) == 2


# -- crash safety ---------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys, numpy as np, pandas as pd
    from zooscope.engine.store import ZooStore
    from zooscope.pipelines.result import ModelResult

    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(1)

    def result(k):
        layers = pd.DataFrame({"layer_id": np.arange(k), "name": [f"l{i}" for i in range(k)],
                               "alpha": rng.uniform(2, 5, k)})
        return ModelResult(layers=layers, esd=[rng.random(3000) for _ in range(k)],
                           hist_counts=rng.random((k, 4)), hist_edges=rng.random((k, 5)))

    store = ZooStore.open(path, "a", flush_every=1)
    for i in range(n):
        if mode == "die-before-commit" and i == n - 1:
            store._commit = lambda *a: os._exit(9)   # data arrays written, counters never advanced
        store.append({"model_id": f"m{i}", "content_hash": f"h{i}", "late_col": float(i)}, result(2 + i % 3))
    store.close()
""")


def run_writer(path, mode: str, n: int, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode, str(n)], **kwargs)


def test_crash_before_commit_is_truncated_on_reopen(tmp_path):
    path = tmp_path / "zoo.zarr"
    assert run_writer(path, "die-before-commit", 4).wait(timeout=120) == 9
    counters = read_attrs(path)["counters"]
    assert counters["n_models"] == 3
    # the dead writer's last model is on disk beyond the counters: invisible to readers, check() is clean
    assert zarr.open_array(str(path / "esd" / "values"), mode="r").shape[0] > counters["n_esd"]
    assert zarr.open_array(str(path / "models" / "model_id"), mode="r").shape[0] > counters["n_models"]
    reader = ZooStore.open(path, "r")
    assert len(reader) == 3 and reader.check() == []
    with pytest.warns(RuntimeWarning, match="stale lock"):  # the dead writer's lock is taken over
        store = ZooStore.open(path, "a")
    with store:
        assert zarr.open_array(str(path / "esd" / "values"), mode="r").shape[0] == counters["n_esd"]
        assert store.check() == []
        store.append({"model_id": "m3", "content_hash": "h3"}, None)
    models = stored_models(path)
    assert list(models["model_id"]) == ["m0", "m1", "m2", "m3"]
    assert open_store(path).check() == []


def test_sigkill_mid_scan_leaves_a_sound_prefix(tmp_path):
    path = tmp_path / "zoo.zarr"
    proc = run_writer(path, "normal", 400, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if read_attrs(path)["counters"]["n_models"] >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert zooscope_check(path) == 0
    reader = ZooStore.open(path, "r")
    n = len(reader)
    assert 5 <= n < 400
    models = reader.models()
    assert list(models["model_id"]) == [f"m{i}" for i in range(n)]
    assert list(reader.layers()["esd_count"].unique()) == [3000]
    with pytest.warns(RuntimeWarning, match="stale lock"):
        store = ZooStore.open(path, "a")
    with store:
        assert store.check() == []
        store.append({"model_id": "next", "content_hash": "hn"}, None)
    assert len(open_store(path)) == n + 1 and zooscope_check(path) == 0


# -- the writer lock ------------------------------------------------------------------------------------------

def test_second_writer_is_refused_and_lock_released(tmp_path):
    path = tmp_path / "zoo.zarr"
    with ZooStore.open(path, "a"):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            ZooStore.open(path, "a")
        assert len(ZooStore.open(path, "r")) == 0
    assert not (path / LOCK_NAME).exists()
    with ZooStore.open(path, "a"):  # released at close: a new writer gets it
        pass


def test_stale_lock_taken_over_and_foreign_host_refused(tmp_path):
    path = tmp_path / "zoo.zarr"
    with ZooStore.open(path, "a"):
        pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00", "token": "x"}
    (path / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.warns(RuntimeWarning, match=f"pid {dead.pid}"):
        with ZooStore.open(path, "a") as store:
            assert json.loads((path / LOCK_NAME).read_text())["pid"] == os.getpid()
            store.append({"model_id": "m", "content_hash": "h"}, None)
    (path / LOCK_NAME).write_text(json.dumps({**holder, "host": "another-node"}))
    with pytest.raises(StoreLockedError, match="another-node"):
        ZooStore.open(path, "a")


# -- integrity checks and the command line -----------------------------------------------------------------

def zooscope_check(path) -> int:
    return cli_main(["check", str(path)])


@pytest.fixture
def sound_store(tmp_path, rng):
    path = tmp_path / "zoo.zarr"
    with ZooStore.open(path, "a") as store:
        for i in range(4):
            store.append({"model_id": f"m{i % 2}", "content_hash": f"h{i}", "top1_error": 0.1 * i},
                         make_result(rng, 3))
        store.append({"model_id": "broken", "content_hash": "hx", "error": "x.pt: not a checkpoint"}, None)
    return path


def test_check_detects_injected_faults(sound_store, capsys):
    path = sound_store
    assert zooscope_check(path) == 0
    assert "OK" in capsys.readouterr().out
    root = zarr.open_group(str(path), mode="a")
    count = root["layers/esd_count"]
    count[4] = count[4] + 1
    problems = ZooStore.open(path, "r").check()
    assert any("not contiguous at layer rows 5" in p for p in problems)
    assert any("ESD counts sum to" in p for p in problems)
    count[4] = count[4] - 1
    root["models/content_hash"][2] = "h0"  # m0 stored twice with the same hash
    root["models/version"][3] = 5  # m1 versions 1, 5
    problems = ZooStore.open(path, "r").check()
    assert any("('m0', h0...) stored more than once" in p for p in problems)
    assert any("versions of 'm1' are [1, 5]" in p for p in problems)
    assert zooscope_check(path) == 1
    assert "FAULT" in capsys.readouterr().out
    root["layers/model_row"][0] = 99
    assert any("model_row outside" in p for p in ZooStore.open(path, "r").check())
    root["models/model_id"].resize((2,))  # counters promise 5 models
    assert any("models/model_id: 2 rows" in p for p in ZooStore.open(path, "r").check())


def test_check_and_show_usage(sound_store, tmp_path, capsys):
    assert zooscope_check(tmp_path / "missing.zarr") == 2
    assert cli_main(["show", str(sound_store)]) == 0
    out = capsys.readouterr().out
    assert "5 models" in out and "x.pt: not a checkpoint" in out and "broken" in out
    every_column = ",".join(map(str, ZooStore.open(sound_store, "r").models().columns))
    assert cli_main(["show", str(sound_store), "--columns", every_column]) == 0  # piped: nothing folded to 80
    out = capsys.readouterr().out
    assert f"{sound_store}: 5 models" in out  # the long title on one line
    assert sum(line.startswith("│") for line in out.splitlines()) == 5  # a line a model
    assert cli_main(["show", str(sound_store), "--layers", "--model", "m1", "--latest",
                     "--columns", "name,alpha"]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and "block2.fc" in out
    assert cli_main(["show", str(sound_store), "--columns", "nope"]) == 2
    assert "unknown column" in capsys.readouterr().err


def test_params_recorded_and_mismatch_refused(tmp_path):
    path = tmp_path / "zoo.zarr"
    with ZooStore.open(path, "a", params={"min_evals": 10, "backend": "auto"}):
        pass
    with ZooStore.open(path, "a", params={"min_evals": 10, "backend": "auto"}):
        pass
    with pytest.raises(ValueError, match="min_evals"):
        ZooStore.open(path, "a", params={"min_evals": 8, "backend": "auto"})
    with ZooStore.open(path, "a") as store:  # the lock was released by the refused open
        store.set_params({"min_evals": 8})
    assert open_store(path).params == {"min_evals": 8}


def test_store_object_and_number_column_widened_to_text(rng):
    """Any zarr StoreLike works (no lock); a metadata column that held numbers and now gets text becomes text."""
    memory = zarr.storage.MemoryStore()
    with ZooStore.open(memory, "a", flush_every=1) as store:
        store.append({"model_id": "a", "tag": 3}, make_result(rng, 2))
        store.append({"model_id": "b", "tag": 2.5}, None)  # int -> float
        store.append({"model_id": "c", "tag": "gold"}, None)  # float -> text
    view = open_store(memory)
    assert view.models["tag"].tolist() == ["3.0", "2.5", "gold"]
    assert list(view.to_xarray("models")["tag"].values) == ["3.0", "2.5", "gold"]  # under its column name
    assert view.check() == []
