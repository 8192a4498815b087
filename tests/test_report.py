"""The HTML report: self-contained, sections and links consistent, and it renders in headless Chromium."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zooscope.pipelines.regress import regress
from zooscope.pipelines.report import Section, build_report, embed_png, write_report

ARTIFACTS = Path(__file__).with_name("artifacts")


def synthetic_zoo(seed=0, n_layers=5):
    """Two series x 4 models x ``n_layers`` layers; layer 0 of each first model is under-trained (alpha 7), layer 2
    of each second model failed."""
    rng = np.random.default_rng(seed)
    models, rows, evs = [], [], []
    for series in ("vgg", "resnet"):
        for k in range(4):
            mrow = len(models)
            for layer in range(n_layers):
                alpha = 7.0 if (k == 0 and layer == 0) else 2.4 + 0.4 * k + rng.normal(0, 0.2)
                ev = np.sort(rng.pareto(alpha - 1, 150) * 0.1 + 0.01)
                failed = k == 1 and layer == 2
                rows.append({"model_row": mrow, "layer_id": layer, "name": f"block{layer}", "layer_type": "dense",
                             "N": 60, "M": 30, "rf": 1, "status": "failed" if failed else "ok",
                             "alpha": np.nan if failed else alpha, "D": np.nan if failed else 0.02 + 0.01 * layer,
                             "xmin": np.nan if failed else float(np.quantile(ev, 0.6)), "xmax": ev.max(),
                             "log_norm": np.log10(ev.sum()), "log_spectral_norm": np.log10(ev.max()),
                             "esd_start": sum(len(e) for e in evs), "esd_count": len(ev)})
                evs.append(ev)
            models.append({"model_id": f"{series}-{k}", "dataset": "imagenet", "series": series, "status": "ok",
                           "error": "", "seconds": 0.5, "top1_error": 30 - 2 * k + rng.normal(0, 0.3)})
    layers = pd.DataFrame(rows)
    models = pd.DataFrame(models)
    flat = np.concatenate(evs)
    models["alpha"] = layers.groupby("model_row")["alpha"].mean().to_numpy()
    models["log_norm"] = layers.groupby("model_row")["log_norm"].mean().to_numpy()
    esd = lambda row: flat[int(row["esd_start"]):int(row["esd_start"] + row["esd_count"])]  # noqa: E731
    return models, layers, esd


@pytest.fixture(scope="module")
def page():
    models, layers, esd = synthetic_zoo()
    reg = regress(models, "top1_error", metrics=["alpha", "log_norm"], n_boot=100)
    extra = Section("Weight statistics", "<p>extra section body</p>", "weightstats")
    return build_report(models, layers, esd=esd, regression=reg, extra_sections=[extra], title="test zoo",
                        chosen_layers=("resnet-2/block3",), n_worst=2)


def test_page_is_self_contained_and_consistent(page):
    assert page.startswith("<!DOCTYPE html>") and "<title>test zoo</title>" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) > 10
    esd_figs = re.findall(r'<figure id="esd-\d+">.*?</figure>', page, re.S)
    assert len(esd_figs) == 5  # the chosen layer, 2 worst fits (largest D), 2 flagged
    assert sum("resnet-2 / block3 — chosen layer" in f for f in esd_figs) == 1
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from outside
    ids = set(re.findall(r' id="([^"]+)"', page))
    toc = re.findall(r'<nav class="toc">.*?</nav>', page, re.S)[0]
    anchors = re.findall(r'href="#([^"]+)"', toc)
    assert {"glance", "flow", "scale", "esd", "histograms", "regression", "flagged", "weightstats"} <= set(anchors)
    assert all(a in ids for a in re.findall(r'href="#([^"]+)"', page))  # every internal link has a target
    assert "extra section body" in page


def test_flagged_layers_link_to_their_esd_plots(page):
    flagged = re.search(r'<section id="flagged">.*?</section>', page, re.S).group(0)
    links = re.findall(r'<a href="#(esd-\d+)">block0</a>', flagged)
    assert len(links) == 2  # the two first models' block0 (alpha 7): under-trained
    assert flagged.count("under-trained") == 2
    for anchor in links:
        fig = re.search(rf'<figure id="{anchor}">.*?</figure>', page, re.S).group(0)
        assert "alpha=7.000" in fig


def test_report_without_esd_or_regression():
    models, layers, _ = synthetic_zoo()
    page = build_report(models.iloc[:2], layers[layers.model_row < 2])
    assert "no eigenvalues available" in page and 'id="regression"' not in page
    empty = build_report(models.iloc[:0], layers.iloc[:0])
    assert 'id="glance"' in empty and "<img" not in empty


def test_embed_png_closes_pyplot_figure():
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.add_subplot().plot([1, 2], [3, 4])
    tag = embed_png(fig, 'a "quoted" alt')
    assert not plt.fignum_exists(fig.number)
    assert tag.startswith('<img src="data:image/png;base64,') and 'alt="a &quot;quoted&quot; alt"' in tag


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(page, tmp_path):
    path = write_report(page, tmp_path / "report.html")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    url = path.resolve().as_uri()
    dom = subprocess.run([*base, f"--screenshot={shot}", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    status = re.search(r'<div id="zs-status" data-images="(\d+)" data-broken="(\d+)"', dom)
    assert status, "the page's load-time check did not run"
    n_images, n_broken = map(int, status.groups())
    assert n_images == page.count("<img ") and n_images > 10 and n_broken == 0
    assert 'data-broken="1"' not in dom
    assert shot.exists()
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    colours = np.unique((pixels.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 50  # text, tables and figures, not a blank single-colour page
    assert pixels.std() > 0.05


def test_end_to_end_from_a_store(tmp_path, capsys):
    """regress and report from a real zooscope store whose model rows lack the summary columns."""
    store_mod = pytest.importorskip("zooscope.engine.store")
    from zooscope.cli import main
    from zooscope.pipelines.result import ModelResult
    from zooscope.pipelines.summary import model_summary

    models, layers, esd = synthetic_zoo(n_layers=3)
    models, layers = models[models.series == "vgg"], layers[layers.model_row < 4]  # one series: keep it quick
    path = tmp_path / "zoo.zarr"
    with store_mod.ZooStore.open(path, "a") as store:
        for mrow, m in models.drop(columns=["alpha", "log_norm"]).iterrows():
            rows = layers[layers.model_row == mrow].drop(columns=["model_row", "esd_start", "esd_count"])
            store.append({**m.to_dict(), "path": f"/zoo/{m['model_id']}", "content_hash": f"{mrow:064x}"},
                         ModelResult(rows.reset_index(drop=True), [esd(r) for _, r in
                                                                   layers[layers.model_row == mrow].iterrows()]))
    assert main(["regress", str(path), "--y", "top1_error", "--metrics", "alpha,log_norm", "--n-boot", "50",
                 "--out", str(tmp_path / "reg")]) == 0
    used = pd.read_csv(tmp_path / "reg" / "data.csv").set_index("model")
    for mrow, m in models.iterrows():  # the failed fit of model 1 counts as alpha = -1 (ww mode)
        expected = model_summary(layers[layers.model_row == mrow], "ww", esd=esd)["alpha"]
        np.testing.assert_allclose(used.loc[m["model_id"], "alpha"], expected, rtol=1e-12)
    assert main(["report", str(path), "--regress", str(tmp_path / "reg"), "--layers", "block1",
                 "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert 'id="regression"' in page and page.count("chosen layer") == len(models)
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")]) == 2
    assert "no such store directory" in capsys.readouterr().err


def test_esd_plot_shows_every_eigenvalue_and_the_fit_slope():
    from zooscope.pipelines.plots import esd_plot

    ev = np.sort(np.random.default_rng(0).pareto(2.0, 400) * 0.1 + 0.01)
    fig = esd_plot(ev, alpha=2.7, xmin=0.2, xmax=ev.max(), title="t")
    points, fit = fig.axes[0].lines[:2]
    assert points.get_xdata().max() > np.sqrt(ev[-2] * ev[-1])  # the isolated top eigenvalue has its own point
    lx, ly = np.log10(fit.get_xdata()), np.log10(fit.get_ydata())
    np.testing.assert_allclose(np.diff(ly) / np.diff(lx), -2.7, rtol=1e-9)  # a power law λ^-α on log-log axes
    assert fit.get_xdata()[0] == pytest.approx(0.2) and fit.get_xdata()[-1] == pytest.approx(ev.max())


def test_esd_section_adds_the_linear_esd_with_the_mp_bulk_when_stored():
    """Layers stored with mp_fit (finite bulk_min/bulk_max) also get WeightWatcher's lin-lin ESD figure."""
    models, layers, esd = synthetic_zoo()
    plain = build_report(models, layers, esd=esd, title="t")
    layers["bulk_min"], layers["bulk_max"] = 0.01, 0.05
    with_mp = build_report(models, layers, esd=esd, title="t")
    assert "MP bulk" not in plain
    plotted = len(re.findall(r'<figure id="esd-\d+">', with_mp))
    assert plotted > 0 and with_mp.count("lin-lin ESD, MP bulk [0.01, 0.05]") == plotted
