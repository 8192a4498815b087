"""The batch engine: many models per task, layers bucketed by shape, give each model's values when analysed alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from safetensors.numpy import save_file

from zooscope.engine.plan import Part, pack
from zooscope.engine.scan import scan
from zooscope.engine.store import ZooStore
from zooscope.kernels import esd as esd_kernels
from zooscope.kernels import spectral, weightstats
from zooscope.pipelines.analyze import AnalysisOptions, analyze_checkpoint
from zooscope.pipelines.batch import analyze_batch
from zooscope.pipelines.readers import open_checkpoint
from zooscope.pipelines.summary import model_summaries, model_summary

#: Columns computed by vectorised reductions (row sums instead of one dot product): equal to rounding.
ROUNDED = {"w_std", "w_skew", "w_kurtosis", "ns_mean", "ns_std", "ns_corr_prev"}


def _t(rng, shape, df=3.0):
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_t(df, size=shape) / np.sqrt(fan_in)).astype(np.float32)


def mixed_zoo(root: Path) -> list[Path]:
    """Different architectures sharing shapes across models: CNNs (pooled conv slices), MLPs, a model with an
    embedding, a layer with NaN weights, an all-zero layer (failed fit), and a truncated file."""
    root.mkdir()
    paths = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        if seed % 3 == 0:  # small CNN
            w = {"conv1.weight": _t(rng, (16, 1, 3, 3)), "conv2.weight": _t(rng, (16, 16, 3, 3)),
                 "conv3.weight": _t(rng, (16, 16, 3, 3)), "fc.weight": _t(rng, (10, 16)), "fc.bias": _t(rng, (10,))}
        elif seed % 3 == 1:  # MLP, one layer the CNN's dense shape
            w = {"fc0.weight": _t(rng, (32, 40)), "fc1.weight": _t(rng, (16, 32)), "fc.weight": _t(rng, (10, 16))}
        else:  # embedding + dense
            w = {"embed.weight": _t(rng, (60, 16)), "fc.weight": _t(rng, (16, 16)), "head.weight": _t(rng, (10, 16))}
        if seed == 4:
            w["fc1.weight"][3, 2] = np.nan
        if seed == 5:
            w["fc.weight"][:] = 0.0
        path = root / f"m{seed}.safetensors"
        save_file(w, str(path))
        paths.append(path)
    bad = root / "truncated.safetensors"
    bad.write_bytes(paths[0].read_bytes()[:-100])
    return paths[:3] + [bad] + paths[3:]


def assert_same_rows(alone, batched) -> None:
    a, b = alone.layers, batched.layers
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        x, y = a[column], b[column]
        if column in ROUNDED:
            np.testing.assert_allclose(y.to_numpy(float), x.to_numpy(float), rtol=1e-12, atol=0, err_msg=column)
        else:
            # an int column is float in a batch where another model's row lacks it (NaN): values must be equal
            pd.testing.assert_series_equal(x, y, check_names=False, obj=column,
                                           check_dtype=x.dtype.kind not in "iuf" or y.dtype.kind not in "iuf")
    for e1, e2 in zip(alone.esd, batched.esd):
        np.testing.assert_array_equal(e1, e2)  # bitwise: the same route solves each matrix of a stack alone
    np.testing.assert_array_equal(alone.hist_counts, batched.hist_counts)
    np.testing.assert_array_equal(alone.hist_edges, batched.hist_edges)
    assert alone.n_params == batched.n_params


#: A model analysed alone takes the scan's power-law route (``fit_backend='auto'`` may take numpy's there).
SAME_ROUTE = dict(fit_backend="numba")


@pytest.mark.parametrize("options", [AnalysisOptions(**SAME_ROUTE),
                                     AnalysisOptions(pool=False, mp_fit=True, **SAME_ROUTE),
                                     AnalysisOptions(randomize=True, detX=True, weightstats=False, **SAME_ROUTE)],
                         ids=["default", "slices-mp", "randomize-detx"])
@pytest.mark.parametrize("memory_bytes", [1 << 30, 1], ids=["one-solve", "solve-per-layer"])
def test_batch_equals_each_model_alone(tmp_path, options, memory_bytes):
    paths = mixed_zoo(tmp_path / "zoo")
    batch = analyze_batch([(str(p), None) for p in paths], options, memory_bytes=memory_bytes)
    assert [e is not None for e in batch.errors] == [p.name == "truncated.safetensors" for p in paths]
    assert "truncated" in str(batch.errors[3]) and str(paths[3]) in str(batch.errors[3])
    assert not len(batch.rows_of(3))
    statuses = set(batch.result.layers["status"])
    assert {"ok", "error", "failed"} <= statuses  # the NaN layer and the zero layer are in the mix
    for i, path in enumerate(paths):
        if batch.errors[i] is None:
            with open_checkpoint(str(path)) as ckpt:
                assert_same_rows(analyze_checkpoint(ckpt, options), batch.part(i))


def test_shards_of_a_model_in_a_batch_equal_the_model(tmp_path):
    path = mixed_zoo(tmp_path / "zoo")[0]
    with open_checkpoint(str(path)) as ckpt:
        keys = ckpt.keys()
        whole = analyze_checkpoint(ckpt, AnalysisOptions(**SAME_ROUTE))
    batch = analyze_batch([(str(path), keys[:2]), (str(path), keys[2:])], AnalysisOptions())
    from zooscope.pipelines.result import merge_results

    merged = merge_results([batch.part(0), batch.part(1)])
    np.testing.assert_array_equal(merged.layers["alpha"], whole.layers["alpha"])
    np.testing.assert_allclose(merged.layers["ns_corr_prev"], whole.layers["ns_corr_prev"], rtol=1e-12)


def test_a_plan_is_shared_only_by_checkpoints_of_one_layout(tmp_path):
    """Models with the same tensor names and shapes but another dtype, or another shard of the same file, are
    planned on their own: every part of the batch equals its model analysed alone."""
    rng = np.random.default_rng(7)
    layout = {"fc0.weight": (32, 40), "fc1.weight": (16, 32), "fc.weight": (10, 16)}
    paths = []
    for i, int_layer in enumerate((None, None, "fc1.weight")):
        w = {k: _t(rng, s) for k, s in layout.items()}
        if int_layer:  # same names and shapes; an integer tensor is not analysed
            w[int_layer] = rng.integers(-3, 3, size=layout[int_layer]).astype(np.int32)
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(w, str(paths[-1]))
    parts = [(str(p), None) for p in paths] + [(str(paths[0]), ["fc0.weight", "fc1.weight"])]
    batch = analyze_batch(parts, AnalysisOptions())
    assert sorted(batch.part(2).layers["name"]) == ["fc", "fc0"]
    assert sorted(batch.part(3).layers["name"]) == ["fc0", "fc1"]
    for i, (path, keys) in enumerate(parts):
        with open_checkpoint(path) as ckpt:
            alone = analyze_batch([(path, keys)], AnalysisOptions()).part(0)
            if keys is None:
                assert_same_rows(analyze_checkpoint(ckpt, AnalysisOptions(**SAME_ROUTE)), batch.part(i))
        assert_same_rows(alone, batch.part(i))


def test_buckets_reach_the_solver_as_stacks(tmp_path, monkeypatch):
    """All same-shaped matrices of all models go to one eigenvalue call per shape."""
    paths = [p for p in mixed_zoo(tmp_path / "zoo") if "truncated" not in p.name]
    calls = []
    solve = esd_kernels.eigenvalues_with_routes

    def spy(stack, **kw):
        calls.append(stack.shape)
        return solve(stack, **kw)

    monkeypatch.setattr(esd_kernels, "eigenvalues_with_routes", spy)
    analyze_batch([(str(p), None) for p in paths], AnalysisOptions())
    shapes = [s[1:] for s in calls]
    assert len(shapes) == len(set(shapes))  # one call per (N, M)
    by_shape = dict((s[1:], s[0]) for s in calls)
    # conv2/conv3 of two CNNs (9 slices each) in one (36, 16, 16) stack with the 16x16 dense of two models
    assert by_shape[(16, 16)] == 2 * 2 * 9 + 2


def test_a_fallback_route_names_the_layer_whose_matrix_it_solved(tmp_path, monkeypatch):
    """``esd_backend`` of a layer is the route of the first of its matrices that a fallback re-solved, else the
    backend: checked on the (16, 16) bucket with every matrix marked (which finds each layer's matrices), then
    with every other one."""
    paths = [str(p) for p in mixed_zoo(tmp_path / "zoo") if "truncated" not in p.name]
    solve = esd_kernels.eigenvalues_with_routes

    def routes_of(marked):
        def spy(stack, **kw):
            evals, routes = solve(stack, **kw)
            if stack.shape[1:] == (16, 16):
                routes = [f"x:fb{i}-fallback" if marked(i) else r for i, r in enumerate(routes)]
            return evals, routes

        monkeypatch.setattr(esd_kernels, "eigenvalues_with_routes", spy)
        batch = analyze_batch([(p, None) for p in paths], AnalysisOptions())
        layers = batch.result.layers.assign(part=batch.part_of_row)
        return layers[(layers["N"] == 16) & (layers["M"] == 16)].set_index(["part", "name"])["esd_backend"]

    first = routes_of(lambda i: True).map(lambda r: int(r[4:-9])).sort_values()
    depth = np.diff(np.r_[first.to_numpy(), 2 * 2 * 9 + 2])  # the bucket of test_buckets_reach_the_solver_as_stacks
    assert first.iloc[0] == 0 and sorted(depth) == [1, 1, 9, 9, 9, 9]  # two dense layers, four convs of 9 slices
    (backend,) = set(routes_of(lambda i: False))
    odd = routes_of(lambda i: i % 2 == 1)
    for key, start, n in zip(first.index, first, depth):
        marked = [i for i in range(start, start + n) if i % 2 == 1]
        assert odd[key] == (f"x:fb{marked[0]}-fallback" if marked else backend), key


def test_pack_limits_and_shards():
    parts = [Part(f"m{i}", f"p{i}", f"h{i}", None, 0, 1, 100) for i in range(10)]
    shards = [Part("big", "pb", "hb", ("a",), s, 2, 5000) for s in range(2)]
    tasks = pack(parts[:5] + shards + parts[5:], batch_bytes=350, batch_models=100)
    assert [len(t.parts) for t in tasks] == [3, 2, 1, 1, 3, 2]  # shards alone; order kept
    assert [p for t in tasks for p in t.parts] == parts[:5] + shards + parts[5:]
    assert [len(t.parts) for t in pack(parts, batch_models=4)] == [4, 4, 2]
    assert len(pack(parts, min_tasks=5)) == 5  # a few tasks per worker
    assert all(t.nbytes <= 350 for t in pack(parts, batch_bytes=350))
    with pytest.raises(ValueError, match="positive"):
        pack(parts, batch_models=0)


def test_scan_in_batches_equals_model_by_model(tmp_path):
    paths = mixed_zoo(tmp_path / "zoo")
    batched = scan([tmp_path / "zoo"], tmp_path / "batched.zarr", cluster="none", progress=False)
    single = scan([tmp_path / "zoo"], tmp_path / "single.zarr", cluster="none", progress=False, batch_models=1)
    assert (batched.n_ok, batched.n_error) == (single.n_ok, single.n_error) == (len(paths) - 1, 1)
    with ZooStore.open(str(tmp_path / "batched.zarr")) as a, ZooStore.open(str(tmp_path / "single.zarr")) as b:
        ma, mb = a.models(), b.models()
        la, lb = a.layers(), b.layers()
        assert a.check() == [] and b.check() == []
        for x, y in zip(a.esds(), b.esds()):
            np.testing.assert_array_equal(x, y)
    drop = ["seconds", "scanned_at", "file_stat"]
    pd.testing.assert_frame_equal(ma.drop(columns=drop), mb.drop(columns=drop), check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(la, lb, check_exact=False, rtol=1e-12)
    np.testing.assert_array_equal(la["alpha"], lb["alpha"])


def test_analyze_equals_a_scan_bitwise_on_large_layers(tmp_path):
    """One checkpoint with layers of side 256-384 (where threaded OpenBLAS rounds its eigensolvers differently):
    analysed alone in this process (BLAS with all its threads, as ``zooscope analyze``) and by an in-process scan
    (BLAS single-threaded, as a Dask worker), the eigenvalues and alphas are the same bits."""
    from zooscope.pipelines.analyze import analyze_path

    rng = np.random.default_rng(3)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    save_file({"a.weight": _t(rng, (384, 320)), "b.weight": _t(rng, (320, 300)), "c.weight": _t(rng, (384, 320)),
               "conv.weight": _t(rng, (256, 256, 3, 3))}, str(zoo / "big.safetensors"))
    alone = analyze_path(str(zoo / "big.safetensors"), AnalysisOptions(**SAME_ROUTE))
    scan([zoo], tmp_path / "big.zarr", cluster="none", progress=False)
    with ZooStore.open(str(tmp_path / "big.zarr")) as store:
        layers, esds = store.layers(), store.esds()
    assert len(layers) == len(alone.layers) == 4
    np.testing.assert_array_equal(layers["alpha"].to_numpy(), alone.layers["alpha"].to_numpy())
    for x, y in zip(alone.esd, esds):
        np.testing.assert_array_equal(x, y)


def test_auto_fit_backend_is_numpy_for_a_small_model_alone_and_numba_in_a_scan(tmp_path, monkeypatch):
    """``fit_backend='auto'``: a small model analysed alone is fitted by numpy's scan (no Numba to load), the same
    model in a scan's task by Numba, as is a model alone above ``AUTO_NUMPY_WORK``. The ``fit_backend`` column
    names the route; the routes agree to 1e-12 (the same xmin), and Numba alone equals the scan bit for bit."""
    from zooscope.kernels import powerlaw

    rng = np.random.default_rng(4)
    path = tmp_path / "model.safetensors"
    save_file({"fc0.weight": _t(rng, (300, 200)), "fc1.weight": _t(rng, (200, 120)),
               "conv.weight": _t(rng, (64, 32, 3, 3))}, str(path))
    in_a_scan = analyze_batch([(str(path), None)], AnalysisOptions()).part(0)
    with open_checkpoint(str(path)) as ckpt:
        alone = analyze_checkpoint(ckpt, AnalysisOptions())
        monkeypatch.setattr(powerlaw, "AUTO_NUMPY_WORK", 0)
        large = analyze_checkpoint(ckpt, AnalysisOptions())
    assert list(alone.layers["fit_backend"]) == ["numpy"] * 3
    assert list(in_a_scan.layers["fit_backend"]) == list(large.layers["fit_backend"]) == ["numba"] * 3
    assert_same_rows(large, in_a_scan)
    for column in ("xmin", "num_pl_spikes", "n_tail", "status"):
        assert list(alone.layers[column]) == list(in_a_scan.layers[column])
    for column in ("alpha", "D", "sigma", "alpha_weighted", "log_alpha_norm"):
        np.testing.assert_allclose(alone.layers[column], in_a_scan.layers[column], rtol=1e-12, atol=0)


# -- the vectorised kernels against their one-at-a-time references -------------------------------------------


@pytest.mark.parametrize("shape, layer_type", [((5, 16, 1, 3, 3), "conv2d"), ((4, 10, 16), "dense"),
                                               ((3, 12, 7), "conv1d"), ((3, 9), "dense"), ((3, 64, 128), "dense")])
def test_layer_stats_many_matches_numpy_and_scipy(shape, layer_type):
    rng = np.random.default_rng(0)
    tensors = rng.standard_t(3, size=shape)
    tensors[1] = 0.5  # a constant tensor: numpy widens its histogram range, skew and kurtosis are NaN
    stats, counts, edges, strengths = weightstats.layer_stats_many(tensors, 32, layer_type=layer_type)
    for g, t in enumerate(tensors):
        x = t.ravel()
        c, e = np.histogram(x, bins=32)
        np.testing.assert_array_equal(counts[g], c)
        np.testing.assert_array_equal(edges[g], e)
        np.testing.assert_allclose(stats["w_mean"][g], x.mean(), rtol=1e-13)
        np.testing.assert_allclose(stats["w_std"][g], x.std(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stats["w_skew"][g], scipy.stats.skew(x), rtol=1e-10, equal_nan=g == 1)
        np.testing.assert_allclose(stats["w_kurtosis"][g], scipy.stats.kurtosis(x), rtol=1e-10, equal_nan=g == 1)
        np.testing.assert_array_equal([stats[f"w_q{round(q * 100):02d}"][g] for q in weightstats.QUANTILES],
                                      np.quantile(x, weightstats.QUANTILES))
        if t.ndim >= 2:
            layout = weightstats.strength_layout(layer_type, t.ndim)
            np.testing.assert_allclose(strengths[0][g], weightstats.node_strength(t, layout=layout), rtol=1e-13)
            np.testing.assert_allclose(strengths[1][g], weightstats.out_strength(t, layout=layout), rtol=1e-13)
    with pytest.raises(ValueError, match="NaN or infinite"):
        weightstats.layer_stats_many(np.where(tensors > 2, np.inf, tensors), 32)


def test_norm_and_singular_value_rows_match_one_layer_at_a_time():
    rng = np.random.default_rng(1)
    per_slice = rng.pareto(2.0, size=(6, 3, 20)) + 1e-3
    per_slice[2, 1, :5] = 0.0  # rank loss
    n = 25
    rows = esd_kernels.singular_value_stats_rows(per_slice, n, ww_sv_min=True)
    lam = np.sort(per_slice.reshape(6, -1), axis=1)
    alpha = np.array([2.5, np.nan, 3.0, 4.1, 2.0, 6.0])
    norms = spectral.norm_metrics_rows(lam, alpha, n=np.full(6, n))
    for r in range(6):
        one = esd_kernels.singular_value_stats(per_slice[r], n, ww_sv_min=True)
        assert one == {k: v[r].item() for k, v in rows.items()}
        ref = spectral.norm_metrics(lam[r], alpha[r], n=n, m=20)
        # the reference recomputed from the formulas in the docstring
        assert ref["log_norm"] == pytest.approx(np.log10(lam[r].sum()), rel=1e-14)
        for k, v in norms.items():
            np.testing.assert_equal(v[r], ref[k])


def test_model_summaries_equal_model_summary_per_model():
    rng = np.random.default_rng(2)
    layers = pd.DataFrame({
        "layer_id": np.tile(np.arange(5), 4), "status": rng.choice(["ok", "ok", "failed", "error"], 20),
        "layer_type": rng.choice(["dense", "embedding"], 20), "alpha": rng.uniform(1.5, 9, 20),
        "log_norm": rng.normal(size=20), "log_spectral_norm": rng.normal(size=20),
        "alpha_weighted": rng.normal(size=20), "log_alpha_norm": rng.normal(size=20),
    })
    owner = np.repeat(np.arange(4), 5)
    esd = [rng.uniform(0.1, 2, 8) for _ in range(20)]
    for mode, kw in (("ww", {"esd": lambda row: esd[row.name]}), ("robust", {"drop_first_last": True})):
        many = model_summaries(layers, owner, 4, mode, **kw)
        for m in range(4):
            part = layers[owner == m]
            one = model_summary(part, mode, **kw)
            for key, value in one.items():
                np.testing.assert_allclose(many[key][m], value, rtol=1e-14, equal_nan=True, err_msg=key)
