"""Figures of the app's Compare and Layers pages: pure functions, DataFrame -> ``go.Figure``.

Conventions (beside those of :mod:`analysis.figures`):

* a **run** has a colour of its own (:func:`run_colors`), so several runs of one method can be
  told apart; the **method** is the grouping, shown by the marker symbol (:func:`method_symbol`)
  and named in the legend and hover;
* heatmaps of layers x steps take their colour range from the caller (fitted to the data, or
  absolute 0–1; :func:`analysis.explore.fitted_range`), so that two runs side by side share it.
"""

from __future__ import annotations

import html
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from analysis import explore, stats
from analysis.figures import COMPONENT_COLORS

# Distinct, saturated colours that read on white: category10 first (the first ten runs are
# always told apart), then further dark ones.
# Grey is left out: it reads as "disabled".
RUN_PALETTE = tuple(c for c in dict.fromkeys([*qualitative.D3, *qualitative.Dark24])
                    if c.lower() not in ("#7f7f7f", "#778aae", "#b68e00"))
_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "x", "star", "cross",
            "triangle-down", "pentagon", "hexagon")
_METHOD_ORDER = ("spider", "full", "magnitude_mask", "random_mask", "l2", "dare", "wise_ft",
                 "tailor", "hft", "lora")


def run_colors(runs: Sequence[str]) -> dict[str, str]:
    """A colour per run, in the order given (the first ten distinct, then further ones).

    Pass every run there is, in a stable order (the app: sample runs, then the user's by
    name), not only those on the chart: a run then keeps its colour whatever is shown.
    """
    ordered = list(dict.fromkeys(str(r) for r in runs))
    return {run: RUN_PALETTE[i % len(RUN_PALETTE)] for i, run in enumerate(ordered)}


def method_symbol(method: str) -> str:
    """The marker symbol of a method (the same in every figure)."""
    if method in _METHOD_ORDER:
        return _SYMBOLS[_METHOD_ORDER.index(method) % len(_SYMBOLS)]
    return _SYMBOLS[zlib.crc32(str(method).encode()) % len(_SYMBOLS)]


def _color(colors: Mapping[str, str] | None, run: str) -> str:
    if colors and run in colors:
        return colors[run]
    return run_colors([run])[run]


def _empty(title: str, message: str, height: int = 300) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14})
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=height)
    return fig


_X_TITLES = {"step": "training step", "time_s": "training time (s, evaluations excluded)"}


def step_axis(steps) -> dict:
    """Axis settings for training steps: whole numbers only. Left to itself, plotly puts a
    tick at every half step when only a few steps are shown (one logged step: 0.5, 1, 1.5)."""
    values = np.asarray(steps, dtype=float)
    values = values[np.isfinite(values)]
    if values.size and values.max() - values.min() <= 10:
        return {"tickmode": "linear", "tick0": 0, "dtick": 1}
    return {"tickformat": ",d"}


def _axis_name(kind: str, index: int) -> str:
    """``xaxis``, ``xaxis2``... (layout key) for subplot ``index`` (1-based)."""
    return f"{kind}axis{index if index > 1 else ''}"


def _panel_layout(rows: int, cols: int, gap_x: float = 0.08, gap_y: float = 0.1) -> dict:
    """Layout axes for a rows x cols grid of panels, numbered row by row (1 = top left).

    What ``plotly.subplots.make_subplots`` builds, without its cost (a third of a second per
    figure, on every rerun of a page).
    """
    layout: dict = {}
    width = (1 - gap_x * (cols - 1)) / cols
    height = (1 - gap_y * (rows - 1)) / rows
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c + 1
            x0 = c * (width + gap_x)
            y1 = 1 - r * (height + gap_y)
            layout[_axis_name("x", i)] = {"domain": _clip([x0, x0 + width]),
                                          "anchor": f"y{i if i > 1 else ''}"}
            layout[_axis_name("y", i)] = {"domain": _clip([y1 - height, y1]),
                                          "anchor": f"x{i if i > 1 else ''}"}
    return layout


def _clip(domain: list[float]) -> list[float]:
    """A domain inside [0, 1] (sums of fractions can land a hair outside)."""
    return [min(1.0, max(0.0, round(v, 9))) for v in domain]


def _ref(kind: str, index: int) -> str:
    return f"{kind}{index if index > 1 else ''}"


# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------


def compare_score_curves(curves: pd.DataFrame, colors: Mapping[str, str] | None = None,
                         x: str = "step", log_y: bool = False) -> go.Figure:
    """Upstream (left) and downstream (right) score of every run over training.

    Input: :func:`analysis.explore.score_curves_frame` (possibly smoothed). Colour = run,
    marker = method. ``x``: ``step`` or ``time_s``.
    """
    if x not in _X_TITLES:
        raise ValueError(f"x must be 'step' or 'time_s', got {x!r}")
    stats.require_columns(curves, explore.CURVE_COLUMNS, "score curves DataFrame")
    if curves.empty:
        return _empty("Scores over training", "No evaluation scores in the chosen runs.")
    splits = ("upstream", "downstream")
    traces = []
    for run in pd.unique(curves["run"]):
        mine = curves[curves["run"] == run]
        method = str(mine["method"].iloc[0])
        for col, split in enumerate(splits, start=1):
            line = mine[mine["split"] == split].sort_values("step")
            if line.empty:
                continue
            safe = html.escape(str(run))
            traces.append(go.Scatter(
                x=line[x].to_numpy(float), y=line["score"].to_numpy(float),
                xaxis=_ref("x", col), yaxis=_ref("y", col),
                mode="lines+markers", name=f"{run} ({method})", legendgroup=str(run),
                showlegend=col == 1, customdata=line["step"].to_numpy(),
                line={"color": _color(colors, run), "width": 2},
                marker={"symbol": method_symbol(method), "size": 8},
                hovertemplate=(f"<b>{safe}</b> ({html.escape(method)})<br>{split} score "
                               "%{y:.3f}<br>step %{customdata}<extra></extra>"),
            ))
    layout = _panel_layout(1, 2)
    for col in (1, 2):
        layout[_axis_name("x", col)]["title"] = {"text": _X_TITLES[x]}
        if x == "step":
            layout[_axis_name("x", col)].update(step_axis(curves["step"]))
        layout[_axis_name("y", col)].update(
            type="log" if log_y else "linear", range=None if log_y else [0, 1.02],
            title={"text": "score (0–1)" if col == 1 else ""})
    annotations = [
        {"text": explore.SPLIT_NAMES[split], "showarrow": False, "xref": "paper",
         "yref": "paper", "x": sum(layout[_axis_name("x", col)]["domain"]) / 2, "y": 1.0,
         "xanchor": "center", "yanchor": "bottom", "font": {"size": 14}}
        for col, split in enumerate(splits, start=1)]
    return go.Figure(data=traces, layout={
        **layout, "annotations": annotations,
        "title": {"text": "Scores over training (colour = one run; marker = its method)"},
        "legend": {"title": {"text": "run (method)"}}, "height": 430,
        "hovermode": "closest", "margin": {"t": 90},
    })


def compare_loss_curves(loss: pd.DataFrame, colors: Mapping[str, str] | None = None,
                        x: str = "step", log_y: bool = True) -> go.Figure:
    """Training loss of every run (input :func:`analysis.explore.loss_curves_frame`)."""
    if x not in _X_TITLES:
        raise ValueError(f"x must be 'step' or 'time_s', got {x!r}")
    stats.require_columns(loss, explore.LOSS_COLUMNS, "loss DataFrame")
    if loss.empty:
        return _empty("Training loss", "No training steps logged in the chosen runs.")
    fig = go.Figure()
    for run in pd.unique(loss["run"]):
        line = loss[loss["run"] == run].sort_values("step")
        method = str(line["method"].iloc[0])
        fig.add_trace(go.Scatter(
            x=line[x].to_numpy(float), y=line["loss"].to_numpy(np.float32),
            # a line needs two points: a run with one logged step shows it as a dot
            mode="lines" if len(line) > 1 else "markers",
            name=f"{run} ({method})", line={"color": _color(colors, run), "width": 1.5},
            customdata=line["step"].to_numpy(),
            hovertemplate=(f"<b>{html.escape(str(run))}</b> ({html.escape(method)})<br>"
                           "loss %{y:.4f}<br>step %{customdata}<extra></extra>"),
        ))
    fig.update_layout(
        title="Training loss", xaxis_title=_X_TITLES[x],
        yaxis={"title": "loss (log scale)" if log_y else "loss",
               "type": "log" if log_y else "linear"},
        legend_title_text="run (method)", height=380,
    )
    if x == "step":
        fig.update_xaxes(**step_axis(loss["step"]))
    return fig


def cells_heatmap(cells: pd.DataFrame, value: str = "score") -> go.Figure:
    """Runs (rows) x the 2x2 cells (columns): the score at each run's last step, or its change
    since the base model. Each cell is written out; columns are named in plain words.

    Input: :func:`analysis.explore.cells_long`.
    """
    if value not in ("score", "change"):
        raise ValueError(f"value must be 'score' or 'change', got {value!r}")
    stats.require_columns(cells, explore.CELLS_LONG_COLUMNS, "cells DataFrame")
    title = ("2×2 generalisation: score at each run's last step" if value == "score" else
             "2×2 generalisation: change since the base model (step 0)")
    if cells.empty:
        return _empty(title, "No chosen run scored the 2×2 cells.")
    wide = explore.cells_wide(cells, value)
    scores = explore.cells_wide(cells, "score")
    change = explore.cells_wide(cells, "change")
    z = wide[list(stats.CELLS)].to_numpy(float)
    text = np.empty(z.shape, dtype=object)
    for i in range(z.shape[0]):
        for j, cell in enumerate(stats.CELLS):
            s, c = scores[cell].iloc[i], change[cell].iloc[i]
            text[i, j] = ("–" if np.isnan(s) else f"{s:.2f}") + (
                "" if np.isnan(c) else f"<br>({c:+.2f})")
    labels = [explore.CELL_MEANINGS[c][0].replace(", ", ",<br>") + f"<br>({c})"
              for c in stats.CELLS]
    rows = [f"{r} ({m})" for r, m in zip(wide["run"], wide["method"])]
    if value == "score":
        scale = {"colorscale": "Blues", "zmin": 0.0, "zmax": 1.0}
    else:
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        scale = {"colorscale": "RdBu", "zmin": -max(bound, 1e-3), "zmax": max(bound, 1e-3)}
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=labels, y=rows, text=text, texttemplate="%{text}",
        textfont={"size": 13},
        hovertemplate="%{y}<br>%{x}<br>%{text}<extra></extra>",
        colorbar={"title": {"text": value}}, **scale,
    ))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(side="top", tickangle=0)
    fig.update_layout(title=title + "<br><sup>each box: score (change since step 0)</sup>",
                      height=max(300, 190 + 52 * len(rows)), margin={"t": 150})
    return fig


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def layer_step_heatmap(matrix: pd.DataFrame, value: str, zrange: tuple[float, float],
                       step: int | None = None, title: str | None = None) -> go.Figure:
    """Layers (rows, model order, top = first) x logged steps (columns) of one run.

    Input: :func:`analysis.explore.layer_step_matrix` of one run. ``zrange`` is the colour
    range (fitted to the data, or 0–1); a vertical line marks ``step``.
    """
    stats.require_columns(matrix, ("run", "name", "order", "step", value), "layer matrix")
    runs = list(pd.unique(matrix["run"]))
    label = explore.MATRIX_VALUES.get(value, value)
    title = title or f"{label} per layer and step"
    if matrix.empty or matrix[value].isna().all():
        method = str(matrix["method"].iloc[0]) if len(matrix) else ""
        reason = (f"{method} keeps no per-weight mask" if value.startswith("mask") and method
                  else "nothing logged for this run")
        return _empty(title, reason)
    if len(runs) != 1:
        raise ValueError(f"layer_step_heatmap shows one run; got {runs}")
    names = (matrix.drop_duplicates("name").sort_values("order")["name"].tolist())
    steps = np.sort(pd.unique(matrix["step"]))
    z = matrix.pivot(index="name", columns="step", values=value).reindex(index=names,
                                                                         columns=steps)
    percent = value in ("mask_density", "frac_ft_gt_pre")
    fmt = ".1%" if percent else ".4f"
    fig = go.Figure(go.Heatmap(
        x=steps, y=names, z=z.to_numpy(np.float32), zmin=zrange[0], zmax=zrange[1],
        colorscale="Viridis",
        colorbar={"title": {"text": "value"}, "tickformat": ".1%" if percent else None},
        hovertemplate=f"%{{y}}<br>step %{{x}}<br>{html.escape(label)}: %{{z:{fmt}}}"
                      "<extra></extra>",
    ))
    if step is not None:
        fig.layout.shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": step,
                              "x1": step, "y0": 0, "y1": 1,
                              "line": {"color": "white", "width": 2, "dash": "dot"}}]
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_xaxes(**step_axis(steps))
    finite = z.to_numpy(float)
    finite = finite[np.isfinite(finite)]
    note = f"colour range {zrange[0]:.3g} – {zrange[1]:.3g}"
    if finite.size and finite.max() - finite.min() < 1e-9:
        note = f"every value is {finite.max():.3g}"
        fig.data[0].colorbar.tickvals = [float(finite.max())]  # one value, one tick
    fig.update_layout(
        title=title + f"<br><sup>{note}</sup>",
        xaxis_title="training step", height=max(300, 140 + 30 * len(names)),
        margin={"l": 10, "t": 80},
    )
    return fig


_BAR_AXES = {
    "discrepancy_mean": "mean G − I",
    "frac_ft_gt_pre": "share with G > I",
    "correlation": "correlation of I and G",
    "update_rel_norm": "‖Δ‖ / ‖θ0‖",
    "mask_density": "share free to move",
}


def layer_bars(table: pd.DataFrame, values: Sequence[str], titles: Sequence[str] | None = None,
               yrange: Mapping[str, tuple[float, float]] | None = None) -> go.Figure:
    """One panel per value, stacked: a horizontal bar per layer (model order, top = first, as
    in the heatmap), coloured by component.

    Input: :func:`analysis.explore.layer_table` of one run at one step. ``yrange`` fixes a
    value's axis (e.g. the same for two runs side by side).
    """
    stats.require_columns(table, ("run", "step", "component", "name", *values), "layer table")
    titles = list(titles or [_BAR_AXES.get(v, v) for v in values])
    if table.empty:
        return _empty(", ".join(titles), "No layer statistics at this step.")
    names = table["name"].tolist()
    panel = 40 + 24 * len(names)  # pixels of one panel's plotting area
    height = 110 + (panel + 95) * len(values)
    layout = _panel_layout(len(values), 1, gap_y=95 / height)
    traces, annotations, shapes = [], [], []
    shown: set[str] = set()
    for row, value in enumerate(values, start=1):
        xa, ya = _ref("x", row), _ref("y", row)
        x = table[value].to_numpy(float)
        title, _, subtitle = titles[row - 1].partition("<br>")  # subtitle: caller's markup
        annotations.append({"text": f"<b>{html.escape(title)}</b>"
                                    + (f"<br>{subtitle}" if subtitle else ""),
                            "showarrow": False, "xref": f"{xa} domain", "yref": f"{ya} domain",
                            "x": 0, "y": 1.0, "xanchor": "left", "yanchor": "bottom",
                            "font": {"size": 13}})
        if np.isnan(x).all():
            annotations.append({"text": "not recorded by this method", "showarrow": False,
                                "xref": f"{xa} domain", "yref": f"{ya} domain",
                                "x": 0.5, "y": 0.5})
        for component in pd.unique(table["component"]):
            part = table[table["component"] == component]
            label = explore.component_name(component)
            traces.append(go.Bar(
                y=part["name"], x=part[value].to_numpy(float), orientation="h", name=label,
                xaxis=xa, yaxis=ya, legendgroup=label, showlegend=label not in shown,
                marker_color=COMPONENT_COLORS.get(component, "#333333"),
                customdata=part["numel"].to_numpy(float),
                hovertemplate=(f"%{{y}}<br>{html.escape(_BAR_AXES.get(value, value))}: "
                               "%{x:.4g}<br>%{customdata:,.0f} weights<extra></extra>"),
            ))
            shown.add(label)
        if value in ("discrepancy_mean", "correlation"):
            shapes.append({"type": "line", "xref": xa, "yref": f"{ya} domain", "x0": 0, "x1": 0,
                           "y0": 0, "y1": 1, "line": {"color": "black", "width": 1}})
        xaxis = layout[_axis_name("x", row)]
        if yrange and value in yrange:
            xaxis["range"] = list(yrange[value])
        if value in ("frac_ft_gt_pre", "mask_density"):
            xaxis["tickformat"] = ".0%"
        layout[_axis_name("y", row)].update(type="category", categoryorder="array",
                                            categoryarray=names[::-1])
    return go.Figure(data=traces, layout={
        **layout, "annotations": annotations, "shapes": shapes, "height": height,
        "bargap": 0.25, "legend": {"orientation": "h", "y": -40 / height, "yanchor": "top",
                                   "x": 0},
        "margin": {"t": 60, "l": 10, "r": 10, "b": 70},
    })
