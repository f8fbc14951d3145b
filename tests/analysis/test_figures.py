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




# --------------------------------------------------------------------------------------------
# size budget on realistic inputs
# --------------------------------------------------------------------------------------------


def test_every_figure_stays_under_two_megabytes():
    sizes = {}
    big = _spider_panels(4096, 4096)
    sizes["tensor_panels 4096x4096 x4"] = figure_json_size(figures.tensor_panels(big, UP))
    sizes["value_histograms 16.8M values"] = figure_json_size(
        figures.value_histograms({"mask": big["mask"]}))
    from analysis import explore

    layers = _layers(100, np.arange(0, 2000, 10))  # 100 layers x 200 steps
    matrix = explore.layer_step_matrix(layers, "mask_density")
    sizes["layer_step_heatmap 100x200"] = figure_json_size(
        figures.layer_step_heatmap(matrix, "mask_density", (0, 1)))
    table = explore.table_at_step(explore.layer_table_all_steps(layers), 1990)
    sizes["layer_bars 100 layers"] = figure_json_size(
        figures.layer_bars(table, ["discrepancy_mean", "update_rel_norm"]))
    many = pd.concat([_metrics().assign(run=lambda f, i=i: f["run"] + f"-{i}") for i in range(20)])
    curves = explore.score_curves_frame(many, pd.DataFrame(
        columns=["run", "method", "step", "loss", "lr", "seconds"]))
    sizes["compare_score_curves 60 runs"] = figure_json_size(figures.compare_score_curves(curves))
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


# --------------------------------------------------------------------------------------------
# issue 23: the trade-off plane zooms to the runs; log axes read as numbers
# --------------------------------------------------------------------------------------------


def _crowded_summary() -> pd.DataFrame:
    """Final points as the samples have them: U 0.6–1, D 0.2–0.45, two nearly on top."""
    points = {"spider": (0.92, 0.35), "wise_ft": (0.93, 0.36), "full": (0.66, 0.36),
              "hybrid": (0.93, 0.45), "lora": (0.89, 0.31)}
    return pd.DataFrame([{"run": r, "method": r, "U": u, "D": d}
                         for r, (u, d) in points.items()])


def test_tradeoff_plane_zooms_to_the_runs_and_keeps_markers_apart():
    fig = figures.tradeoff_plane(_crowded_summary())
    xr, yr = fig.layout.xaxis.range, fig.layout.yaxis.range
    assert 0.55 < xr[0] < 0.66 and 0.93 < xr[1] <= 1.02  # not 0–1: zoomed, with a margin
    assert 0.2 < yr[0] < 0.31 and 0.45 < yr[1] < 0.55
    finals = [t for t in fig.data if t.meta == {"final": True}]
    sizes = [t.marker.size for t in finals]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert all(t.marker.line.width > 0 for t in finals)
    # labels: each placed one overlaps no other label (checked by place_labels' own boxes)
    assert sum(t.text is not None for t in finals) >= 4


def test_tradeoff_plane_leaves_the_base_model_out_of_the_zoom():
    metrics = _metrics()  # every run starts at U 0.6, D 0.2 (step 0)
    fig = figures.tradeoff_plane(metrics)
    later = stats.score_table(metrics)
    later = later[later["step"] > 0]
    assert fig.layout.yaxis.range[0] <= later["D"].min() and fig.layout.yaxis.range[0] > 0.2
    assert any("base model" in a.text for a in fig.layout.annotations)


def test_place_labels_never_overlaps():
    points = [(0.5, 0.5), (0.505, 0.5), (0.5, 0.505), (0.51, 0.51), (0.495, 0.495)]
    texts = ["samples/spider", "samples/wise_ft", "samples/full", "samples/hybrid", "x"]
    spots = figures.place_labels(points, texts, (0.4, 0.6), (0.4, 0.6), size=(700, 450))
    assert spots[0] is not None and spots[1] is not None
    # labels of points on top of each other go to different sides
    placed = [s for s in spots if s]
    assert len(set(placed)) == len(placed)
    # far apart, every label takes the first choice: above its marker
    assert figures.place_labels([(0.1, 0.1), (0.9, 0.9)], ["a", "b"], (0, 1), (0, 1)) == [
        "top center", "top center"]
    # every label sits in one of the allowed spots, or is left to the legend (None)
    allowed = {name for name, _, _ in figures.tradeoff._LABEL_SPOTS}
    assert all(s is None or s in allowed for s in spots)


@pytest.mark.parametrize("values", [[0.07, 0.4], [0.2, 0.9], [0.5, 0.6], [0.01, 3000],
                                    [1.3, 1.4]])
def test_log_axis_ticks_are_written_out_numbers(values):
    from analysis.figures import log_axis

    axis = log_axis(values)
    assert axis["type"] == "log" and len(axis["tickvals"]) >= 2
    assert axis["ticktext"] == [f"{v:g}" for v in axis["tickvals"]]
    assert axis["tickvals"] == sorted(axis["tickvals"])
    # no bare leading digits standing for 0.4, 0.3... the labels are the values themselves
    for text, value in zip(axis["ticktext"], axis["tickvals"]):
        assert float(text) == pytest.approx(value)
    low, high = 10 ** axis["range"][0], 10 ** axis["range"][1]
    assert low <= min(values) and high >= max(values)


def test_compare_curves_on_log_scale_use_written_out_ticks():
    from analysis import explore
    from analysis import figures as xfig

    curves = pd.DataFrame({"run": "a", "method": "full", "step": [0, 50, 100] * 2,
                           "time_s": 0.0, "split": ["upstream"] * 3 + ["downstream"] * 3,
                           "score": [0.96, 0.9, 0.88, 0.03, 0.3, 0.4]})
    curves = curves[list(explore.CURVE_COLUMNS)]
    fig = xfig.compare_score_curves(curves, log_y=True)
    assert fig.layout.yaxis.tickmode == "array" and "0.1" in fig.layout.yaxis.ticktext
    loss = pd.DataFrame({"run": "a", "method": "full", "step": [1, 2, 3], "time_s": 0.0,
                         "loss": [2.5, 1.1, 0.6]})
    fig = xfig.compare_loss_curves(loss, log_y=True)
    assert fig.layout.yaxis.ticktext[:3] == ("0.6", "0.8", "1")


def test_tensor_panels_pool_only_what_the_budget_demands():
    # issue 23: a 160×448 tensor in four panels was pooled 1×2 although it fits
    assert figures.panel_cells(4, shape=(160, 448)) == (160, 448)
    assert figures.panel_block((160, 448), 4) == (1, 1)
    assert "one weight" in figures.cell_words((1, 1), (160, 448))
    big = (4096, 11008)
    rows, cols = figures.panel_cells(4, shape=big)
    fr, fc = figures.panel_block(big, 4)
    assert fr == fc > 1 and rows * cols * 4 * 5.34 <= figures.MAX_FIGURE_BYTES
    assert "pools a block of" in figures.cell_words((fr, fc), big)
    w = torch.rand(160, 448)
    fig = figures.tensor_panels({"mask": w, "delta": w - 0.5, "I": w, "G": w}, UP)
    assert all(np.asarray(t.z).shape == (160, 448) for t in fig.data)
    assert figure_json_size(fig) <= MAX_FIGURE_BYTES
    assert all("block" not in t.hovertemplate for t in fig.data)


def test_forgetting_drift_table_takes_f_and_kl_at_the_last_evaluation():
    from analysis.figures.attribution import forgetting_drift_table, forgetting_vs_drift

    def row(run, step, split, metric, value):
        return {"run": run, "method": "full", "step": step, "split": split, "metric": metric,
                "value": value}

    rows = []
    for run, u_end in (("a", 0.5), ("b", 0.8), ("plain", 0.7)):
        for step, u, d in ((0, 0.9, 0.1), (100, u_end, 0.6)):
            rows += [row(run, step, "upstream", "score", u),
                     row(run, step, "downstream", "score", d)]
    rows += [row("a", 0, "upstream", "kl_to_base", 0.0),
             row("a", 100, "upstream", "kl_to_base", 0.3),
             row("b", 50, "upstream", "kl_to_base", 0.1)]  # not at F's step: its last
    table = forgetting_drift_table(pd.DataFrame(rows)).set_index("run")
    assert list(table.index) == ["a", "b"]  # "plain" logged no kl_to_base
    assert table.loc["a", "F"] == pytest.approx(-0.4)
    assert table.loc["a", "kl_to_base"] == pytest.approx(0.3)
    assert (table.loc["b", "step"], table.loc["b", "kl_to_base"]) == (50, pytest.approx(0.1))
    spec = forgetting_vs_drift(table.reset_index()).to_plotly_json()
    assert [t["name"] for t in spec["data"]] == ["a", "b"]
    empty = forgetting_vs_drift(forgetting_drift_table(pd.DataFrame(rows[:12])))
    assert "kl_to_base" in empty.to_plotly_json()["layout"]["annotations"][0]["text"]


def test_mask_flip_map_draws_each_entry_when_it_fits():
    from analysis.figures.tensors import mask_flip_map

    flips = torch.zeros(40, 300, dtype=torch.int8)
    flips[3, 7], flips[5, 299] = 1, -1
    z = np.asarray(mask_flip_map(flips, "p", 10, 20).data[0].z, dtype=float)
    assert z.shape == (40, 300) and z[3, 7] == 1 and z[5, 299] == -1 and abs(z).sum() == 2


def _lab(color: str) -> np.ndarray:
    """CIELAB of a "#rrggbb" or "rgb(r, g, b)" colour (sRGB, D65): distances there are about
    what the eye sees, 2.3 being just noticeable."""
    if color.startswith("#"):
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], float) / 255
    else:
        rgb = np.array([float(v) for v in color[color.index("(") + 1:-1].split(",")[:3]]) / 255
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_component_colours_are_never_run_or_method_colours():
    # issue 25: orange was the projector on Layers and full fine-tuning on Compare
    from analysis.figures.style import _METHOD_COLORS, COMPONENT_COLORS, RUN_PALETTE
    from spider.naming import COMPONENTS

    assert set(COMPONENT_COLORS) == set(COMPONENTS)
    components = {c.lower() for c in COMPONENT_COLORS.values()}
    assert len(components) == len(COMPONENTS)  # the components differ from one another
    others = [*RUN_PALETTE, *_METHOD_COLORS.values(), *(figures.method_color(m) for m in
                                                        ("not-a-method", "x", "y"))]
    assert not components & {c.lower() for c in others}
    # not merely unequal: every run colour covers some hue, so the two families differ in
    # lightness: components pale tints (CIELAB L* at least 80), runs and methods full colours
    # (L* at most 75; the lightest, #bcbd22, is 74), and every pair far apart to the eye (the
    # nearest is about 31 apart; #ff7f0e and a slightly lighter orange #ff9f4e are 23)
    assert min(_lab(c)[0] for c in components) >= 80
    assert max(_lab(o)[0] for o in others) <= 75
    nearest = min(np.linalg.norm(_lab(c) - _lab(o)) for c in components for o in others)
    assert nearest > 25
    assert min(np.linalg.norm(_lab(a) - _lab(b)) for a in components for b in components
               if a != b) > 10


# --------------------------------------------------------------------------------------------
# presentation mode (issue 25, item 3)
# --------------------------------------------------------------------------------------------


def _small_text_figure() -> go.Figure:
    """Every kind of chart text, each set small (10-13 px), as the figure modules do."""
    return go.Figure(
        data=[
            go.Heatmap(z=[[0.1, 0.2], [0.3, 0.4]], texttemplate="%{z:.2f}",
                       textfont={"size": 11}, colorbar={"title": {"text": "value"}}),
            go.Scatter(x=[0, 1], y=[0, 1], mode="markers+text", text=["a", "b"],
                       textfont={"size": 12, "color": "red"}, name="run", xaxis="x2",
                       yaxis="y2"),
            go.Contour(z=[[1, 2], [3, 4]], contours={"showlabels": True,
                                                      "labelfont": {"size": 10}},
                       showscale=False, xaxis="x2", yaxis="y2"),
        ],
        layout={
            "title": {"text": "A long title that a projector's narrow chart cannot hold on "
                              "one line<br><sup>and a subtitle under it</sup>",
                      "font": {"size": 14}},
            "xaxis": {"domain": [0, 0.45], "title": {"text": "training step"}},
            "xaxis2": {"domain": [0.55, 1], "anchor": "y2", "tickfont": {"size": 10}},
            "yaxis2": {"anchor": "x2"},
            "legend": {"font": {"size": 12}, "x": 1.02},
            "annotations": [{"text": "Upstream: pre-training ability kept after fine-tuning",
                             "x": 0.225, "y": 1.0, "xref": "paper", "yref": "paper",
                             "yanchor": "bottom", "showarrow": False, "font": {"size": 13}}],
            "height": 300,
        },
    )


def _font_sizes(fig: go.Figure) -> dict[str, float]:
    layout = fig.layout
    sizes = {"layout": layout.font.size, "title": layout.title.font.size,
             "legend": layout.legend.font.size, "x ticks": layout.xaxis.tickfont.size,
             "x2 ticks": layout.xaxis2.tickfont.size, "y2 ticks": layout.yaxis2.tickfont.size,
             "x title": layout.xaxis.title.font.size,
             "annotation": layout.annotations[0].font.size,
             "cell text": fig.data[0].textfont.size,
             "colour bar ticks": fig.data[0].colorbar.tickfont.size,
             "colour bar title": fig.data[0].colorbar.title.font.size,
             "marker text": fig.data[1].textfont.size,
             "contour labels": fig.data[2].contours.labelfont.size}
    return {k: (v or 0) for k, v in sizes.items()}


def test_presentation_layout_raises_every_chart_text_to_16_px_and_leaves_the_input_alone():
    from analysis.figures.style import PRESENTATION_FONT, presentation_layout

    fig = _small_text_figure()
    before = fig.to_json()
    shown = presentation_layout(fig, 780)
    assert fig.to_json() == before  # a copy: the cached figure is not changed
    assert max(_font_sizes(fig).values()) < PRESENTATION_FONT  # the test means something
    sizes = _font_sizes(shown)
    assert min(sizes.values()) >= PRESENTATION_FONT, sizes
    assert sizes["title"] >= 20
    # plotly draws <sup> at 70 %: under 16 px, so it becomes text of its own size
    assert "<sup>" not in shown.layout.title.text
    assert f'<span style="font-size:{PRESENTATION_FONT}px">and a subtitle' in \
        shown.layout.title.text
    # a colour of its own is kept, the rest is near black
    assert shown.data[1].textfont.color == "red" and shown.layout.font.color == "#262730"
    # margins that plotly grows for labels, and a legend that wraps under the plot
    assert shown.layout.xaxis.automargin and shown.layout.yaxis2.automargin
    assert shown.layout.legend.orientation == "h" and shown.layout.legend.yref == "container"
    assert shown.layout.height > fig.layout.height


def _lines(text: str) -> list[str]:
    import re

    return [re.sub(r"<[^>]+>", "", line) for line in text.split("<br>")]


def test_presentation_layout_wraps_titles_to_the_width_they_get():
    from analysis.figures.style import _CHAR_WIDTH, presentation_layout

    fig = _small_text_figure()
    narrow, wide = presentation_layout(fig, 500), presentation_layout(fig, 1600)
    # the figure's title fits the chart's width at 20 px; a narrow chart takes more lines
    for shown, width in ((narrow, 500), (wide, 1600)):
        assert max(len(line) for line in _lines(shown.layout.title.text)) * _CHAR_WIDTH * 20 \
            <= width - 40
    assert len(_lines(narrow.layout.title.text)) > len(_lines(wide.layout.title.text)) >= 2
    # a panel title fits its panel (45 % of the plot), words kept whole and in order
    panel = narrow.layout.annotations[0].text
    assert len(_lines(panel)) >= 2
    assert " ".join(_lines(panel)) == fig.layout.annotations[0].text
    assert max(len(line) for line in _lines(panel)) * _CHAR_WIDTH * 16 <= (500 - 120) * 0.45
    # the top margin holds the title's lines and the panel titles' lines over the plot
    lines = len(_lines(narrow.layout.title.text)) * 20 + len(_lines(panel)) * 16
    assert narrow.layout.margin.t >= 1.3 * lines


def test_presentation_wrap_never_splits_a_tag():
    from analysis.figures.style import _wrap

    text = _wrap("one two <span style='font-size:16px'>three four</span> five", 60, 16)
    assert "<span style='font-size:16px'>" in text
    assert all(line.count("<") == line.count(">") for line in text.split("<br>"))
