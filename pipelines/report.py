"""One self-contained HTML report of a zoo: tables and matplotlib figures embedded as base64 PNGs."""
from __future__ import annotations

import base64
import html as _html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Section:
    """One report section: ``title`` (plain text), ``html`` (body markup), ``anchor`` (unique HTML id)."""

    title: str
    html: str
    anchor: str


def embed_png(fig, alt: str) -> str:
    """Render a matplotlib figure to an ``<img>`` tag with the PNG inlined as base64, then close the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_html.escape(alt, quote=True)}">'


MAX_SERIES = 12          # series figures per section
MAX_MODELS_PER_PLOT = 16  # lines per depth figure (evenly spaced selection beyond this)
MAX_WORST_ESD = 6        # default number of ESD plots of the worst-fitting layers (largest D)
MAX_FLAGGED_ESD = 24     # ESD plots for flagged layers
MAX_TABLE_ROWS = 200
MAX_REGRESSION_PLOTS = 60

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#fafafa;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px;background:#fff;box-shadow:0 0 12px #0001}
h1{font-size:28px;margin:8px 0 4px}h2{font-size:21px;margin-top:40px;border-bottom:2px solid #e4e4e4;padding-bottom:4px}
h3{font-size:16px;margin:22px 0 6px;color:#333}.muted{color:#666;font-size:13px}
nav.toc{background:#f3f5f8;border:1px solid #e2e6ec;border-radius:6px;padding:10px 18px;margin:16px 0}
nav.toc ol{margin:4px 0;padding-left:22px}a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f2f5;position:sticky;top:0}tr:nth-child(even) td{background:#fafbfc}
td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{border:1px solid #e2e6ec;border-radius:6px;padding:8px 16px;min-width:120px;background:#f9fafc}
.card b{display:block;font-size:22px}.card span{font-size:12px;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0 0 12px;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:12px;color:#555}
figure:target{outline:3px solid #f5c211}.bad{color:#b00020}
#zs-status{margin-top:40px;font-size:12px;color:#666}
"""

# Marks images that failed to decode and writes a one-line status (used by the headless-browser test).
STATUS_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { imgs[i].setAttribute('data-broken', '1'); broken++; }
  }
  var s = document.getElementById('zs-status');
  s.setAttribute('data-images', imgs.length); s.setAttribute('data-broken', broken);
  s.textContent = 'report check: ' + imgs.length + ' images, ' + broken + ' broken';
});
"""


def _e(text) -> str:
    return _html.escape(str(text), quote=True)


def _table(df, max_rows: int = MAX_TABLE_ROWS) -> str:
    more = f'<p class="muted">showing {max_rows} of {len(df)} rows</p>' if len(df) > max_rows else ""
    return df.head(max_rows).to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0) + more


def figure_html(fig, caption: str, *, alt: str | None = None, anchor: str | None = None) -> str:
    """A matplotlib figure as an HTML ``<figure>`` (PNG inlined by ``embed_png``, alt text ``alt`` or the caption)."""
    ident = f' id="{_e(anchor)}"' if anchor else ""
    img = embed_png(fig, caption if alt is None else alt)
    return f"<figure{ident}>{img}<figcaption>{_e(caption)}</figcaption></figure>"


def _label_layers(models, layers):
    """``layers`` with ``_model`` (model label), ``_series`` and ``_depth`` (0-based order within the model)."""
    labels = models["model_id"] if "model_id" in models else models.get("model", pd.Series(range(len(models))))
    labels = labels.astype(str)
    if "version" in models and labels.duplicated().any():
        labels = labels + "@v" + models["version"].astype(str)
    series = models["series"].astype(str) if "series" in models else pd.Series("all", index=models.index)
    key = models["model_row"] if "model_row" in models else models.index.to_series()
    by_row = dict(zip(key, labels))
    series_by_row = dict(zip(key, series))
    out = layers.copy()
    if "model_row" in out:
        out["_model"] = out["model_row"].map(by_row).fillna(out["model_row"].astype(str))
        out["_series"] = out["model_row"].map(series_by_row).fillna("all")
    else:
        mid = next((c for c in ("model_id", "model") if c in out), None)
        out["_model"] = out[mid].astype(str) if mid else "model"
        out["_series"] = "all"
    order = out["layer_id"] if "layer_id" in out else pd.Series(range(len(out)), index=out.index)
    out["_depth"] = order.groupby(out["_model"]).rank(method="first").astype(int) - 1
    return out


def _glance(models, layers) -> Section:
    n_err = int((models["status"] == "error").sum()) if "status" in models else 0
    status = layers["status"].value_counts() if "status" in layers else {}
    cards = [
        (len(models), "models"), (n_err, "models with errors"), (len(layers), "layer rows"),
        (int(status.get("ok", 0)), "fits ok"), (int(status.get("failed", 0)), "fits failed"),
        (int(status.get("error", 0)), "layers with errors"),
    ]
    if "seconds" in models:
        cards.append((f"{float(models['seconds'].sum()):.1f} s", "analysis time (sum)"))
    if "series" in models:
        cards.append((models["series"].nunique(), "series"))
    body = '<div class="cards">' + "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>"
                                           for v, k in cards) + "</div>"
    if "scanned_at" in models and models["scanned_at"].notna().any():
        body += f'<p class="muted">scanned {_e(models["scanned_at"].min())} – {_e(models["scanned_at"].max())}</p>'
    show = [c for c in ("model_id", "model", "version", "dataset", "series", "status", "n_layers", "n_params",
                        "seconds", "log_norm", "log_spectral_norm", "alpha", "alpha_weighted", "log_alpha_norm",
                        "stable_rank", "mp_softrank") if c in models]
    body += _table(models[show])
    if n_err and "error" in models:
        errs = models[models["status"] == "error"]
        name = "model_id" if "model_id" in models else models.columns[0]
        body += "<h3>Models that could not be analysed</h3><ul>" + "".join(
            f"<li><b>{_e(r[name])}</b>: <span class=bad>{_e(r['error'])}</span></li>" for _, r in errs.iterrows()
        ) + "</ul>"
    return Section("Zoo at a glance", body, "glance")


def _spread(items: list, k: int) -> list:
    """At most ``k`` items, evenly spaced over ``items`` (first and last kept)."""
    if len(items) <= k:
        return items
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))]


def _depth_section(lab, column: str, title: str, anchor: str, intro: str, bands=()) -> Section:
    from zooscope.pipelines.plots import depth_plot

    if column not in lab or not lab[column].notna().any():
        return Section(title, f'<p class="muted">no {column} values in the layer table</p>', anchor)
    parts = [f"<p>{intro}</p>"]
    series = sorted(lab["_series"].unique())
    if len(series) > MAX_SERIES:
        parts.append(f'<p class="muted">showing {MAX_SERIES} of {len(series)} series</p>')
    parts.append('<div class="grid">')
    for s in series[:MAX_SERIES]:
        sub = lab[lab["_series"] == s].sort_values(["_model", "_depth"])
        names = list(dict.fromkeys(sub["_model"]))
        shown = _spread(names, MAX_MODELS_PER_PLOT)
        curves = {m: (g["_depth"].to_numpy(), g[column].to_numpy(float))
                  for m in shown for g in [sub[sub["_model"] == m]]}
        note = f" ({len(shown)} of {len(names)} models, evenly spaced)" if len(shown) < len(names) else ""
        fig = depth_plot(curves, ylabel=column, title=f"{s}: {column} by depth", bands=bands)
        parts.append(figure_html(fig, f"series {s}{note}", alt=f"{column} by layer depth, series {s}"))
    parts.append("</div>")
    return Section(title, "".join(parts), anchor)


def _histogram_section(lab) -> Section:
    from zooscope.pipelines.plots import series_histograms

    parts = ["<p>Distribution over layers of alpha and of log10 λmax, one curve per model of each series "
             "(paper 002, Figures 5 and 7): better-trained models have smaller alpha, more concentrated.</p>",
             '<div class="grid">']
    for s in sorted(lab["_series"].unique())[:MAX_SERIES]:
        sub = lab[lab["_series"] == s]
        shown = _spread(list(dict.fromkeys(sub["_model"])), 8)
        for column in ("alpha", "log_spectral_norm"):
            if column in sub and sub[column].notna().any():
                vals = {m: sub.loc[sub["_model"] == m, column].to_numpy(float) for m in shown}
                fig = series_histograms(vals, xlabel=column, title=f"{s}: {column}")
                parts.append(figure_html(fig, f"series {s}: {column}", alt=f"histogram of {column}, series {s}"))
    parts.append("</div>")
    return Section("Histograms per series", "".join(parts), "histograms")


def _esd_anchor(idx) -> str:
    return f"esd-{idx}"


def _flagged(lab):
    if "alpha" not in lab:
        return lab.iloc[0:0]
    ok = lab["status"] == "ok" if "status" in lab else lab["alpha"].notna()
    return lab[ok & ((lab["alpha"] > 6.0) | (lab["alpha"] < 2.0))]


def _esd_section(lab, esd, chosen: tuple[str, ...], n_worst: int) -> tuple[Section, set]:
    from zooscope.pipelines.plots import esd_linear_plot, esd_plot

    title = "ESDs with power-law fits"
    if esd is None:
        return Section(title, '<p class="muted">no eigenvalues available (pass an ESD source)</p>', "esd"), set()
    ok = lab[lab["status"] == "ok"] if "status" in lab else lab[lab["alpha"].notna()]
    picks: dict = {}
    if chosen and "name" in lab:
        full = lab["_model"] + "/" + lab["name"].astype(str)
        for idx in lab.index[lab["name"].isin(chosen) | full.isin(chosen)]:
            picks.setdefault(idx, "chosen layer")
    if "D" in ok and n_worst > 0:
        for idx in ok["D"].nlargest(n_worst).index:
            picks.setdefault(idx, "worst fit (largest D)")
    for idx in _flagged(lab).index[:MAX_FLAGGED_ESD]:
        picks.setdefault(idx, "flagged")
    parts = ["<p>Log-log ESD of WᵀW with the fitted power law from xmin (red) and xmin (green).</p>",
             '<div class="grid">']
    for idx, why in picks.items():
        row = lab.loc[idx]
        evals = np.asarray(esd(row), dtype=np.float64)
        name = f"{row['_model']} / {row.get('name', idx)}"
        fig = esd_plot(evals, alpha=float(row.get("alpha", np.nan)), xmin=float(row.get("xmin", np.nan)),
                       xmax=float(row.get("xmax", np.nan)), title=name)
        cap = f"{name} — {why}; alpha={row.get('alpha', np.nan):.3f}, D={row.get('D', np.nan):.3f}"
        parts.append(figure_html(fig, cap, alt=f"ESD of {name}", anchor=_esd_anchor(idx)))
        bulk = (float(row.get("bulk_min", np.nan)), float(row.get("bulk_max", np.nan)))
        if all(np.isfinite(bulk)):  # stored with mp_fit: WeightWatcher's lin-lin ESD with the MP bulk
            fig = esd_linear_plot(evals, xmin=float(row.get("xmin", np.nan)), title=name, bulk=bulk)
            parts.append(figure_html(fig, f"{name} — lin-lin ESD, MP bulk [{bulk[0]:.3g}, {bulk[1]:.3g}]",
                                     alt=f"linear ESD of {name}"))
    parts.append("</div>")
    return Section(title, "".join(parts), "esd"), set(picks)


def _flagged_section(lab, plotted: set) -> Section:
    flagged = _flagged(lab)
    if not len(flagged):
        return Section("Flagged layers", "<p>No layer has alpha &gt; 6 or alpha &lt; 2.</p>", "flagged")
    rows = []
    for idx, r in flagged.head(MAX_TABLE_ROWS).iterrows():
        kind = "under-trained (alpha > 6)" if r["alpha"] > 6.0 else "over-trained (alpha < 2)"
        name = _e(r.get("name", idx))
        link = f'<a href="#{_esd_anchor(idx)}">{name}</a>' if idx in plotted else name
        rows.append(f"<tr><td>{_e(r['_model'])}</td><td>{link}</td><td>{_e(r.get('layer_type', ''))}</td>"
                    f"<td>{r['alpha']:.3f}</td><td>{kind}</td></tr>")
    more = (f'<p class="muted">showing {MAX_TABLE_ROWS} of {len(flagged)}</p>' if len(flagged) > MAX_TABLE_ROWS
            else "")
    body = (f"<p>{len(flagged)} layer(s) outside 2 ≤ alpha ≤ 6 (WeightWatcher's thresholds). Linked names jump "
            "to their ESD plot.</p><table><thead><tr><th>model</th><th>layer</th><th>type</th><th>alpha</th>"
            "<th>flag</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + more)
    return Section("Flagged layers", body, "flagged")


def _regression_section(regression) -> Section:
    from zooscope.pipelines.regress import group_figures, group_label

    parts = [f"<p>OLS of <b>{_e(regression.y)}</b> on each metric per group "
             f"({_e(', '.join(regression.by) or 'all models')}).</p>"]
    if regression.messages:
        parts.append("<ul class=muted>" + "".join(f"<li>{_e(m)}</li>" for m in regression.messages) + "</ul>")
    parts += ["<h3>Summary over groups</h3>", _table(regression.summary), "<h3>Per group</h3>",
              _table(regression.groups), '<div class="grid">']
    for row, fig in group_figures(regression, MAX_REGRESSION_PLOTS):
        label = f"{group_label(row, regression.by)}: {row['metric']}"
        parts.append(figure_html(fig, label, alt=f"{row['metric']} against {regression.y}, {label}"))
    parts.append("</div>")
    return Section("Meta-regression", "".join(parts), "regression")


def build_report(
    models,
    layers,
    *,
    esd=None,
    regression=None,
    extra_sections=(),
    title: str = "zooscope report",
    chosen_layers: tuple[str, ...] = (),
    n_worst: int = MAX_WORST_ESD,
) -> str:
    """A complete, self-contained HTML page (CSS inline, figures as base64 PNGs) describing a zoo.

    models / layers: the store's model and layer tables (docs/INTERFACES.md columns); a layer's ``model_row``
        is the models' ``model_row`` column if present, else their index (the store's model rows).
    esd: ``esd(row) -> eigenvalues`` for a row of ``layers`` (a Series whose ``.name`` is its index label, the
        store's layer row), or None to leave out ESD plots.
    regression: a ``regress.RegressionResult`` or None.
    extra_sections: further ``Section``s appended at the end (e.g. weight statistics, drift).
    chosen_layers: layers whose ESD is always plotted, as ``name`` (in every model) or ``model_id/name``.
    n_worst: how many of the worst-fitting layers (largest KS distance D) get an ESD plot; flagged layers (alpha
        outside [2, 6]) get one too, up to ``MAX_FLAGGED_ESD``.
    """
    lab = _label_layers(models, layers if layers.index.is_unique else layers.reset_index(drop=True))
    sections = [_glance(models, lab)]
    if len(lab):
        sections.append(_depth_section(
            lab, "alpha", "Correlation flow: alpha by depth", "flow",
            "Power-law exponent alpha of each layer against its depth. Well-trained series keep alpha small and "
            "flat across depth (paper 002); dashed lines mark WeightWatcher's thresholds 2 and 6.",
            bands=(2.0, 6.0)))
        sections.append(_depth_section(
            lab, "log_spectral_norm", "Scale collapse: log spectral norm by depth", "scale",
            "log10 of the largest eigenvalue of WᵀW for each layer against depth; a collapse of the scale in "
            "some layers shows as a drop."))
        esd_sec, plotted = _esd_section(lab, esd, tuple(chosen_layers), n_worst)
        sections += [esd_sec, _histogram_section(lab)]
    else:
        plotted = set()
    if regression is not None:
        sections.append(_regression_section(regression))
    if len(lab):
        sections.append(_flagged_section(lab, plotted))
    sections += list(extra_sections)
    toc = "".join(f'<li><a href="#{_e(s.anchor)}">{_e(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{_e(s.anchor)}"><h2>{_e(s.title)}</h2>{s.html}</section>' for s in sections)
    when = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><p class="muted">generated by zooscope on {when}</p>'
        f'<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>{body}'
        f'<div id="zs-status">report check pending</div></main><script>{STATUS_JS}</script></body></html>\n'
    )


def write_report(html: str, path: str | Path) -> Path:
    """Write the page to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
