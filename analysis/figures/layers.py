"""Bars per layer at one step: one panel per statistic, a bar per layer coloured by component."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis import explore, stats
from analysis.figures.style import (
    COMPONENT_COLORS,
    COMPONENT_OUTLINE,
    _axis_name,
    _empty,
    _panel_layout,
    _ref,
)
from spider import statistics


def layer_bars(table: pd.DataFrame, values: Sequence[str], titles: Sequence[str] | None = None,
               yrange: Mapping[str, tuple[float, float]] | None = None) -> go.Figure:
    """One panel per value, stacked: a horizontal bar per layer (model order, top = first, as
    in the heatmap), coloured by component.

    Input: :func:`analysis.explore.layer_table` of one run at one step. ``yrange`` fixes a
    value's axis (e.g. the same for two runs side by side).
    """
    stats.require_columns(table, ("run", "step", "component", "name", *values), "layer table")
    titles = list(titles or [statistics.label(v) for v in values])
    # the run's method, where a method fills a statistic on its own scale (Dowser's score)
    method = str(table["method"].iloc[0]) if "method" in table and len(table) else None
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
                marker={"color": COMPONENT_COLORS.get(component, "#333333"),
                        "line": {"color": COMPONENT_OUTLINE, "width": 0.6}},
                customdata=part["numel"].to_numpy(float),
                hovertemplate=(f"%{{y}}<br>{html.escape(statistics.label(value))}: "
                               f"%{{x:{statistics.fmt(value, method)}}}<br>"
                               "%{customdata:,.0f} weights"
                               "<extra></extra>"),
            ))
            shown.add(label)
        if statistics.colorscale(value) == "diverging":  # signed: a line at 0
            shapes.append({"type": "line", "xref": xa, "yref": f"{ya} domain", "x0": 0, "x1": 0,
                           "y0": 0, "y1": 1, "line": {"color": "black", "width": 1}})
        xaxis = layout[_axis_name("x", row)]
        if yrange and value in yrange:
            xaxis["range"] = list(yrange[value])
        if statistics.is_percent(value, method):
            xaxis["tickformat"] = ".0%"
        layout[_axis_name("y", row)].update(type="category", categoryorder="array",
                                            categoryarray=names[::-1])
    return go.Figure(data=traces, layout={
        **layout, "annotations": annotations, "shapes": shapes, "height": height,
        "bargap": 0.25, "legend": {"orientation": "h", "y": -40 / height, "yanchor": "top",
                                   "x": 0},
        "margin": {"t": 60, "l": 10, "r": 10, "b": 70},
    })
