"""The trade-off plane: upstream score U kept against downstream score D learned, with lines of
equal harmonic mean H."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis import stats
from analysis.figures.style import method_color
from spider.metrics import harmonic_mean

ISO_H_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


_RUN_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "cross")


def iso_h_curve(h: float, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Points (U, D) in [0, 1]² with harmonic mean 2UD/(U + D) = ``h``.

    Solving for D: D = hU / (2U − h), defined for U > h/2; D ≤ 1 needs U ≥ h / (2 − h).
    """
    u = np.linspace(h / (2.0 - h), 1.0, points)
    return u, h * u / (2.0 * u - h)


_LABEL_SPOTS = (  # where a run's name may sit around its final marker, in order of preference
    ("top center", 0.0, 1.0), ("bottom center", 0.0, -1.0), ("middle right", 1.0, 0.0),
    ("middle left", -1.0, 0.0), ("top right", 1.0, 1.0), ("top left", -1.0, 1.0),
    ("bottom right", 1.0, -1.0), ("bottom left", -1.0, -1.0),
)


def _data_range(values: np.ndarray, low: float = 0.0, high: float = 1.02,
                margin: float = 0.08, least: float = 0.1) -> list[float]:
    """An axis range around ``values`` with a margin on each side, at least ``least`` wide,
    kept within [low, high]."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return [low, high]
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < least:
        centre = (lo + hi) / 2
        lo, hi = centre - least / 2, centre + least / 2
    pad = margin * (hi - lo)
    return [max(low, lo - pad), min(high, hi + pad)]


def place_labels(points: Sequence[tuple[float, float]], texts: Sequence[str],
                 xrange: Sequence[float], yrange: Sequence[float], size: tuple[int, int] = (720, 470),
                 marker_px: float = 16.0) -> list[str | None]:
    """A text position (plotly ``textposition``) per point such that no two labels, and no
    label and marker, overlap on a plot area of ``size`` pixels; None where every spot is
    taken (the legend names that run). Greedy, in the order given: a label is about 7 px a
    character wide and 14 px high."""
    width, height = size
    sx = width / max(xrange[1] - xrange[0], 1e-12)
    sy = height / max(yrange[1] - yrange[0], 1e-12)
    pixels = [((x - xrange[0]) * sx, (y - yrange[0]) * sy) for x, y in points]
    half = marker_px / 2
    taken = [(px - half, py - half, px + half, py + half) for px, py in pixels]
    out: list[str | None] = []
    for (px, py), text in zip(pixels, texts):
        w, h = 7.0 * len(text) + 4, 14.0
        chosen = None
        for name, dx, dy in _LABEL_SPOTS:
            cx = px + dx * (half + 2 + w / 2)
            cy = py + dy * (half + 2 + h / 2)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            inside = box[0] >= 0 and box[2] <= width and box[1] >= 0 and box[3] <= height
            if inside and not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3]
                                  and t[1] < box[3] for t in taken):
                chosen = name
                taken.append(box)
                break
        out.append(chosen)
    return out


def tradeoff_plane(data: pd.DataFrame, h_levels: Sequence[float] = ISO_H_LEVELS,
                   colors: Mapping[str, str] | None = None,
                   symbols: Mapping[str, str] | None = None) -> go.Figure:
    """Upstream U (x) against downstream D (y): where each run ends, and how it got there.

    ``data`` is a metrics frame (each run's path over its evaluated steps, final step
    marked) or a summary frame with U and D columns (final points only). Grey dotted lines
    join points of equal H = 2UD/(U + D), the SPIDER paper's balance score: moving across
    them is a real gain, moving along them is a trade. ``colors`` / ``symbols`` map a run to
    its colour and marker symbol (default: the method's colour, markers told apart by run).

    The axes zoom to the points with a margin (runs that all keep U above 0.6 are not
    crowded into a corner of the unit square). Final markers shrink a little from run to run
    and are outlined, so that one drawn on top of another leaves it visible; each run's name
    sits beside its marker where it overlaps no other (:func:`place_labels`), and the legend
    names every run.
    """
    if {"U", "D"} <= set(data.columns):
        stats.require_columns(data, ("run", "method", "U", "D"), "summary DataFrame")
        path = pd.DataFrame({"run": data["run"], "method": data["method"],
                             "step": data["step"] if "step" in data.columns else np.nan,
                             "U": data["U"], "D": data["D"]}).dropna(subset=["U", "D"])
    else:
        path = stats.score_table(data)
    # zoom to where the runs went: the base model (each run's first point, step 0) is left
    # out of the range when the runs moved away from it, and named at the edge instead
    steps = pd.to_numeric(path["step"], errors="coerce")
    first = steps == steps.groupby(path["run"]).transform("min")
    later = path[~first] if (~first).any() else path
    xrange = _data_range(later["U"].to_numpy(float))
    yrange = _data_range(later["D"].to_numpy(float))
    base = path[first & steps.notna()]
    outside = base[(base["U"] < xrange[0]) | (base["U"] > xrange[1])
                   | (base["D"] < yrange[0]) | (base["D"] > yrange[1])]

    fig = go.Figure()
    for h in h_levels:
        u, d = iso_h_curve(h)
        fig.add_trace(go.Scatter(
            x=u, y=d, mode="lines", name=f"H = {h:g}", meta={"H": h}, showlegend=False,
            line={"color": "rgba(120,120,120,0.6)", "dash": "dot", "width": 1},
            hovertemplate=f"iso-H line: H = {h:g}<extra></extra>",
        ))
        # the label where the line leaves the visible window (right or top edge)
        visible = ((u >= xrange[0]) & (u <= xrange[1]) & (d >= yrange[0]) & (d <= yrange[1]))
        if visible.any():
            at = int(np.flatnonzero(visible)[-1])
            fig.add_annotation(x=float(u[at]), y=float(d[at]), text=f"H={h:g}", showarrow=False,
                               xanchor="right", yanchor="bottom",
                               font={"size": 10, "color": "gray"})

    runs = list(pd.unique(path["run"]))
    finals = [(float(path.loc[path["run"] == r, "U"].iloc[-1]),
               float(path.loc[path["run"] == r, "D"].iloc[-1])) for r in runs]
    spots = place_labels(finals, [str(r) for r in runs], xrange, yrange)
    seen_methods: dict[str, int] = {}
    for i, run in enumerate(runs):
        mine = path[path["run"] == run]
        method = str(mine["method"].iloc[0])
        color = (colors or {}).get(run) or method_color(method)
        # runs of one method share its colour; their markers differ (e.g. full vs hybrid)
        symbol = (symbols or {}).get(run) or _RUN_SYMBOLS[seen_methods.get(method, 0)
                                                          % len(_RUN_SYMBOLS)]
        seen_methods[method] = seen_methods.get(method, 0) + 1
        label = f"{html.escape(str(run))} ({html.escape(method)})"
        hover = (f"<b>{label}</b><br>step %{{customdata[0]}}<br>U %{{x:.3f}}, D %{{y:.3f}}"
                 "<br>H %{customdata[1]:.3f}<extra></extra>")
        u, d = mine["U"].to_numpy(float), mine["D"].to_numpy(float)
        h = harmonic_mean(u, d)
        steps = pd.to_numeric(mine["step"], errors="coerce").to_numpy(float)
        custom = np.column_stack([steps, h])
        if len(mine) > 1:
            fig.add_trace(go.Scatter(
                x=u, y=d, mode="lines+markers", name=f"{run} path", legendgroup=str(run),
                showlegend=False, line={"color": color, "width": 1},
                marker={"size": 5, "color": color}, customdata=custom, hovertemplate=hover,
            ))
        spot = spots[i]
        fig.add_trace(go.Scatter(
            x=u[-1:], y=d[-1:], mode="markers+text" if spot else "markers",
            name=str(run), legendgroup=str(run), text=[str(run)] if spot else None,
            textposition=spot, textfont={"color": color, "size": 12},
            # later markers a little smaller: one on top of another leaves a ring of it
            marker={"size": max(10.0, 16 - 1.5 * i), "color": color, "symbol": symbol,
                    "opacity": 0.9, "line": {"color": "white", "width": 1.5}},
            customdata=custom[-1:], hovertemplate=hover, meta={"final": True},
        ))
    if not outside.empty:
        where = "; ".join(sorted({f"U {u:.2f}, D {d:.2f}" for u, d in
                                  zip(outside["U"], outside["D"])}))
        fig.add_annotation(
            text=f"paths start at the base model (step 0: {where}), outside this view",
            xref="paper", yref="paper", x=0, y=1, xanchor="left", yanchor="bottom",
            showarrow=False, font={"size": 11, "color": "gray"})
    fig.update_layout(
        title="Trade-off: upstream ability kept (U) vs downstream task learned (D)",
        xaxis={"title": "upstream score U (higher = less forgetting)", "range": xrange},
        yaxis={"title": "downstream score D", "range": yrange},
        legend_title_text="run (final step)",
        height=560,
    )
    return fig
