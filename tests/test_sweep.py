"""zooscope sweep: batched trainer vs a plain torch.nn/autograd loop, checkpoints, manifest, letter masks, and
paper 001's direction of effect (wider networks move less from their initialization at a fixed train loss)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.special
import scipy.stats
from conftest import requires_torch_cuda
from safetensors import safe_open

from zooscope.kernels.backends import BackendUnavailable, torch_cuda_available
from zooscope.kernels.drift import rmsd
from zooscope.pipelines.datasets import available_datasets, load_dataset
from zooscope.pipelines.letters import letter_mask
from zooscope.pipelines.sweep import (
    KEYS, MANIFEST_COLUMNS, checkpoint_epochs, init_mlp, sweep, train_batched, train_one,
)

WEIGHTS = ("fc1.weight", "fc2.weight", "out.weight")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def read(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def stacked(seeds, width, data, mask=None):
    inits = [init_mlp(s, width, data.n_features, data.n_classes, mask=mask) for s in seeds]
    return inits, {k: np.stack([p[k] for p in inits]) for k in KEYS}


def test_batched_trainer_equals_per_network_loop(digits):
    # 1437 training rows: 11 full batches of 128 and a last one of 29, per network in its own order.
    seeds, width, epochs = (0, 7), 24, 2
    inits, params = stacked(seeds, width, digits, mask=letter_mask("K", width, width))
    batched = train_batched(params, digits, seeds, epochs=epochs, dtype="float64", device="cpu")
    for i, seed in enumerate(seeds):
        alone = train_one(inits[i], digits, seed, epochs=epochs, dtype="float64", device="cpu")
        for k in KEYS:
            assert batched[k][i].dtype == np.float64
            np.testing.assert_allclose(batched[k][i], alone[k], rtol=0, atol=1e-10, err_msg=f"seed {seed} {k}")
        moved = max(np.abs(alone[k] - inits[i][k]).max() for k in KEYS)
        assert moved > 1e-2  # training really happened, so the comparison means something


def test_network_does_not_depend_on_the_rest_of_the_batch(digits):
    _, both = stacked((4, 9), 16, digits)
    _, alone = stacked((9,), 16, digits)
    a = train_batched(both, digits, (4, 9), epochs=2, dtype="float64", device="cpu")
    b = train_batched(alone, digits, (9,), epochs=2, dtype="float64", device="cpu")
    for k in KEYS:
        np.testing.assert_allclose(a[k][1], b[k][0], rtol=0, atol=1e-12)


def test_glorot_uniform_init_and_zero_biases():
    width, n_in, n_out = 300, 64, 10
    p = init_mlp(11, width, n_in, n_out)
    assert p["fc1.weight"].shape == (width, n_in) and p["out.weight"].shape == (n_out, width)
    for name, fan_in, fan_out in (("fc1", n_in, width), ("fc2", width, width), ("out", width, n_out)):
        w, limit = p[f"{name}.weight"], np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.98 * limit
        assert scipy.stats.kstest(w.ravel(), scipy.stats.uniform(-limit, 2 * limit).cdf).pvalue > 1e-3
        assert not p[f"{name}.bias"].any()
    again, other = init_mlp(11, width, n_in, n_out), init_mlp(12, width, n_in, n_out)
    assert all(np.array_equal(p[k], again[k]) for k in KEYS)
    assert not np.array_equal(p["fc1.weight"], other["fc1.weight"])


def test_checkpoint_epochs_log_spaced_with_first_and_last():
    for epochs, k in [(50, 8), (1000, 10), (10, 8), (7, 7), (5, 2), (100, 30)]:
        e = checkpoint_epochs(epochs, k)
        assert len(e) == k and e[0] == 0 and e[-1] == epochs and np.all(np.diff(e) > 0)
    # Without collisions the picks are exactly the rounded geometric sequence 1 .. epochs.
    assert checkpoint_epochs(1000, 10)[1:] == np.rint(np.geomspace(1, 1000, 9)).astype(int).tolist()
    assert checkpoint_epochs(4, None) == [0, 1, 2, 3, 4] and checkpoint_epochs(4, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        checkpoint_epochs(10, 1)


def test_sweep_writes_manifest_and_readable_checkpoints(tmp_path, digits):
    m = sweep(tmp_path, widths=(8, 20), seeds=(1, 2), epochs=6, checkpoints=4, dtype="float64", device="cpu")
    assert list(m.columns) == MANIFEST_COLUMNS
    assert m.equals(pd.read_csv(tmp_path / "manifest.csv", keep_default_na=False).astype(m.dtypes.to_dict()))
    assert len(m) == 2 * 2 * 4 and m["model_id"].is_unique
    assert sorted(set(m["step"])) == checkpoint_epochs(6, 4)
    assert set(m["series"]) == {"mlp-w8", "mlp-w20"} and set(m["dataset"]) == {"digits"}
    for (width, seed), net in m.groupby(["width", "seed"]):
        first = net[net["step"] == 0].iloc[0]
        assert (net["init"] == first["model_id"]).all()
        for row in net.itertuples():
            assert not row.path.startswith("/")
            w = read(tmp_path / row.path)
            assert sorted(w) == sorted(KEYS)
            assert w["fc1.weight"].shape == (width, 64) and w["fc2.weight"].shape == (width, width)
            assert w["out.weight"].shape == (10, width) and w["out.bias"].shape == (10,)
            # Metrics in the manifest against an independent numpy/scipy forward pass on the saved weights.
            for split, X, y in (("train", digits.X_train, digits.y_train), ("test", digits.X_test, digits.y_test)):
                h = np.maximum(X @ w["fc1.weight"].T + w["fc1.bias"], 0)
                h = np.maximum(h @ w["fc2.weight"].T + w["fc2.bias"], 0)
                logits = h @ w["out.weight"].T + w["out.bias"]
                loss = -scipy.special.log_softmax(logits, axis=1)[np.arange(len(y)), y].mean()
                assert getattr(row, f"{split}_loss") == pytest.approx(loss, rel=1e-10)
                assert getattr(row, f"{split}_acc") == pytest.approx((logits.argmax(1) == y).mean(), abs=1e-12)
        # Epoch 0 is the Glorot init of this seed.
        w0, init = read(tmp_path / first["path"]), init_mlp(seed, width, 64, 10)
        assert all(np.array_equal(w0[k], init[k]) for k in KEYS)
    # The last checkpoint of one network equals the plain loop trained alone from the same seed.
    last = read(tmp_path / m.loc[(m["width"] == 20) & (m["seed"] == 2) & (m["step"] == 6), "path"].iloc[0])
    alone = train_one(init_mlp(2, 20, 64, 10), digits, 2, epochs=6, dtype="float64", device="cpu")
    for k in KEYS:
        np.testing.assert_allclose(last[k], alone[k], rtol=0, atol=1e-10)
    final = m[m["step"] == 6]
    assert (final["train_loss"] < m[m["step"] == 0]["train_loss"].to_numpy()).all()
    with pytest.raises(FileExistsError):
        sweep(tmp_path, widths=(8,), seeds=(1,), epochs=1)


def test_letter_mask_shapes():
    o = letter_mask("O", 40, 40)
    assert not o[20, 20] and o[20, :4].any() and o[:4, 20].any()  # hole in the middle, ring around
    ell = letter_mask("L", 30, 30)
    assert ell[-3:, :].mean() > 0.8 and ell[:15, 20:].sum() == 0  # bottom bar, nothing top-right
    assert letter_mask("a", 10, 17).shape == (10, 17)
    with pytest.raises(ValueError, match="single ASCII letter"):
        letter_mask("AB", 10, 10)


def test_masked_sweep_zeroes_fc2_outside_the_letter_at_init(tmp_path):
    m = sweep(tmp_path, widths=(32,), seeds=(0,), epochs=1, mask="A", dtype="float64", device="cpu")
    inside = letter_mask("A", 32, 32)
    assert 0.2 < inside.mean() < 0.8
    w0 = read(tmp_path / m.loc[m["step"] == 0, "path"].iloc[0])["fc2.weight"]
    assert not w0[~inside].any() and np.all(w0[inside] != 0)
    w1 = read(tmp_path / m.loc[m["step"] == 1, "path"].iloc[0])["fc2.weight"]
    assert np.abs(w1[~inside]).max() > 0  # the mask applies to the initial weights only
    assert set(m["mask"]) == {"A"}


def test_wider_networks_move_less_from_init_at_a_fixed_train_loss(tmp_path):
    """Paper 001 Figure 6: at the first checkpoint with train loss <= theta, RMSD from init falls with width.

    Width 16 needs about 7-10 epochs to reach theta = 0.5 on digits, width 256 about 3, so each trains only
    as long as it needs (two sweeps). RMSD over all weight matrices (biases start at zero and are left out).
    """
    theta, seeds = 0.5, (0, 1)
    m = pd.concat([
        sweep(tmp_path / "narrow", widths=(16,), seeds=seeds, epochs=12, device="cpu").assign(root="narrow"),
        sweep(tmp_path / "wide", widths=(256,), seeds=seeds, epochs=5, device="cpu").assign(root="wide"),
    ])

    def flat(root, model_id):
        path = m.loc[m["model_id"] == model_id, "path"].iloc[0]
        w = read(tmp_path / root / path)
        return np.concatenate([w[k].ravel() for k in WEIGHTS])

    at_theta = {}
    for (width, seed), net in m.groupby(["width", "seed"]):
        reached = net[net["train_loss"] <= theta].sort_values("step")
        assert len(reached), f"width {width} seed {seed} never reached train loss {theta}"
        row = reached.iloc[0]
        at_theta[width, seed] = rmsd(flat(row["root"], row["init"]), flat(row["root"], row["model_id"]))
    for seed in seeds:
        assert at_theta[256, seed] < at_theta[16, seed], at_theta


def test_datasets(tmp_path):
    d = load_dataset("digits")
    assert d.X_train.shape == (1437, 64) and d.X_test.shape == (360, 64) and d.n_classes == 10
    varying = d.X_train.std(0) > 0
    np.testing.assert_allclose(d.X_train[:, varying].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(d.X_train[:, varying].std(0), 1, atol=1e-12)
    np.testing.assert_allclose(np.bincount(d.y_test) / len(d.y_test),  # stratified split
                               np.bincount(d.y_train) / len(d.y_train), atol=0.01)
    for name in ("iris", "wine", "breast_cancer"):
        assert name in available_datasets() and load_dataset(name).n_classes in (2, 3)
    rng = np.random.default_rng(0)
    arrays = dict(X_train=rng.normal(size=(50, 3, 2)), y_train=rng.integers(0, 4, 50),
                  X_test=rng.normal(size=(20, 3, 2)), y_test=rng.integers(0, 4, 20))
    np.savez(tmp_path / "mine.npz", **arrays)
    mine = load_dataset(tmp_path / "mine.npz")
    np.testing.assert_array_equal(mine.X_train, arrays["X_train"].reshape(50, 6))
    del arrays["y_test"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="y_test"):
        load_dataset(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_mnist1d_when_installed():
    pytest.importorskip("mnist1d")
    d = load_dataset("mnist1d")
    assert d.n_features == 40 and d.n_classes == 10 and len(d.X_train) > len(d.X_test) > 0


def test_cli_sweep(tmp_path, capsys):
    from zooscope.cli import main

    out = tmp_path / "zoo"
    rc = main(["sweep", "--out", str(out), "--widths", "5,7", "--n-seeds", "2", "--epochs", "3",
               "--checkpoints", "3", "--dataset", "iris", "--fp64", "--device", "cpu", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"zooscope scan --manifest {out / 'manifest.csv'} --store {out / 'zoo.zarr'}" in text
    m = pd.read_csv(out / "manifest.csv")
    assert len(m) == 2 * 2 * 3 and set(m["dataset"]) == {"iris"}
    assert read(out / m["path"].iloc[0])["fc1.weight"].dtype == np.float64
    assert main(["sweep", "--out", str(out), "--epochs", "1"]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.skipif(torch_cuda_available(), reason="checks the error raised without torch.cuda")
def test_cuda_without_gpu_raises(digits):
    _, params = stacked((0,), 4, digits)
    with pytest.raises(BackendUnavailable):
        train_batched(params, digits, (0,), epochs=1, device="cuda")


@requires_torch_cuda
def test_cuda_matches_cpu_fp64(digits):
    seeds = (0, 1)
    _, params = stacked(seeds, 32, digits)
    gpu = train_batched(params, digits, seeds, epochs=2, dtype="float64", device="cuda")
    cpu = train_batched(params, digits, seeds, epochs=2, dtype="float64", device="cpu")
    for k in KEYS:
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=0, atol=1e-10)
