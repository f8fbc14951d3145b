"""Tables behind the Compare and Layers pages (analysis.explore, analysis.overview) and their
figures (analysis.figures), tested without Streamlit on hand-made frames."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import explore, overview, stats
from analysis import figures as xfig
from analysis.figures import MAX_FIGURE_BYTES, figure_json_size

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints" / "runs"


def _metrics(rows):
    return pd.DataFrame(rows, columns=list(stats.METRICS_COLUMNS))


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------


def test_smooth_is_a_debiased_moving_average():
    x = np.array([1.0, 3.0, np.nan, 7.0])
    out = explore.smooth(x, 0.5)
    assert out[0] == 1.0  # not pulled towards 0
    assert out[1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert math.isnan(out[2])
    assert out[3] == pytest.approx((0.125 * 1 + 0.25 * 3 + 0.5 * 7) / 0.875)
    assert np.array_equal(explore.smooth(x, 0.0), x, equal_nan=True)
    with pytest.raises(ValueError, match="smoothing"):
        explore.smooth(x, 1.0)


def test_training_time_adds_step_times_and_excludes_evaluation():
    train = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 2, "method": "m",
                          "step": [1, 2, 3, 1, 2], "loss": 1.0, "lr": 1e-3,
                          "seconds": [0.5, 0.25, 0.25, 1.0, 2.0]})
    metrics = _metrics([("a", "m", s, "upstream", "score", v) for s, v in ((0, 0.9), (2, 0.8))]
                       + [("b", "m", 2, "downstream", "score", 0.4)])
    curves = explore.score_curves_frame(metrics, train)
    assert tuple(curves.columns) == explore.CURVE_COLUMNS
    a = curves[curves["run"] == "a"]
    assert a["time_s"].tolist() == [0.0, 0.75]
    assert curves.loc[curves["run"] == "b", "time_s"].tolist() == [3.0]
    loss = explore.loss_curves_frame(train)
    assert loss.loc[loss["run"] == "a", "time_s"].tolist() == [0.5, 0.75, 1.0]


def test_smooth_frame_smooths_each_run_and_split_apart():
    frame = pd.DataFrame({"run": ["a", "a", "b", "b"], "split": "upstream",
                          "step": [0, 1, 0, 1], "score": [0.0, 1.0, 1.0, 1.0]})
    out = explore.smooth_frame(frame, "score", 0.5)
    assert out["score"].tolist() == pytest.approx([0.0, 0.5 / 0.75, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# 2x2 cells
# --------------------------------------------------------------------------------------------


def test_cells_long_fills_the_downstream_cell_and_measures_change_from_step_0():
    rows = []
    for step, d, cells in ((0, 0.1, (0.7, 0.2, 0.9)), (50, 0.5, (0.6, 0.4, 0.8))):
        rows.append(("r", "spider", step, "downstream", "score", d))
        for cell, value in zip(("idimg-oodq", "oodimg-idq", "oodimg-oodq"), cells):
            rows.append(("r", "spider", step, cell, "score", value))
    rows.append(("plain", "full", 50, "downstream", "score", 0.3))  # no cells: left out
    cells = explore.cells_long(_metrics(rows))
    assert tuple(cells.columns) == explore.CELLS_LONG_COLUMNS
    assert cells["run"].unique().tolist() == ["r"]
    got = cells.set_index("cell")
    assert got.loc["idimg-idq", "score"] == 0.5 and got.loc["idimg-idq", "source"] == "downstream"
    assert got.loc["idimg-idq", "change"] == pytest.approx(0.4)
    assert got.loc["oodimg-oodq", "change"] == pytest.approx(-0.1)
    assert (got["step"] == 50).all()
    wide = explore.cells_wide(cells, "change")
    assert wide.loc[0, "oodimg-idq"] == pytest.approx(0.2)
    fig = xfig.cells_heatmap(cells, "change")
    assert fig.data[0].zmin == -fig.data[0].zmax  # white = no change
    assert "0.50<br>(+0.40)" in fig.data[0].text[0].tolist()


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


def _layers():
    """Two tensors in block 0 (sizes 100 and 300), one outside blocks, two steps."""
    rows = []
    for step, scale in ((10, 1.0), (20, 2.0)):
        for param, layer, module, numel, dens, i, g, gt, upd, rel in (
            ("m.layers.0.q_proj.weight", 0, "q_proj", 100, 0.2, 0.5, 0.6, 0.7, 1.0, 0.1),
            ("m.layers.0.down_proj.weight", 0, "down_proj", 300, 0.6, 0.4, 0.3, 0.2, 2.0, 0.2),
            ("m.embed_tokens.weight", None, "embeddings", 50, 0.9, 0.5, 0.5, 0.5, 0.0, 0.0),
        ):
            rows.append({
                "run": "r", "method": "spider", "step": step, "param": param,
                "component": "llm", "layer": layer, "module": module, "numel": numel,
                "mask_mean": dens, "mask_density": dens, "importance_pre_mean": i,
                "importance_ft_mean": g, "frac_ft_gt_pre": gt,
                "importance_pre_sq_mean": np.nan, "importance_ft_sq_mean": np.nan,
                "importance_cross_mean": np.nan, "update_norm": upd * scale,
                "update_rel_norm": rel * scale,
            })
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def test_layer_table_pools_each_layer_exactly_and_in_model_order():
    table = explore.layer_table(_layers(), step=12)  # nearest logged step: 10
    assert tuple(table.columns) == explore.LAYER_TABLE_COLUMNS
    assert table["name"].tolist() == ["language model · outside blocks",
                                      "language model · block 0"]
    block = table.iloc[1]
    assert block["step"] == 10 and block["numel"] == 400
    assert block["mask_density"] == pytest.approx((100 * 0.2 + 300 * 0.6) / 400)
    assert block["frac_ft_gt_pre"] == pytest.approx((100 * 0.7 + 300 * 0.2) / 400)
    assert block["discrepancy_mean"] == pytest.approx((100 * 0.1 + 300 * -0.1) / 400)
    # ||delta|| pooled: sqrt(1 + 4); ||theta0|| per tensor = norm / rel = 10 and 10
    assert block["update_rel_norm"] == pytest.approx(math.sqrt(5) / math.sqrt(200))
    last = explore.layer_table(_layers())
    assert (last["step"] == 20).all()


def test_filters_and_plain_names():
    only_down = explore.filter_layers(_layers(), ["llm"], ["down_proj"])
    assert set(only_down["module"]) == {"down_proj"}
    table = explore.layer_table(only_down, 20)
    assert table["mask_density"].tolist() == [0.6]
    assert table["update_rel_norm"].tolist() == pytest.approx([0.4])
    assert explore.module_name("down_proj") == "MLP: down"
    assert explore.layer_name("projector", None) == "projector"
    assert explore.layer_name("vision", 2) == "vision encoder · block 2"


def test_layer_step_matrix_and_fitted_range():
    matrix = explore.layer_step_matrix(_layers(), "mask_density")
    block = matrix[matrix["name"] == "language model · block 0"]
    assert block["step"].tolist() == [10, 20]
    assert block["mask_density"].tolist() == pytest.approx([0.5, 0.5])
    lo, hi = explore.fitted_range(matrix["mask_density"])
    assert (lo, hi) == (0.5, 0.9)
    assert explore.fitted_range([0.5, 0.5]) == pytest.approx((0.4995, 0.5005))
    assert explore.fitted_range([0.5], absolute=(0, 1)) == (0.0, 1.0)
    fig = xfig.layer_step_heatmap(matrix, "mask_density", (lo, hi), step=10)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.5, 0.9)
    assert list(fig.data[0].y) == ["language model · outside blocks", "language model · block 0"]


def test_a_run_with_one_logged_step_draws_whole_steps_and_a_visible_loss():
    """Early in a run (one step logged) the step axes tick at whole steps only, and the
    loss, one point, is drawn as a dot (a line of one point is invisible)."""
    one = _layers()
    one = one[one["step"] == one["step"].min()]
    heat = xfig.layer_step_heatmap(explore.layer_step_matrix(one, "mask_density"),
                                   "mask_density", (0, 1))
    # ticked at the logged steps themselves (issue 23: not at every integer between)
    assert (heat.layout.xaxis.tickmode, heat.layout.xaxis.tickvals) == (
        "array", (float(one["step"].min()),))
    loss = pd.DataFrame({"run": ["a"], "method": ["spider"], "step": [1], "time_s": [0.4],
                         "loss": [2.5]})
    fig = xfig.compare_loss_curves(loss)
    assert fig.data[0].mode == "markers" and fig.layout.xaxis.tickvals == (1.0,)
    assert xfig.compare_loss_curves(loss, x="time_s").layout.xaxis.dtick is None
    many = pd.concat([loss.assign(step=s, loss=1.0 / s) for s in range(1, 200)])
    fig = xfig.compare_loss_curves(many)
    assert fig.data[0].mode == "lines" and fig.layout.xaxis.tickformat == ",d"


# --------------------------------------------------------------------------------------------
# colours, figure sizes, overview
# --------------------------------------------------------------------------------------------


def test_run_colours_are_distinct_and_do_not_depend_on_what_is_shown():
    runs = [f"run{i}" for i in range(10)]
    colors = xfig.run_colors(runs)
    assert len(set(colors.values())) == 10
    curves = pd.DataFrame({"run": ["run3", "run7"], "method": ["spider", "spider"],
                           "split": "upstream", "step": [0, 0], "time_s": 0.0,
                           "score": [0.5, 0.6]})
    fig = xfig.compare_score_curves(curves, colors)
    assert [t.line.color for t in fig.data] == [colors["run3"], colors["run7"]]
    assert fig.data[0].marker.symbol == xfig.method_symbol("spider")


def test_sample_figures_stay_under_the_size_budget():
    from analysis import load_run

    runs = [load_run(SAMPLES / name) for name in ("spider", "full")]
    metrics = pd.concat([r.metrics for r in runs])
    train = pd.concat([r.train for r in runs])
    layers = runs[0].layers
    figs = [
        xfig.compare_score_curves(explore.score_curves_frame(metrics, train)),
        xfig.compare_loss_curves(explore.loss_curves_frame(train)),
        xfig.cells_heatmap(explore.cells_long(metrics)),
        xfig.layer_step_heatmap(explore.layer_step_matrix(layers), "mask_density", (0, 1)),
        xfig.layer_bars(explore.layer_table(layers), ["discrepancy_mean", "update_rel_norm"]),
    ]
    for fig in figs:
        assert figure_json_size(fig) <= MAX_FIGURE_BYTES


def test_overview_names_options_data_and_scores(tmp_path):
    run = tmp_path / "binary"
    shutil.copytree(SAMPLES / "spider", run, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((run / "run.json").read_text())
    info["options"]["mask"] = "binary"
    info["config"]["hybrid_ratio"] = 0.25
    info["model"]["path"] = str(SAMPLES.parent / "tiny-llava-base")
    (run / "run.json").write_text(json.dumps(info))
    row = overview.run_overview(run).iloc[0]
    assert row["options"] == "mask=binary"
    assert row["data"] == "builtin:counting + 25% builtin:upstream"
    summary = __import__("analysis").load_run(run).summary.iloc[0]
    assert row["E"] == pytest.approx(summary["E"]) and row["U"] == pytest.approx(summary["U"])

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text("{not json")
    row = overview.run_overview(damaged).iloc[0]
    assert row["status"] == "damaged" and "run.json" in row["problem"]


@pytest.mark.parametrize("source, config, expected", [
    ({"kind": "held_out", "data": "d.json", "examples": 15, "of": 300, "share": 0.05}, {},
     "15 of 300 records, held out of training"),
    ({"kind": "eval_data", "data": "other.json", "examples": 40}, {}, "other.json (40 examples)"),
    ({"kind": "test_split", "data": "builtin:counting", "examples": 300}, {},
     "test split (300 examples)"),
    # runs from before run.json said: the rule is certain for these two
    (None, {"data": "builtin:counting"}, "test split"),
    (None, {"data": "a.json", "eval_data": "b.json"}, "b.json"),
    # and unknown for a JSON file without --eval-data
    (None, {"data": "a.json"}, ""),
])
def test_overview_says_what_the_downstream_score_was_measured_on(source, config, expected):
    info = {"config": config, **({"downstream_eval": source} if source else {})}
    assert overview.eval_text(info) == expected


def test_overview_of_a_sample_run_names_its_evaluation_data():
    row = overview.run_overview(SAMPLES / "lora").iloc[0]
    assert row["evaluated_on"].startswith("test split (")


def test_trade_off_plane_takes_run_colours_and_method_markers():
    from analysis.figures import tradeoff_plane

    summary = pd.DataFrame({"run": ["a", "b"], "method": ["spider", "spider"],
                            "U": [0.9, 0.8], "D": [0.3, 0.4]})
    fig = tradeoff_plane(summary, colors={"a": "#111111", "b": "#222222"},
                         symbols={"a": "star", "b": "star"})
    finals = {t.name: t for t in fig.data if t.meta == {"final": True}}
    assert finals["a"].marker.color == "#111111" and finals["b"].marker.color == "#222222"
    assert finals["a"].marker.symbol == finals["b"].marker.symbol == "star"
    default = {t.name: t for t in tradeoff_plane(summary).data if t.meta == {"final": True}}
    assert default["a"].marker.color == default["b"].marker.color  # the method's colour
