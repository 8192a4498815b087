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


# ---- the general batched trainer (torch.func vmap) -------------------------------------------------------------

def _stack(arch, data, seeds, scheme="glorot-uniform"):
    from zooscope.pipelines.archs import init_params

    module = arch.build(data.n_features, data.n_classes, data.image_shape)
    inits = [init_params(module, s, scheme) for s in seeds]
    return inits, {k: np.stack([p[k] for p in inits]) for k in inits[0]}


def test_general_trainer_reproduces_the_mlp_trainer(digits):
    """train_zoo (vmap + autograd + torch.optim.SGD) gives the hand-written bmm trainer's numbers, masked fc2 too."""
    from zooscope.pipelines.archs import Arch
    from zooscope.pipelines.sweep import train_zoo

    seeds, width = (0, 7, 3), 24
    inits, params = stacked(seeds, width, digits, mask=letter_mask("K", width, width))
    general = train_zoo(Arch("mlp", width, 2), params, digits, seeds, epochs=2, dtype="float64", device="cpu")
    hand = train_batched(params, digits, seeds, epochs=2, dtype="float64", device="cpu")
    for k in KEYS:
        np.testing.assert_allclose(general[k], hand[k], rtol=0, atol=1e-12, err_msg=k)
    assert max(np.abs(hand[k] - params[k]).max() for k in KEYS) > 1e-2


@pytest.mark.parametrize("kind, width, depth", [("cnn", 4, 2), ("vit", 8, 1), ("mlp", 6, 3)])
def test_batched_adam_equals_per_network_loop(digits, kind, width, depth):
    """Every network of a vmap-batched zoo trains to the weights the plain torch.nn + torch.optim.Adam loop gives."""
    from zooscope.pipelines.archs import Arch
    from zooscope.pipelines.sweep import train_zoo

    arch, seeds = Arch(kind, width, depth, heads=2, patch=4), (2, 5)
    inits, params = _stack(arch, digits, seeds, "normal")
    batched = train_zoo(arch, params, digits, seeds, epochs=1, optimizer="adam", batch_size=100, dtype="float64",
                        device="cpu")
    for i, seed in enumerate(seeds):
        alone = train_one(inits[i], digits, seed, epochs=1, arch=arch, optimizer="adam", batch_size=100,
                          dtype="float64", device="cpu")
        assert sorted(alone) == sorted(batched)
        for k in alone:
            np.testing.assert_allclose(batched[k][i], alone[k], rtol=0, atol=1e-10, err_msg=f"{kind} {seed} {k}")
        assert max(np.abs(alone[k] - inits[i][k]).max() for k in alone) > 5e-3  # Adam moved every network


def test_cnn_and_vit_forward_match_torch_reference_ops():
    """The vmap-friendly CNN (im2col by slices) and ViT (attention by matmuls) equal conv2d/max_pool2d and
    scaled_dot_product_attention."""
    import torch
    from torch.nn import functional as F

    from zooscope.pipelines.archs import Arch

    torch.manual_seed(0)
    x = torch.randn(5, 3 * 9 * 7, dtype=torch.float64)
    cnn = Arch("cnn", 4, 2).build(3 * 9 * 7, 6, (3, 9, 7)).double()
    h = x.reshape(5, 3, 9, 7)
    for i in (1, 2):
        conv = getattr(cnn, f"conv{i}")
        h = F.max_pool2d(F.relu(F.conv2d(h, conv.weight, conv.bias, padding=1)), 2)
    torch.testing.assert_close(cnn(x), cnn.out(h.flatten(1)), rtol=0, atol=1e-12)

    vit = Arch("vit", 8, 1, heads=2, patch=2).build(1 * 4 * 6, 3, (1, 4, 6)).double()
    x = torch.randn(5, 24, dtype=torch.float64)
    p = x.reshape(5, 1, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(5, 6, 4)
    t = vit.embed(p) + vit.pos
    blk = vit.blocks[0]
    q, k, v = blk.qkv(blk.norm1(t)).reshape(5, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    t = t + blk.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(5, 6, 8))
    t = t + blk.fc2(F.relu(blk.fc1(blk.norm2(t))))
    torch.testing.assert_close(vit(x), vit.out(vit.norm(t.mean(1))), rtol=0, atol=1e-12)


def test_init_schemes_follow_their_distributions():
    from zooscope.pipelines.archs import Arch, init_params

    module = Arch("cnn", 20, 2).build(3 * 8 * 8, 10, (3, 8, 8))
    fan_in, fan_out = 20 * 9, 20 * 9  # conv2.weight (20, 20, 3, 3)
    expected = {
        "glorot-uniform": scipy.stats.uniform(-np.sqrt(6 / (fan_in + fan_out)), 2 * np.sqrt(6 / (fan_in + fan_out))),
        "glorot-normal": scipy.stats.norm(0, np.sqrt(2 / (fan_in + fan_out))),
        "he-uniform": scipy.stats.uniform(-np.sqrt(6 / fan_in), 2 * np.sqrt(6 / fan_in)),
        "he-normal": scipy.stats.norm(0, np.sqrt(2 / fan_in)),
        "normal": scipy.stats.norm(0, 0.05),
        "uniform": scipy.stats.uniform(-0.05, 0.1),
    }
    for scheme, dist in expected.items():
        p = init_params(module, 3, scheme)
        w = p["conv2.weight"].ravel()
        assert scipy.stats.kstest(w, dist.cdf).pvalue > 1e-3, scheme
        for other in set(expected) - {scheme}:  # and no other scheme's
            assert scipy.stats.kstest(w, expected[other].cdf).pvalue < 1e-6, (scheme, other)
        assert not p["conv2.bias"].any() and not p["out.bias"].any()
        assert np.array_equal(p["conv2.weight"], init_params(module, 3, scheme)["conv2.weight"])
    with pytest.raises(ValueError, match="init must be one of"):
        init_params(module, 0, "orthogonal")


def test_paper000_sweep_manifest_carries_accuracy_groups(tmp_path, digits):
    m = sweep(tmp_path, widths=(4, 6), seeds=range(9), epochs=1, arch="cnn", depth=1,
              optimizer="adam", init="normal", batch_size=100, device="cpu")
    assert list(m.columns) == MANIFEST_COLUMNS
    assert set(m["arch"]) == {"cnn"} and set(m["optimizer"]) == {"adam"} and set(m["init_scheme"]) == {"normal"}
    assert set(m["series"]) == {"cnn-d1-w4", "cnn-d1-w6"}
    for series, rows in m.groupby("series"):
        final = rows[rows["step"] == 1].set_index("seed")
        np.testing.assert_array_equal(final["final_acc"], final["test_acc"])
        # tertiles of the final test accuracy within the series, as pandas.qcut (right-closed) puts them
        ref = pd.qcut(final["test_acc"], 3, labels=["low", "mid", "high"]).astype(str)
        assert (final["acc_group"] == ref).all(), series
        for seed, net in rows.groupby("seed"):  # every checkpoint of a network carries its final group
            assert (net["acc_group"] == final.loc[seed, "acc_group"]).all()
        w = read(tmp_path / final["path"].iloc[0])
        assert w["conv1.weight"].shape == (int(series[-1]), 1, 3, 3)
    fixed = sweep(tmp_path / "edges", widths=(4,), seeds=range(6), epochs=1, arch="cnn", depth=1,
                  optimizer="adam", init="normal", group_edges=(0.3, 0.5), device="cpu")
    last = fixed[fixed["step"] == 1]
    expect = np.where(last["final_acc"] < 0.3, "low", np.where(last["final_acc"] < 0.5, "mid", "high"))
    assert (last["acc_group"].to_numpy() == expect).all()
    with pytest.raises(ValueError, match="image data"):
        sweep(tmp_path / "bad", widths=(4,), seeds=(0,), epochs=1, arch="cnn", dataset="wine")
    with pytest.raises(ValueError, match="increasing"):
        sweep(tmp_path / "bad2", widths=(4,), seeds=(0,), epochs=1, group_edges=(0.9, 0.5))


def test_cli_sweep_paper000_flags(tmp_path, capsys):
    from zooscope.cli import main

    out = tmp_path / "vit"
    rc = main(["sweep", "--out", str(out), "--arch", "vit", "--depth", "1", "--widths", "8", "--heads", "2",
               "--patch", "4", "--trials", "6", "--epochs", "1", "--optimizer", "adam", "--init", "normal",
               "--batch-size", "100", "--device", "cpu", "--quiet"])
    assert rc == 0
    assert "vit-d1-w8-h2" in capsys.readouterr().out
    m = pd.read_csv(out / "manifest.csv")
    assert len(m) == 6 * 2 and set(m["acc_group"]) <= {"low", "mid", "high"} and set(m["arch"]) == {"vit"}
    w = read(out / m["path"].iloc[-1])
    assert w["blocks.0.qkv.weight"].shape == (24, 8) and w["pos"].shape == (4, 8)
    assert main(["sweep", "--out", str(tmp_path / "x"), "--arch", "cnn", "--dataset", "iris", "--quiet"]) == 2
    assert "image data" in capsys.readouterr().err


@requires_torch_cuda
def test_cuda_zoo_matches_cpu_fp64(digits):
    from zooscope.pipelines.archs import Arch
    from zooscope.pipelines.sweep import train_zoo

    arch, seeds = Arch("cnn", 4, 1), (0, 1, 2)
    _, params = _stack(arch, digits, seeds, "normal")
    gpu = train_zoo(arch, params, digits, seeds, epochs=1, optimizer="adam", dtype="float64", device="cuda")
    cpu = train_zoo(arch, params, digits, seeds, epochs=1, optimizer="adam", dtype="float64", device="cpu")
    for k in cpu:
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=0, atol=1e-9, err_msg=k)
