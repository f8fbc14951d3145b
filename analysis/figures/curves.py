"""Curves over training: every run's upstream and downstream score, and its training loss.

Colour = run, marker = method (:mod:`analysis.figures.style`); the x axis is the step or the
training time.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis import explore, stats
from analysis.figures.style import (
    _X_TITLES,
    _axis_name,
    _color,
    _empty,
    _panel_layout,
    _ref,
    log_axis,
    method_symbol,
    step_axis,
)


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
            **(log_axis(curves["score"]) if log_y else {"type": "linear", "range": [0, 1.02]}),
            title={"text": "score (0–1, log scale)" if log_y else "score (0–1)"}
            if col == 1 else {"text": ""})
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
               **(log_axis(loss["loss"]) if log_y else {"type": "linear"})},
        legend_title_text="run (method)", height=380,
    )
    if x == "step":
        fig.update_xaxes(**step_axis(loss["step"]))
    return fig
