"""Paper 001 Fig. 1 in the report: weight-matrix images at each checkpoint of a masked sweep."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import zooscope
from zooscope.cli import main
from zooscope.commands.report import _mask_images
from zooscope.pipelines.letters import letter_mask
from zooscope.pipelines.report_training import mask_section, sections
from zooscope.pipelines.sweep import sweep


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """A real masked sweep (one width-24 network, checkpoints at epochs 0, 1, 3), scanned, and its report page."""
    tmp = tmp_path_factory.mktemp("masked")
    manifest = sweep(tmp / "sweep", widths=(24,), seeds=(0,), epochs=3, checkpoints=3, mask="A")
    store = str(tmp / "zoo.zarr")
    zooscope.scan(manifest=str(tmp / "sweep" / "manifest.csv"), store=store, cluster="none", progress=False)
    html = tmp / "report.html"
    assert main(["report", store, "--out", str(html)]) == 0
    manifest = manifest.assign(path=[str(tmp / "sweep" / p) for p in manifest["path"]])  # paths are relative
    return manifest.sort_values("step"), store, html.read_text()


def _section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start:page.index("</section>", start)]


def test_report_shows_fc2_at_every_checkpoint_of_a_masked_sweep(masked):
    manifest, _, page = masked
    assert "Weight matrices over training" in page
    sec = _section(page, "drift-images")
    steps = [int(s) for s in re.findall(r'<img src="data:image/png;base64,[^"]+" alt="[^"]*fc2\.weight at step (\d+)"',
                                        sec)]
    assert steps == sorted(manifest["step"].tolist()) == [0, 1, 3]
    assert sec.count("<img") == len(steps)


def test_rms_table_matches_the_checkpoints_and_the_letter(masked):
    manifest, _, page = masked
    sec = _section(page, "drift-images")
    cells = re.findall(r"<td>([^<]*)</td>", sec)
    table = np.array(cells, dtype=np.float64).reshape(-1, 3)  # step, RMS inside, RMS outside
    letter = letter_mask("A", 24, 24)
    for (step, inside, outside), path in zip(table, manifest["path"]):
        W = load_file(path)["fc2.weight"].astype(np.float64)
        assert step == int(re.search(r"e(\d+)\.safetensors$", path).group(1))
        np.testing.assert_allclose(inside, np.sqrt(np.mean(W[letter] ** 2)), rtol=1e-3)  # 4 significant digits
        np.testing.assert_allclose(outside, np.sqrt(np.mean(W[~letter] ** 2)), rtol=1e-3, atol=1e-12)
    assert table[0, 2] == 0.0 and table[-1, 2] > 0.0  # the letter is exact at init and blurs with training


def test_image_layer_reads_the_named_tensor_of_each_checkpoint(masked):
    manifest, store, _ = masked
    models = zooscope.open(store).models
    images, name = _mask_images(models, "fc1")
    assert name == "fc1.weight" and _mask_images(models, "fc1.bias")[1] == "fc1.bias"  # the caption's name
    assert list(images) == ["mlp-w24-maskA seed 0 (mask A)"]
    ckpts = images["mlp-w24-maskA seed 0 (mask A)"]
    assert [s for s, _ in ckpts] == [0, 1, 3]
    for (_, W), path in zip(ckpts, manifest["path"]):
        np.testing.assert_array_equal(W, load_file(path)["fc1.weight"])
    assert _mask_images(models.assign(mask=""), "fc2")[0] == {}


def test_mask_section_is_none_without_masked_data():
    assert mask_section({}) is None
    assert mask_section({"net": []}) is None
    assert all(s.anchor != "drift-images" for s in sections(pd.DataFrame({"model_id": ["a"]}), weight_images={}))


def test_mask_section_without_zeros_has_images_but_no_table():
    rng = np.random.default_rng(0)
    images = {"net": [(5, rng.normal(size=(6, 4))), (0, rng.normal(size=(6, 2, 2)))]}  # unordered; conv-shaped
    sec = mask_section(images, "conv.weight")
    assert re.findall(r"alt=\"net: conv\.weight at step (\d+)\"", sec.html) == ["0", "5"]
    assert "<table" not in sec.html
