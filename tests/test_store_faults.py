"""Store faults: hostile strings and column names, missing values, write failures, and ``check`` on damaged chunks."""
from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

from zooscope.cli import main as cli_main
from zooscope.engine import store as store_module
from zooscope.engine.store import StoreWriteError, ZooStore, check_column_names, open_store
from test_store import make_result


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(3)


def test_lone_surrogates_are_stored_as_escapes(tmp_path, rng):
    res = make_result(rng, 2)
    res.layers.loc[0, "name"] = "bad\ud800key"
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "m\udcff", "path": "/z/m\udcff.pt", "tag": "x\ud800"}, res)
    view = open_store(path)
    assert view.models["model_id"].tolist() == ["m\\udcff"]
    assert view.models["tag"].tolist() == ["x\\ud800"]
    assert view.layers["name"].tolist()[0] == "bad\\ud800key"
    assert view.check() == []


@pytest.mark.parametrize("name", ["", " ", "a/b", "x/../../y", "..", ".hidden", "zarr.json", "c", "__x", "c~str",
                                  "a\\b", "nul\0", 3])
def test_bad_column_names_refused_before_any_write(tmp_path, rng, name):
    with pytest.raises(ValueError, match="Invalid model column name"):
        check_column_names([name], "model column")
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "good"}, make_result(rng, 1))
        with pytest.raises(ValueError, match="Invalid model column name"):
            store.append({"model_id": "bad", name: 1}, make_result(rng, 1))
    view = open_store(path)
    assert view.models["model_id"].tolist() == ["good"] and view.check() == []
    stored = set(view.store._columns["models"].values()) | {"zarr.json"}
    assert set(os.listdir(path / "models")) == stored  # no nested group, no stray array


def test_manifest_with_bad_column_is_refused_before_the_store_exists(tmp_path, capsys):
    np.savez(tmp_path / "m.npz", w=np.ones((30, 20)))
    (tmp_path / "zoo.csv").write_text("path,zarr.json\nm.npz,1\n")
    assert cli_main(["scan", "--manifest", str(tmp_path / "zoo.csv"), "--store", str(tmp_path / "s.zarr"),
                     "--cluster", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'zarr.json'" in err and err.count("\n") == 1 and not (tmp_path / "s.zarr").exists()


def test_widened_column_never_overwrites_a_user_column(tmp_path, rng, monkeypatch):
    """An older store may hold a user column named ``c~str``; widening ``c`` to text picks another array name."""
    monkeypatch.setattr(store_module, "check_column_names", lambda *a, **k: None)  # as stores made before it
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a", flush_every=1) as store:
        store.append({"model_id": "a", "c": 1, "c~str": "user"}, None)
        store.append({"model_id": "b", "c": "text", "c~str": "data"}, None)
    models = open_store(path).models
    assert models["c~str"].tolist() == ["user", "data"] and models["c"].tolist() == ["1", "text"]
    assert open_store(path).check() == []


def test_missing_ints_and_bools_read_back_as_missing(tmp_path, rng):
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a", flush_every=1) as store:
        store.append({"model_id": "a", "epochs": 3, "pruned": True}, make_result(rng, 1))
        store.append({"model_id": "b"}, make_result(rng, 1))  # missing in a later batch
        store.append({"model_id": "c", "late": 5, "flag": False}, None)  # new columns after committed rows
    models = open_store(path).models
    np.testing.assert_array_equal(models["epochs"], [3, np.nan, np.nan])
    np.testing.assert_array_equal(models["pruned"], [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(models["late"], [np.nan, np.nan, 5])
    np.testing.assert_array_equal(models["flag"], [np.nan, np.nan, 0.0])
    assert models["n_params"].isna().tolist() == [False, False, True]


def test_layers_carry_model_id_and_keep_columns_when_every_model_failed(tmp_path, rng):
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "bad", "error": "x.pt: truncated"}, None)
    layers = open_store(path).layers
    assert len(layers) == 0 and {"model_id", "status", "name", "N"} <= set(layers.columns)
    assert layers["status"].tolist() == []
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "m1"}, make_result(rng, 2))
        store.append({"model_id": "m2"}, make_result(rng, 3))
    view = open_store(path)
    layers = view.layers
    assert layers.columns[0] == "model_id"
    assert layers["model_id"].tolist() == view.models["model_id"].reindex(layers["model_row"]).tolist()
    assert layers["model_id"].tolist() == ["m1"] * 2 + ["m2"] * 3


def test_partial_files_removed_on_recovery(tmp_path, rng):
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "a"}, make_result(rng, 2))
    stray = [path / "layers" / "alpha" / "c" / f"1.{'ab' * 16}.partial", path / f"zarr.{'0f' * 16}.partial"]
    for f in stray:
        f.write_bytes(b"half")
    ZooStore.open(path, "a").close()
    assert not any(f.exists() for f in stray)
    assert open_store(path).check() == []


def test_disk_full_is_a_clear_error_and_the_store_stays_intact(tmp_path, rng, monkeypatch):
    path = tmp_path / "s.zarr"
    with ZooStore.open(path, "a") as store:
        store.append({"model_id": "a"}, make_result(rng, 2))
    real = store_module._write_all

    def full(writes):
        real(writes[:1])  # some data reaches the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_write_all", full)
    store = ZooStore.open(path, "a")
    store.append({"model_id": "b"}, make_result(rng, 3))
    with pytest.raises(StoreWriteError, match="No space left on device.*intact"):
        store.flush()
    store.close()  # no second error: the lock is released
    monkeypatch.setattr(store_module, "_write_all", real)
    view = open_store(path)
    assert view.models["model_id"].tolist() == ["a"] and view.check() == []
    with ZooStore.open(path, "a") as store:  # the next writer gets in and the store grows again
        store.append({"model_id": "b"}, make_result(rng, 3))
    assert open_store(path).check() == [] and len(open_store(path)) == 2


def test_disk_full_while_trimming_after_the_last_commit_is_a_store_write_error(tmp_path, rng, monkeypatch):
    path = tmp_path / "s.zarr"
    store = ZooStore.open(path, "a")
    store.append({"model_id": "a"}, make_result(rng, 2))

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_truncate", full)
    with pytest.raises(StoreWriteError, match="cannot write the store.*No space left on device.*intact"):
        store.close()
    view = open_store(path)
    assert view.models["model_id"].tolist() == ["a"] and view.check() == []
    with ZooStore.open(path, "a") as again:  # the lock was released
        again.append({"model_id": "b"}, make_result(rng, 1))


def test_unwritable_store_location_is_a_store_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreWriteError, match="cannot write the store"):
        ZooStore.open(blocker / "s.zarr", "a")  # its parent is a file: ENOTDIR, as a read-only disk gives EROFS


def test_cli_scan_disk_full_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", w=rng.standard_normal((40, 30)))

    def full(writes):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_write_all", full)
    code = cli_main(["scan", str(tmp_path / "m.npz"), "--store", str(tmp_path / "s.zarr"), "--cluster", "none",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


@pytest.fixture
def sound(tmp_path) -> str:
    rng = np.random.default_rng(5)
    path = tmp_path / "sound.zarr"
    with ZooStore.open(path, "a", flush_every=2) as store:
        for i in range(5):
            store.append({"model_id": f"m{i}"}, make_result(rng, 3))
    assert open_store(path).check() == []
    return str(path)


def _damage(path: str, how: str) -> None:
    chunk = {"alpha": "layers/alpha/c/0", "esd": "esd/values/c/0", "model_id": "models/model_id/c/0",
             "status": "layers/status/c/0", "counts": "hist/counts/c/0/0"}
    kind, what = how.split(":")
    f = os.path.join(path, chunk[what])
    if kind == "delete":
        os.remove(f)
    elif kind == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    else:  # corrupt: same length, other bytes
        data = bytearray(open(f, "rb").read())
        data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
        data[:8] = b"\xff" * 8
        open(f, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["delete:alpha", "delete:esd", "delete:model_id", "delete:status", "delete:counts",
                                 "truncate:alpha", "truncate:esd", "corrupt:esd", "corrupt:model_id",
                                 "truncate:model_id"])
def test_check_reports_damaged_chunks_and_never_crashes(sound, tmp_path, capsys, how):
    damaged = str(tmp_path / "damaged.zarr")
    shutil.copytree(sound, damaged)
    _damage(damaged, how)
    assert cli_main(["check", damaged]) == 1
    out = capsys.readouterr().out
    assert "FAULT" in out and "Traceback" not in out
    if how.startswith("delete") and not how.endswith("model_id"):  # model_id is an index column --fast reads
        assert cli_main(["check", damaged, "--fast"]) == 0  # --fast reads no data chunk


def test_reader_opened_before_a_widening_still_reads_the_values(tmp_path, rng):
    path = tmp_path / "s.zarr"
    writer = ZooStore.open(path, "a", flush_every=1)
    writer.append({"model_id": "a", "epochs": 7}, make_result(rng, 1))
    reader = ZooStore.open(path, "r")
    writer.append({"model_id": "b", "epochs": 2.5}, make_result(rng, 1))  # int -> float: a new array
    assert reader.models()["epochs"].tolist() == [7]  # the reader's committed view, not -1 or NaN
    writer.close()
    reader.reload()
    assert reader.models()["epochs"].tolist() == [7.0, 2.5]
    assert sorted(os.listdir(path / "models")).count("epochs") == 0  # the superseded array is gone after close
