"""Figures of the Learn page's worked example (pure functions, no I/O).

Small matrices are drawn cell by cell with their values printed in the cells, so that a
class can read off one weight's I, G and w; the colour scales are the ones
:mod:`analysis.figures` uses for big tensors (importances Viridis on [0, 1], masks Blues on
[0, 1], weights and updates red-blue around 0), so what is learnt here reads the same on the
Parameters page.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.figures.style import method_color

STYLES = {  # colour scale, fixed range (None: symmetric about 0 over the group), text format
    "importance": ("Viridis", (0.0, 1.0), ".2f"),
    "mask": ("Blues", (0.0, 1.0), ".2f"),
    "signed": ("RdBu_r", None, ".2f"),
}


@dataclasses.dataclass(frozen=True)
class Panel:
    """One small matrix: a title, the values (2-D) and a style of :data:`STYLES`. Panels of
    style ``signed`` that share a ``group`` share one colour range."""

    title: str
    values: np.ndarray
    style: str = "signed"
    group: str = ""


def _signed_bounds(panels: Sequence[Panel]) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for p in panels:
        if p.style == "signed":
            top = float(np.nanmax(np.abs(p.values))) if p.values.size else 0.0
            bounds[p.group] = max(bounds.get(p.group, 0.0), top)
    return {g: (b if b > 0 else 1.0) for g, b in bounds.items()}


def _grid_layout(n_rows: int, n_cols: int, titles: Sequence[str], h_gap: float = 0.04,
                 v_gap: float = 0.14) -> dict:
    """A layout dict for an ``n_rows`` x ``n_cols`` grid of panels sharing x and y axes
    (row 0 at the top), with a title over each panel. Built by hand: plotly's
    ``make_subplots`` and per-panel ``update_*axes`` calls cost most of a second, too slow
    for a page that redraws on every slider move."""
    width = (1 - h_gap * (n_cols - 1)) / n_cols
    height = (1 - v_gap * (n_rows - 1)) / n_rows
    layout: dict = {"annotations": []}
    for i in range(n_rows):
        top = 1 - i * (height + v_gap)
        for j in range(n_cols):
            k = i * n_cols + j + 1
            suffix = "" if k == 1 else str(k)
            left = j * (width + h_gap)
            layout[f"xaxis{suffix}"] = {
                "domain": [max(left, 0.0), min(left + width, 1.0)], "anchor": f"y{suffix}", "dtick": 1,
                "showgrid": False, "zeroline": False, "showticklabels": i == n_rows - 1,
                **({} if k == 1 else {"matches": "x"})}
            layout[f"yaxis{suffix}"] = {
                "domain": [max(top - height, 0.0), min(top, 1.0)], "anchor": f"x{suffix}", "dtick": 1,
                "autorange": "reversed", "showgrid": False, "zeroline": False,
                "showticklabels": j == 0, **({} if k == 1 else {"matches": "y"})}
            if titles[k - 1]:
                layout["annotations"].append({
                    "text": titles[k - 1], "x": left + width / 2, "y": top, "xref": "paper",
                    "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                    "showarrow": False, "font": {"size": 14}})
    return layout


def matrix_grid(grid: Sequence[Sequence[Panel | None]], marked: Sequence[tuple[int, int]] = (),
                marked_label: str = "", height_per_row: int = 290) -> go.Figure:
    """Small matrices in a grid of panels with shared axes, values printed in the cells.

    ``grid`` is rows of panels (``None`` leaves a gap). ``marked`` cells (row, col) get an
    outline in every panel, named ``marked_label`` in the legend. Hover gives the panel,
    row, column and value.
    """
    n_rows = len(grid)
    n_cols = max(len(r) for r in grid)
    cells = [list(r) + [None] * (n_cols - len(r)) for r in grid]
    titles = [html.escape(p.title) if p is not None else "" for r in cells for p in r]
    layout = _grid_layout(n_rows, n_cols, titles)
    bounds = _signed_bounds([p for r in cells for p in r if p is not None])
    traces: list[dict] = []
    for i, row in enumerate(cells):
        for j, panel in enumerate(row):
            k = i * n_cols + j + 1
            suffix = "" if k == 1 else str(k)
            if panel is None:
                layout[f"xaxis{suffix}"]["visible"] = False
                layout[f"yaxis{suffix}"]["visible"] = False
                continue
            values = np.asarray(panel.values, dtype=np.float32)
            scale, fixed, fmt = STYLES[panel.style]
            zmin, zmax = fixed if fixed else (-bounds[panel.group], bounds[panel.group])
            traces.append({
                "type": "heatmap", "z": values, "x": list(range(values.shape[1])),
                "y": list(range(values.shape[0])), "colorscale": scale, "zmin": zmin,
                "zmax": zmax, "showscale": False, "texttemplate": f"%{{z:{fmt}}}",
                "textfont": {"size": 11}, "xgap": 1, "ygap": 1, "name": panel.title,
                "hovertemplate": (f"<b>{html.escape(panel.title)}</b><br>row %{{y}}, "
                                  "col %{x}<br>value %{z:.4g}<extra></extra>"),
                "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
            })
            if len(marked):
                rr, cc = zip(*marked)
                traces.append({
                    "type": "scatter", "x": list(cc), "y": list(rr), "mode": "markers",
                    "name": marked_label, "showlegend": not any(
                        t["type"] == "scatter" for t in traces),
                    "marker": {"symbol": "square-open", "size": 26, "color": "#ff7f0e",
                               "line": {"width": 3}},
                    "legendgroup": "marked", "hoverinfo": "skip",
                    "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
                })
    layout.update(
        height=height_per_row * n_rows + 40, margin={"t": 50, "b": 20, "l": 30, "r": 10},
        legend={"orientation": "h", "y": 1.12, "x": 1, "xanchor": "right"},
        plot_bgcolor="white",
    )
    return go.Figure(data=traces, layout=layout)


def example_history(history: pd.DataFrame, current_step: int | None = None) -> go.Figure:
    """New-task loss and the toy's old-task loss per step, SPIDER against plain
    fine-tuning (``history`` has :data:`analysis.worked_example.HISTORY_COLUMNS`): learning
    shows on the left, forgetting on the right.
    """
    titles = ("new task: loss (lower = learnt)",
              "old tasks: loss (higher = forgotten)")
    domains = ([0.0, 0.44], [0.56, 1.0])
    layout: dict = {
        "height": 300, "margin": {"t": 50, "b": 40, "l": 40, "r": 10},
        "legend": {"orientation": "h", "y": -0.3}, "annotations": [], "shapes": [],
    }
    for col, (title, domain) in enumerate(zip(titles, domains), start=1):
        suffix = "" if col == 1 else str(col)
        layout[f"xaxis{suffix}"] = {"domain": domain, "anchor": f"y{suffix}",
                                    "title": {"text": "step"}}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "rangemode": "tozero"}
        layout["annotations"].append({
            "text": title, "x": sum(domain) / 2, "y": 1.0, "xref": "paper", "yref": "paper",
            "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 14}})
        if current_step is not None:
            layout["shapes"].append({
                "type": "line", "x0": current_step, "x1": current_step, "y0": 0, "y1": 1,
                "xref": f"x{suffix}", "yref": f"y{suffix} domain",
                "line": {"dash": "dot", "color": "#999"}})
    names = {"spider": "SPIDER", "full": "plain fine-tuning"}
    traces = []
    for method, frame in history.groupby("method", sort=False):
        name = names.get(method, method)
        for col, value in ((1, "task_loss"), (2, "upstream_loss")):
            suffix = "" if col == 1 else str(col)
            traces.append({
                "type": "scatter", "x": frame["step"].to_numpy(),
                "y": frame[value].to_numpy(), "mode": "lines+markers", "name": name,
                "legendgroup": method, "showlegend": col == 1,
                "line": {"color": method_color(method)}, "marker": {"size": 5},
                "hovertemplate": f"{name}<br>step %{{x}}: %{{y:.3f}}<extra></extra>",
                "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
            })
    return go.Figure(data=traces, layout=layout)


def tie_scatter(importance_pre: np.ndarray, importance_ft: np.ndarray, mask: np.ndarray,
                marked: Sequence[tuple[int, int]] = ()) -> go.Figure:
    """Every entry's keep-weight w against G − I: w is 0 left of the tie (G ≤ I) and jumps
    to about 1 right of it. ``marked`` entries (row, col) are outlined."""
    gap = (importance_ft.astype(np.float64) - importance_pre.astype(np.float64))
    cols = mask.shape[1]
    idx = np.arange(mask.size)
    traces = [{
        "type": "scatter", "x": gap.ravel(), "y": mask.ravel(), "mode": "markers",
        "name": "one weight",
        "marker": {"size": 9, "color": mask.ravel(), "colorscale": "Blues", "cmin": 0,
                   "cmax": 1, "line": {"width": 1, "color": "#333"}},
        "customdata": np.column_stack([idx // cols, idx % cols]),
        "hovertemplate": "row %{customdata[0]}, col %{customdata[1]}<br>G − I = %{x:.4g}"
                         "<br>w = %{y:.3f}<extra></extra>",
    }]
    if len(marked):
        rr, cc = (np.array(v) for v in zip(*marked))
        traces.append({
            "type": "scatter", "x": gap[rr, cc], "y": mask[rr, cc], "mode": "markers",
            "name": "closest to the tie", "hoverinfo": "skip",
            "marker": {"symbol": "square-open", "size": 16, "color": "#ff7f0e",
                       "line": {"width": 3}},
        })
    layout = {
        "height": 300, "margin": {"t": 30, "b": 40, "l": 50, "r": 10}, "showlegend": False,
        "xaxis": {"title": {"text": "G − I (left: pre-training matters more; right: the "
                                    "task does)"}},
        "yaxis": {"title": {"text": "keep-weight w"}, "range": [-0.08, 1.08]},
        "shapes": [{"type": "line", "x0": 0, "x1": 0, "y0": 0, "y1": 1, "xref": "x",
                    "yref": "paper", "line": {"dash": "dash", "color": "#d62728"}}],
        "annotations": [{"text": "tie: I = G", "x": 0, "y": 1, "xref": "x", "yref": "paper",
                         "yanchor": "bottom", "showarrow": False,
                         "font": {"color": "#d62728"}}],
    }
    return go.Figure(data=traces, layout=layout)
