"""Heatmaps of runs: layers x logged steps of one statistic, and runs x the 2x2 generalisation
cells.

A statistic's colour scale follows :mod:`spider.statistics`: sequential (Viridis) for shares
and sizes, diverging (blue–white–red, white at 0) for signed values; the range is chosen by
:func:`heatmap_range` and said in words by :func:`range_words`.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis import explore, stats
from analysis.figures.style import _empty, step_axis
from spider import statistics

HEATMAP_SCALES = ("absolute", "shared", "fitted")
"""Colour ranges of a layer x step heatmap (:func:`heatmap_range`)."""


def heatmap_range(value: str, values, scale: str = "absolute",
                  method: str | None = None) -> tuple[float, float]:
    """The colour range of statistic ``value`` over ``values``.

    ``absolute``: the statistic's whole range where it has one (shares: 0–1, so 50 % and
    56 % look nearly alike, as they are), else from 0 to the largest value. ``shared`` /
    ``fitted``: from the smallest to the largest of ``values`` (the caller passes every
    run's values for shared, one run's for fitted). A signed statistic (diverging colour
    scale, e.g. mean G − I) is always centred on 0: ±max|x|. ``method``: the run's, where a
    method fills the statistic on another scale (:func:`spider.statistics.value_range`).
    """
    if scale not in HEATMAP_SCALES:
        raise ValueError(f"scale must be one of {HEATMAP_SCALES}, got {scale!r}")
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    diverging = statistics.colorscale(value) == "diverging"
    known = statistics.value_range(value, method)
    if diverging:
        bound = float(np.abs(x).max()) if x.size else 1.0
        if scale == "absolute" and known is not None:
            bound = max(abs(known[0]), abs(known[1]))
        bound = bound if bound > 0 else 1e-3
        return -bound, bound
    if scale == "absolute":
        if known is not None:
            return float(known[0]), float(known[1])
        high = float(x.max()) if x.size else 1.0
        return 0.0, high if high > 0 else 1.0
    return explore.fitted_range(x)


def range_words(value: str, zrange: tuple[float, float], scale: str,
                method: str | None = None) -> str:
    """The colour range in words, for beside the chart: what the darkest and brightest
    colours stand for, and a warning where a fitted range magnifies small differences."""
    lo, hi = (statistics.format_value(value, v, method) for v in zrange)
    if statistics.colorscale(value) == "diverging":
        text = f"Blue {lo} · white 0 · red {hi}"
    else:
        text = f"Dark purple {lo} → yellow {hi}"
    known = statistics.value_range(value, method)
    if scale == "absolute":
        return text + (" (the whole possible range)." if known else
                       " (0 to the largest value).")
    words = "the values of the runs shown" if scale == "shared" else "this run's values"
    warn = ""
    if known and (zrange[1] - zrange[0]) < 0.5 * (known[1] - known[0]):
        warn = (f" — only part of the possible {statistics.format_value(value, known[0], method)}"
                f"–{statistics.format_value(value, known[1], method)}: small differences look "
                "large")
    return text + f", fitted to {words}{warn}."


def _reports(value: str, method: str) -> bool:
    """Whether ``method`` records ``value`` (the vocabulary says; unknown names: True)."""
    try:
        return statistics.reported_by(value, method)
    except (KeyError, ValueError):
        return True


FROZEN_COLOR = "#c8c8c8"
"""The grey of a frozen layer's cells: not trained in the run, so no statistic to show."""


def layer_step_heatmap(matrix: pd.DataFrame, value: str, zrange: tuple[float, float],
                       step: int | None = None, title: str | None = None,
                       train: str | None = None) -> go.Figure:
    """Layers (rows, model order, top = first) x logged steps (columns) of one run.

    Input: :func:`analysis.explore.layer_step_matrix` of one run. ``zrange`` is the colour
    range (:func:`heatmap_range`); a vertical line marks ``step``. The colour scale follows
    the statistic (:func:`spider.statistics.colorscale`): sequential (Viridis) for shares
    and sizes, diverging (blue–white–red, white at 0) for signed values. Rows the matrix
    marks ``frozen`` (layers the run did not train, ``layer_step_matrix(..., frozen=)``) are
    grey cells whose hover says so, citing ``train`` (the run's ``--train`` setting).
    """
    stats.require_columns(matrix, ("run", "name", "order", "step", value), "layer matrix")
    runs = list(pd.unique(matrix["run"]))
    label = statistics.label(value)
    title = title or f"{label} per layer and step"
    frozen_rows = (set(matrix.loc[matrix["frozen"].astype(bool), "name"])
                   if "frozen" in matrix.columns and len(matrix) else set())
    method_name = str(matrix["method"].iloc[0]) if "method" in matrix and len(matrix) else None
    if matrix.empty or (matrix[value].isna().all() and not frozen_rows):
        method = str(matrix["method"].iloc[0]) if len(matrix) else ""
        reason = "nothing logged for this run"
        if method and not _reports(value, method):
            reason = f"{method} does not record {label}"
        elif method and len(matrix):  # e.g. a run logged before the statistic existed
            reason = f"not logged in this run ({label})"
        return _empty(title, reason)
    if len(runs) != 1:
        raise ValueError(f"layer_step_heatmap shows one run; got {runs}")
    names = (matrix.drop_duplicates("name").sort_values("order")["name"].tolist())
    steps = np.sort(pd.unique(matrix["step"]))
    z = matrix.pivot(index="name", columns="step", values=value).reindex(index=names,
                                                                         columns=steps)
    percent = statistics.is_percent(value, method_name)
    fmt = statistics.fmt(value, method_name)
    diverging = statistics.colorscale(value) == "diverging"
    zmin, zmax = zrange
    if diverging:  # white is 0, whatever range was asked for
        bound = max(abs(zmin), abs(zmax)) or 1e-3
        zmin, zmax = -bound, bound
    fig = go.Figure(go.Heatmap(
        x=steps, y=names, z=z.to_numpy(np.float32), zmin=zmin, zmax=zmax,
        colorscale="RdBu_r" if diverging else "Viridis",
        colorbar={"title": {"text": "value"}, "tickformat": fmt if percent else None},
        hovertemplate=f"%{{y}}<br>step %{{x}}<br>{html.escape(label)}: %{{z:{fmt}}}"
                      "<extra></extra>",
    ))
    if frozen_rows:  # a grey cell per step of each frozen layer, over the (NaN) values
        why = html.escape(f"frozen: not trained in this run ({train or 'its --train setting'})")
        grey = np.where(np.isin(np.asarray(names), list(frozen_rows))[:, None],
                        np.ones(z.shape, np.float32), np.nan)
        fig.add_trace(go.Heatmap(
            x=steps, y=names, z=grey, zmin=0, zmax=1, showscale=False, name="frozen",
            colorscale=[[0, FROZEN_COLOR], [1, FROZEN_COLOR]],
            hovertemplate=f"%{{y}}<br>step %{{x}}<br>{why}<extra></extra>"))
    if step is not None:
        fig.layout.shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": step,
                              "x1": step, "y0": 0, "y1": 1,
                              "line": {"color": "black" if diverging else "white",
                                       "width": 2, "dash": "dot"}}]
    fig.update_yaxes(type="category", autorange="reversed")
    # a heatmap is often half a page wide: fewer, upright step labels
    axis = step_axis(steps) if len(steps) <= 6 else {"tickformat": ",d", "nticks": 6}
    fig.update_xaxes(**axis, tickangle=0)
    finite = z.to_numpy(float)
    finite = finite[np.isfinite(finite)]
    note = (f"colour range {statistics.format_value(value, zmin, method_name)} – "
            f"{statistics.format_value(value, zmax, method_name)}")
    if finite.size and finite.max() - finite.min() < 1e-9:
        note = ("every value is "
                f"{statistics.format_value(value, float(finite.max()), method_name)}")
        fig.data[0].colorbar.tickvals = [float(finite.max())]  # one value, one tick
    fig.update_layout(
        title=title + f"<br><sup>{note}</sup>",
        xaxis_title="training step", height=max(300, 140 + 30 * len(names)),
        margin={"l": 10, "t": 80},
    )
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
