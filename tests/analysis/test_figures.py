"""analysis.figures: what the figures show, their hover text, colour ranges and JSON size."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from analysis import figures, stats
from analysis.figures import MAX_FIGURE_BYTES, figure_json_size
from spider.importance import rank
from spider.methods.spider import keep_weight
from spider.naming import parse_param_name

UP = "model.language_model.layers.3.mlp.up_proj.weight"


def _metrics() -> pd.DataFrame:
    rows = []
    plan = {("spider-1", "spider"): (0.6, 0.2, 0.55, 0.7), ("full-1", "full"): (0.6, 0.2, 0.3, 0.8),
            ("full-2", "full"): (0.6, 0.2, 0.35, 0.75)}
    for (run, method), (u0, d0, u1, d1) in plan.items():
        for step, frac in ((0, 0.0), (50, 0.5), (100, 1.0)):
            rows.append((run, method, step, "upstream", "score", u0 + frac * (u1 - u0)))
            rows.append((run, method, step, "downstream", "score", d0 + frac * (d1 - d0)))
            rows.append((run, method, step, "downstream", "loss", 5.0))  # not a score
    return pd.DataFrame(rows, columns=list(stats.METRICS_COLUMNS))


def _layers(n_layers: int, steps, seed: int = 0) -> pd.DataFrame:
    """Layers frame: n_layers LLM blocks x 2 tensors + an embedding, at every step."""
    rng = np.random.default_rng(seed)
    params = [f"model.language_model.layers.{i}.{m}.weight" for i in range(n_layers)
              for m in ("self_attn.q_proj", "mlp.up_proj")]
    params += ["model.language_model.embed_tokens.weight",
               "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    parsed = [parse_param_name(p) for p in params]
    n = len(params) * len(steps)
    mean_i, mean_g = rng.random(n), rng.random(n)
    return pd.DataFrame({
        "run": "r", "method": "spider", "step": np.repeat(np.asarray(steps), len(params)),
        "param": params * len(steps),
        "component": [p.component for p in parsed] * len(steps),
        "layer": [p.layer for p in parsed] * len(steps),
        "module": [p.module for p in parsed] * len(steps),
        "numel": ([4096 * 4096, 4096 * 11008] * n_layers + [32000 * 4096, 1024 * 1024])
        * len(steps),
        "mask_mean": rng.random(n), "mask_density": rng.random(n),
        "importance_pre_mean": mean_i, "importance_ft_mean": mean_g,
        "frac_ft_gt_pre": rng.random(n), "update_norm": rng.random(n),
        # moments of ranks with variance 0.05 each and covariance in [-0.02, 0.02]
        "importance_pre_sq_mean": mean_i**2 + 0.05, "importance_ft_sq_mean": mean_g**2 + 0.05,
        "importance_cross_mean": mean_i * mean_g + 0.04 * rng.random(n) - 0.02,
        "update_rel_norm": rng.random(n),
    })


# --------------------------------------------------------------------------------------------


def test_figure_json_size_is_the_json_length():
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    assert figure_json_size(fig) == len(fig.to_json().encode("utf-8"))


def test_score_curves_colour_by_method_dash_by_split():
    fig = figures.score_curves(_metrics())
    assert len(fig.data) == 6  # 3 runs x 2 splits; the loss rows are not drawn
    by_name = {trace.name: trace for trace in fig.data}
    spider_down = by_name["spider-1 · downstream"]
    assert list(spider_down.x) == [0, 50, 100]
    assert list(spider_down.y) == pytest.approx([0.2, 0.45, 0.7])
    assert spider_down.line.dash == "dash" and by_name["spider-1 · upstream"].line.dash == "solid"
    # two runs of one method share its colour; another method differs
    assert by_name["full-1 · upstream"].line.color == by_name["full-2 · downstream"].line.color
    assert by_name["full-1 · upstream"].line.color != spider_down.line.color
    assert "spider-1" in spider_down.hovertemplate and "(spider)" in spider_down.hovertemplate
    assert fig.layout.xaxis.title.text == "training step"
    assert "0–1" in fig.layout.yaxis.title.text


def test_iso_h_lines_satisfy_the_harmonic_mean():
    fig = figures.tradeoff_plane(_metrics())
    iso = [t for t in fig.data if t.meta and "H" in t.meta]
    assert [t.meta["H"] for t in iso] == list(figures.ISO_H_LEVELS)
    for trace in iso:
        u, d = np.asarray(trace.x), np.asarray(trace.y)
        np.testing.assert_allclose(2 * u * d / (u + d), trace.meta["H"], rtol=1e-12)
        assert u.min() >= 0 and u.max() == pytest.approx(1.0) and d.max() == pytest.approx(1.0)
        assert (d <= 1 + 1e-12).all()


def test_tradeoff_plane_final_points_and_paths():
    metrics = _metrics()
    fig = figures.tradeoff_plane(metrics)
    finals = {t.name: t for t in fig.data if t.meta and t.meta.get("final")}
    assert set(finals) == {"spider-1", "full-1", "full-2"}
    summary = stats.summary_table(metrics).set_index("run")
    for run, trace in finals.items():
        assert (trace.x[0], trace.y[0]) == pytest.approx((summary.loc[run, "U"],
                                                           summary.loc[run, "D"]))
        assert run in trace.hovertemplate
    path = next(t for t in fig.data if t.name == "spider-1 path")
    assert list(path.x) == pytest.approx([0.6, 0.575, 0.55])  # U over steps 0, 50, 100
    # from a summary frame: final points only, the same coordinates
    from_summary = figures.tradeoff_plane(stats.summary_table(metrics))
    finals2 = {t.name: (t.x[0], t.y[0]) for t in from_summary.data if t.meta and t.meta.get("final")}
    assert finals2["full-1"] == pytest.approx((0.3, 0.8))
    assert not any(t.name.endswith(" path") for t in from_summary.data)
    # two runs of one method (full-1, full-2): one colour, told apart by their markers
    assert finals["full-1"].marker.color == finals["full-2"].marker.color
    assert finals["full-1"].marker.symbol != finals["full-2"].marker.symbol


def test_mask_density_heatmap_values_and_fixed_range():
    layers = _layers(3, [0, 10, 20])
    fig = figures.mask_density_heatmap(layers)
    assert [t.name for t in fig.data] == ["vision", "llm"]
    llm = fig.data[1]
    assert list(llm.y) == [figures.NON_BLOCK, "0", "1", "2"]
    assert list(llm.x) == [0, 10, 20]
    expected = stats.mask_density(layers, by=("component", "layer"))
    row = expected[(expected["component"] == "llm") & (expected["layer"] == 2)
                   & (expected["step"] == 10)].iloc[0]
    assert np.asarray(llm.z)[3, 1] == pytest.approx(row["mask_density"], rel=1e-6)
    assert np.asarray(llm.customdata)[3, 1] == 4096 * 4096 + 4096 * 11008
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 1.0)
    assert "llm" in llm.hovertemplate and "step" in llm.hovertemplate


def test_mask_density_heatmap_needs_one_run_and_handles_no_mask():
    layers = pd.concat([_layers(1, [0]), _layers(1, [0]).assign(run="other")])
    with pytest.raises(ValueError, match="pass run="):
        figures.mask_density_heatmap(layers)
    assert len(figures.mask_density_heatmap(layers, run="other").data) == 2
    no_mask = _layers(1, [0]).assign(mask_density=np.nan, mask_mean=np.nan, method="full")
    fig = figures.mask_density_heatmap(no_mask)
    assert len(fig.data) == 0 and "no mask" in fig.layout.annotations[0].text


def test_discrepancy_bars_by_component_with_last_step():
    layers = _layers(3, [0, 10])
    table = stats.layer_discrepancy(layers)
    fig = figures.discrepancy_bars(table)
    assert [t.name for t in fig.data] == ["vision", "llm"]
    llm = fig.data[1]
    assert list(llm.x) == ["llm 0", "llm 1", "llm 2", f"llm {figures.NON_BLOCK}"]
    assert llm.marker.color == figures.COMPONENT_COLORS["llm"]
    final = table[(table["step"] == 10) & (table["component"] == "llm")].sort_values("layer")
    np.testing.assert_allclose(llm.y[:3], final["discrepancy_mean"].to_numpy(float)[:3])
    assert "step 10" in fig.layout.title.text
    assert "G − I" in llm.hovertemplate
    frac = figures.discrepancy_bars(table, step=0, value="frac_ft_gt_pre")
    assert "step 0" in frac.layout.title.text
    corr = figures.discrepancy_bars(table, value="correlation")
    np.testing.assert_allclose(corr.data[1].y[:3], final["correlation"].to_numpy(float)[:3])
    assert np.isfinite(corr.data[1].y[:3]).all() and (np.abs(corr.data[1].y[:3]) <= 0.4).all()
    assert "correlation" in corr.layout.yaxis.title.text
    with pytest.raises(ValueError, match="correlation"):
        figures.discrepancy_bars(table, value="corr")


def _spider_panels(rows: int, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(rows, cols, generator=generator)
    grad_sum = torch.randn(rows, cols, generator=generator)
    w, _ = keep_weight(theta0, grad_sum)
    delta = 1e-3 * w * torch.randn(rows, cols, generator=generator)
    return {"importance_pre": rank(theta0), "importance_ft": rank(grad_sum), "mask": w,
            "delta": delta}


def test_tensor_panels_colour_ranges_hover_and_shared_axes():
    panels = _spider_panels(64, 96)
    panels["delta"][5, 3] = -0.5  # the largest |update|, negative
    fig = figures.tensor_panels(panels, UP, max_cells=16)
    assert [t.name for t in fig.data] == list(panels)
    by_name = {t.name: t for t in fig.data}
    for name in ("importance_pre", "importance_ft", "mask"):
        assert (by_name[name].zmin, by_name[name].zmax) == (0.0, 1.0)
    delta = by_name["delta"]
    assert (delta.zmin, delta.zmax) == (-0.5, 0.5)  # symmetric, kept by max-|x| pooling
    assert np.asarray(delta.z)[1, 0] == pytest.approx(-0.5)  # rows 4-7, cols 0-5
    # mask cells are block means of the real keep-weight
    w = panels["mask"].numpy()
    assert np.asarray(by_name["mask"].z)[0, 0] == pytest.approx(w[:4, :6].mean(), rel=1e-6)
    for trace in fig.data:
        assert UP in trace.hovertemplate and "rows %{y}" in trace.hovertemplate
        assert list(trace.y[:2]) == ["0–3", "4–7"] and list(trace.x[:2]) == ["0–5", "6–11"]
    assert fig.layout.xaxis2.matches == "x" and fig.layout.xaxis4.matches == "x"
    assert fig.layout.yaxis.autorange == "reversed"
    assert UP in fig.layout.title.text and "4×6" in fig.layout.title.text


def test_tensor_panels_ranges_override_a_panel_scale():
    panels = _spider_panels(16, 16)
    fig = figures.tensor_panels(panels, UP, ranges={"delta": (-0.01, 0.01)})
    delta = next(t for t in fig.data if t.name == "delta")
    assert (delta.zmin, delta.zmax) == (-0.01, 0.01)


def test_tensor_panels_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        figures.tensor_panels({"mask": torch.zeros(4, 4), "delta": torch.zeros(4, 5)}, UP)


def test_mask_histogram_of_a_real_spider_mask():
    w = _spider_panels(200, 300)["mask"]
    fig = figures.mask_histogram(w, bins=20, param=UP)
    interior, zero, one = fig.data
    share_zero = float((w == 0).double().mean())
    share_one = float((w == 1).double().mean())
    assert zero.y[0] == pytest.approx(share_zero) and one.y[0] == pytest.approx(share_one)
    assert sum(interior.y) + zero.y[0] + one.y[0] == pytest.approx(1.0)
    assert 0.4 < share_zero < 0.6 and 0.15 < share_one < 0.35  # DESIGN §1's half and quarter
    inside = w[(w > 0) & (w < 1)]
    assert interior.y[10] == pytest.approx(float(((inside >= 0.5) & (inside < 0.55)).sum()) / w.numel())
    assert UP in fig.layout.title.text


# --------------------------------------------------------------------------------------------
# size budget on realistic inputs
# --------------------------------------------------------------------------------------------


def test_every_figure_stays_under_two_megabytes():
    sizes = {}
    big = _spider_panels(4096, 4096)
    sizes["tensor_panels 4096x4096 x4"] = figure_json_size(figures.tensor_panels(big, UP))
    sizes["mask_histogram 16.8M values"] = figure_json_size(figures.mask_histogram(big["mask"]))
    layers = _layers(100, np.arange(0, 2000, 10))  # 100 layers x 200 steps
    sizes["mask_density_heatmap 100x200"] = figure_json_size(figures.mask_density_heatmap(layers))
    sizes["discrepancy_bars 100 layers"] = figure_json_size(
        figures.discrepancy_bars(stats.layer_discrepancy(layers)))
    many = pd.concat([_metrics().assign(run=lambda f, i=i: f["run"] + f"-{i}") for i in range(20)])
    sizes["score_curves 60 runs"] = figure_json_size(figures.score_curves(many))
    sizes["tradeoff_plane 60 runs"] = figure_json_size(figures.tradeoff_plane(many))
    over = {k: v for k, v in sizes.items() if v > MAX_FIGURE_BYTES}
    assert not over, f"figures over {MAX_FIGURE_BYTES} bytes: {over}"
    assert sizes["tensor_panels 4096x4096 x4"] > 200_000  # the panels were not emptied to fit
    json.loads(figures.tensor_panels(_spider_panels(8, 8), UP).to_json())  # valid JSON


def test_tensor_panels_unknown_names_pick_a_scale_from_the_values():
    generator = torch.Generator().manual_seed(6)
    fig = figures.tensor_panels({"S": torch.randn(10, 10, generator=generator),
                                 "fisher rank": torch.rand(10, 10, generator=generator)}, UP)
    signed, unit = fig.data
    assert signed.zmin == -signed.zmax and signed.zmax == pytest.approx(float(np.abs(signed.z).max()))
    assert (unit.zmin, unit.zmax) == (0.0, 1.0)


def test_layering_analysis_imports_no_streamlit_and_spider_no_plotly():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for imports, forbidden in (
        ("analysis, analysis.figures, analysis.stats, analysis.heatmaps", ("streamlit",)),
        ("spider.methods, spider.naming, spider.metrics, spider.importance",
         ("analysis", "plotly", "streamlit")),
    ):
        code = (f"import sys, {imports}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
                "assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
