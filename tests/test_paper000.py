"""Paper 000 end to end on digits, as the README example (sweep -> scan -> report), small: 60 minimal DNNs
(64-5-5-10, Adam, normal init) trained at once. The paper's main finding, in direction: high-accuracy networks vary
less across trials in their converged weight statistics than low-accuracy ones."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from zooscope.cli import main

TRIALS, EPOCHS = 60, 40


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("p000")
    zoo, store, html = root / "zoo", root / "zoo.zarr", root / "report.html"
    assert main(["sweep", "--out", str(zoo), "--widths", "5", "--depth", "2", "--trials", str(TRIALS),
                 "--epochs", str(EPOCHS), "--checkpoints", "2", "--optimizer", "adam", "--init", "normal",
                 "--batch-size", "100", "--device", "cpu", "--threads", "1", "--quiet"]) == 0
    assert main(["scan", "--manifest", str(zoo / "manifest.csv"), "--store", str(store), "--cluster", "none",
                 "--min-evals", "1", "--no-progress"]) == 0
    assert main(["report", str(store), "--out", str(html)]) == 0
    from zooscope.engine.store import ZooStore

    with ZooStore.open(str(store), "r") as s:
        models, layers = s.models(), s.layers()
    return zoo, models, layers, html.read_text()


def _final(models):
    return models[models["step"] == EPOCHS].set_index("model_id")


def test_accuracy_groups_become_model_columns(pipeline):
    zoo, models, _, _ = pipeline
    manifest = pd.read_csv(zoo / "manifest.csv").set_index("model_id")
    final = _final(models)
    assert len(final) == TRIALS and final["acc_group"].value_counts().to_dict() == {"low": 20, "mid": 20, "high": 20}
    np.testing.assert_allclose(final["final_acc"], manifest.loc[final.index, "test_acc"], rtol=0, atol=0)
    order = final.sort_values("final_acc")["acc_group"].tolist()  # tertiles: groups are contiguous in accuracy
    assert order == ["low"] * 20 + ["mid"] * 20 + ["high"] * 20


def test_high_accuracy_networks_vary_less_across_trials(pipeline):
    _, models, layers, _ = pipeline
    final = _final(models)
    stds = {}
    for model_id, row in final.iterrows():
        w = load_file(row["path"])  # the store keeps absolute paths
        stds[model_id] = np.concatenate([v.ravel() for v in w.values() if v.ndim == 2]).astype(np.float64).std()
    pooled = pd.Series(stds).groupby(final["acc_group"]).std(ddof=1)
    # the scan's per-layer w_std of the first layer, checked against numpy on one checkpoint
    rows = final.reset_index().reset_index(names="pos")
    lab = layers  # the store's layer rows carry their model_id
    fc1 = lab[(lab["name"] == "fc1") & lab["model_id"].isin(final.index)].set_index("model_id")["w_std"]
    one = rows["model_id"].iloc[0]
    w = load_file(final.loc[one, "path"])["fc1.weight"]
    assert fc1[one] == pytest.approx(w.astype(np.float64).std(), rel=1e-9)
    spread = fc1.groupby(final["acc_group"]).std(ddof=1)
    assert pooled["high"] < 0.75 * pooled["low"], pooled.to_dict()
    assert spread["high"] < 0.75 * spread["low"], spread.to_dict()


def test_report_has_the_paper000_section(pipeline):
    _, models, layers, html = pipeline
    start = html.index("Paper 000 accuracy groups: digits × mlp-w5</h2>")
    section = html[start:html.index("</section>", start) if "</section>" in html[start:] else len(html)]
    for heading in ("Weight mean and standard deviation by group", "Weight distributions by group",
                    "Node strength per layer by group", "t-SNE map of the weight vectors"):
        assert heading in section
    assert section.count("<img") >= 3
    # the table's spread of fc1 w_std across the high group's trials equals the store's numbers
    final = _final(models)
    lab = layers  # the store's layer rows carry their model_id
    fc1 = lab[(lab["name"] == "fc1") & lab["model_id"].isin(final.index)]
    high = fc1[fc1["model_id"].map(final["acc_group"]) == "high"]["w_std"]
    cells = re.search(r"<td>fc1</td>\s*<td>high</td>\s*<td>20</td>(.*?)</tr>", section, re.S)
    values = [float(v) for v in re.findall(r"<td>([-0-9.e]+)</td>", cells.group(1))]
    assert values[2] == pytest.approx(high.mean(), rel=1e-3) and values[3] == pytest.approx(high.std(), rel=1e-3)
