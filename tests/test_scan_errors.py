"""Which failures a scan stores and which it retries; identical files and model ids."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from zooscope.engine import run as run_module
from zooscope.engine.scan import ScanUsageError, scan
from zooscope.engine.store import ZooStore
from zooscope.pipelines import batch as batch_module


def _mlp(path, seed):
    rng = np.random.default_rng(seed)
    save_file({"fc0.weight": (rng.standard_t(3, size=(32, 40)) / 6).astype(np.float32),
               "fc1.weight": (rng.standard_t(3, size=(16, 32)) / 6).astype(np.float32)}, str(path))
    return path


def _models(store):
    with ZooStore.open(str(store)) as zoo:
        assert zoo.check() == []
        return zoo.models(), zoo.layers()


def test_transient_failure_is_not_stored_and_the_next_scan_retries(tmp_path, monkeypatch):
    for i in range(3):
        _mlp(tmp_path / f"m{i}.safetensors", i)
    store = tmp_path / "s.zarr"
    real = batch_module.analyze_batch

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(run_module, "analyze_batch", out_of_memory)
    report = scan([tmp_path], store, cluster="none", progress=False)
    assert (report.n_ok, report.n_error, report.n_retry, report.exit_code) == (0, 3, 3, 3)
    assert all("no room" in message and "retried by the next scan" in message for _, message in report.failed)
    assert len(_models(store)[0]) == 0  # nothing recorded under the files' hashes
    monkeypatch.setattr(run_module, "analyze_batch", real)
    again = scan([tmp_path], store, cluster="none", progress=False)
    assert (again.n_ok, again.n_error, again.n_skipped) == (3, 0, 0)


def test_a_file_whose_parser_fails_is_a_permanent_error(tmp_path):
    good = _mlp(tmp_path / "good.safetensors", 0)
    bad = tmp_path / "nested.pt"
    depth = 20000  # 20,000 nested dicts, written opcode by opcode (pickle.dumps itself would recurse too deep)
    bad.write_bytes(b"\x80\x02" + b"}X\x01\x00\x00\x00x" * depth + b"}" + b"s" * depth + b".")
    store = tmp_path / "s.zarr"
    report = scan([good, bad], store, cluster="none", progress=False)
    assert (report.n_ok, report.n_error, report.n_retry) == (1, 1, 0)
    models, _ = _models(store)
    row = models.set_index("model_id").loc["nested"]
    assert row["status"] == "error" and str(bad) in row["error"]
    assert scan([good, bad], store, cluster="none", progress=False).n_skipped == 2  # permanent: not retried


def test_retry_failed_stores_a_readable_retry_as_the_next_version(tmp_path, monkeypatch):
    path = _mlp(tmp_path / "m.safetensors", 0)
    store = tmp_path / "s.zarr"
    real = batch_module._Batch.add

    def flaky(self, part, ckpt, keys):
        raise batch_module.CheckpointError(ckpt.path, None, "disk said no")

    monkeypatch.setattr(batch_module._Batch, "add", flaky)
    assert scan([path], store, cluster="none", progress=False).n_error == 1
    monkeypatch.setattr(batch_module._Batch, "add", real)
    assert scan([path], store, cluster="none", progress=False).n_skipped == 1
    report = scan([path], store, cluster="none", progress=False, retry_failed=True)
    assert (report.n_ok, report.n_skipped) == (1, 0)
    models, layers = _models(store)
    assert models["status"].tolist() == ["error", "ok"] and models["version"].tolist() == [1, 2]
    assert set(layers["model_row"]) == {1}


def test_identical_files_under_different_names_each_get_a_row(tmp_path):
    first = _mlp(tmp_path / "a.safetensors", 0)
    for name in ("b", "c"):
        shutil.copy(first, tmp_path / f"{name}.safetensors")
    (tmp_path / "e1.pt").write_bytes(b"")
    (tmp_path / "e2.pt").write_bytes(b"")
    report = scan([tmp_path], tmp_path / "s.zarr", cluster="none", progress=False)
    assert (report.n_ok, report.n_error, report.n_skipped) == (3, 2, 0)
    models, layers = _models(tmp_path / "s.zarr")
    assert sorted(models["model_id"]) == ["a", "b", "c", "e1", "e2"]
    by_id = models.set_index("model_id")
    assert by_id.loc["e2", "error"].startswith(str(tmp_path / "e2.pt"))
    alphas = [layers.loc[layers["model_row"] == models.index[models["model_id"] == m][0], "alpha"].to_numpy()
              for m in ("a", "b", "c")]
    np.testing.assert_array_equal(alphas[0], alphas[1])
    np.testing.assert_array_equal(alphas[0], alphas[2])
    assert by_id.loc["b", "alpha"] == by_id.loc["a", "alpha"]
    assert scan([tmp_path], tmp_path / "s.zarr", cluster="none", progress=False).n_skipped == 5


def test_one_model_id_for_two_files_is_refused_before_the_store_is_touched(tmp_path):
    _mlp(tmp_path / "a.safetensors", 0)
    _mlp(tmp_path / "b.safetensors", 1)
    (tmp_path / "zoo.csv").write_text("path,model_id\na.safetensors,m\nb.safetensors,m\n")
    with pytest.raises(ScanUsageError, match="model_id 'm' names two files"):
        scan([], tmp_path / "s.zarr", manifest=tmp_path / "zoo.csv", progress=False)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("named", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_a_manifest_names_only_files_below_its_folder(tmp_path, named):
    root = tmp_path / "zoo"
    root.mkdir()
    outside = _mlp(tmp_path / "outside.safetensors", 0)
    (root / "link.safetensors").symlink_to(outside)
    (root / "zoo.csv").write_text(f"path\n{named}\n")
    with pytest.raises(ScanUsageError, match="outside the manifest's folder"):
        scan([], tmp_path / "s.zarr", manifest=root / "zoo.csv", progress=False)
    assert not (tmp_path / "s.zarr").exists()
