"""``base_model=`` (W − W_base) and ``peft=True`` (LoRA adapters) in ``zooscope.analyze`` and
``pipelines.derived.open_derived``: against WeightWatcher 0.7.7's ``base_model`` and, for LoRA, against
WeightWatcher run on a module holding the explicit numpy product ``W_base + B·A·lora_alpha/r`` (1e-6 relative).
"""
import contextlib
import io
import json
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ww_module = pytest.importorskip("weightwatcher")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402
from zooscope.pipelines.derived import open_derived  # noqa: E402
from zooscope.pipelines.readers import CheckpointError  # noqa: E402

RTOL = 1e-6
COLUMNS = ["alpha", "D", "xmin", "sigma", "num_pl_spikes", "lambda_max", "log_norm", "stable_rank"]


def _mlp(seed: int) -> torch.nn.Module:
    return heavy_tailed_(torch.nn.Sequential(
        torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 40)), seed=seed)


def _weightwatcher(model, base_model=None):
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watcher = ww_module.WeightWatcher(model=model, base_model=base_model)
        return watcher.analyze(min_evals=10).set_index("longname")


def _compare(ours, theirs):
    ours = ours.set_index("longname")
    assert sorted(ours.index) == sorted(theirs.index)
    for column in COLUMNS:
        np.testing.assert_allclose(ours.loc[theirs.index, column].to_numpy(float),
                                   theirs[column].to_numpy(float), rtol=RTOL, err_msg=column)


def test_base_model_matches_weightwatcher():
    base, tuned = _mlp(0), _mlp(1)
    theirs = _weightwatcher(tuned, base_model=base)
    _compare(zooscope.analyze(tuned, base_model=base, min_evals=10, ww_compat=True), theirs)
    plain = zooscope.analyze(tuned, min_evals=10)  # the base really changes the numbers
    assert not np.allclose(plain["alpha"], theirs["alpha"].to_numpy(float))


def test_base_model_from_files_reads_the_difference(tmp_path):
    base, tuned = _mlp(0), _mlp(1)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    safetensors_numpy.save_file({k: v.numpy() for k, v in tuned.state_dict().items()},
                                str(tmp_path / "tuned.safetensors"))
    with open_derived(tmp_path / "tuned.safetensors", base=tmp_path / "base.pt") as ckpt:
        for key, value in tuned.state_dict().items():
            np.testing.assert_array_equal(ckpt.read(key), value.numpy() - base.state_dict()[key].numpy())


def test_base_model_mismatch_names_both_files(tmp_path):
    torch.save(_mlp(0).state_dict(), tmp_path / "base.pt")
    other = torch.nn.Sequential(torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 65))
    torch.save(other.state_dict(), tmp_path / "tuned.pt")
    with pytest.raises(CheckpointError, match=r"tuned\.pt.*2\.weight.*base\.pt") as err:
        zooscope.analyze(str(tmp_path / "tuned.pt"), base_model=str(tmp_path / "base.pt"))
    assert "(65, 100)" in str(err.value) and "(64, 100)" in str(err.value)
    del other[2]
    torch.save({**other.state_dict(), "head.weight": torch.zeros(3, 3)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra\.pt.*head\.weight.*no tensor of that name.*base\.pt"):
        open_derived(tmp_path / "extra.pt", base=tmp_path / "base.pt")


def _adapter(path, base: torch.nn.Module, r: int, alpha: float, layers=("0", "2"), **config):
    """A PEFT-layout LoRA adapter directory for ``base``; returns {layer: B·A·scale} (numpy float64)."""
    rng = np.random.default_rng(7)
    path.mkdir()
    tensors, deltas = {}, {}
    for name in layers:
        out_f, in_f = base.get_submodule(name).weight.shape
        a = rng.standard_normal((r, in_f)).astype(np.float32)
        b = rng.standard_normal((out_f, r)).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        scale = alpha / (np.sqrt(r) if config.get("use_rslora") else r)
        deltas[name] = b.astype(np.float64) @ a.astype(np.float64) * scale
    safetensors_numpy.save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                         "target_modules": list(layers), **config}))
    return deltas


def _module_with(base: torch.nn.Module, weights: dict) -> torch.nn.Module:
    model = _mlp(0)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(torch.from_numpy(w))
    return model


@pytest.mark.parametrize("config", [{}, {"use_rslora": True}], ids=["alpha/r", "rslora"])
def test_lora_merged_with_base_matches_weightwatcher_on_the_merged_weights(tmp_path, config):
    base = _mlp(0)
    deltas = _adapter(tmp_path / "adapter", base, r=8, alpha=16, **config)
    merged = {n: base.get_submodule(n).weight.detach().double().numpy() + d for n, d in deltas.items()}
    theirs = _weightwatcher(_module_with(base, {n: w.astype(np.float32) for n, w in merged.items()}))
    ours = zooscope.analyze(str(tmp_path / "adapter"), peft=True, base_model=base, min_evals=10, ww_compat=True)
    _compare(ours, theirs)


def test_lora_alone_is_the_scaled_product(tmp_path):
    base = _mlp(0)
    deltas = _adapter(tmp_path / "adapter", base, r=20, alpha=5)
    with open_derived(tmp_path / "adapter", peft=True) as ckpt:
        assert ckpt.keys() == ["0.weight", "2.weight"] and ckpt.shape("0.weight") == (100, 300)
        for name, delta in deltas.items():
            np.testing.assert_allclose(ckpt.read(f"{name}.weight"), delta, rtol=1e-12)
    ours = zooscope.analyze(str(tmp_path / "adapter"), peft=True, min_evals=10).set_index("longname")
    assert list(ours.index) == ["0", "2"]
    for name, delta in deltas.items():
        sv = np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(ours.loc[name, "lambda_max"], sv[0] ** 2, rtol=RTOL)


def test_lora_errors_name_the_file(tmp_path):
    base = _mlp(0)
    _adapter(tmp_path / "adapter", base, r=4, alpha=4)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        open_derived(tmp_path, peft=True)
    small = torch.nn.Sequential(torch.nn.Linear(300, 99))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*\(100, 300\).*\(99, 300\)"):
        open_derived(tmp_path / "adapter", base=small, peft=True)
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "alpha_pattern": {"0": 3}}))
    with pytest.raises(CheckpointError, match="alpha_pattern"):
        zooscope.analyze(str(tmp_path / "adapter"), peft=True)
    with pytest.raises(CheckpointError, match="adapter directory"):
        zooscope.analyze(base, peft=True)


def test_lora_fan_in_fan_out_is_transposed(tmp_path):
    """GPT-2 ``Conv1D`` adapters (``fan_in_fan_out``): PEFT's delta is (B·A)ᵀ·scale, shape (in, out)."""
    deltas = _adapter(tmp_path / "adapter", _mlp(0), r=3, alpha=6, layers=("2",), fan_in_fan_out=True)
    conv1d_base = {"2.weight": np.ones((100, 64), dtype=np.float32)}  # HF Conv1D stores (in, out)
    with open_derived(tmp_path / "adapter", base=conv1d_base, peft=True) as ckpt:
        np.testing.assert_allclose(ckpt.read("2.weight"), (1.0 + deltas["2"].T).astype(np.float32), rtol=0)
