"""What every figure shares, so that panels can be compared by eye: colours, symbols, axes,
the JSON budget.

* a **run** has a colour of its own (:func:`run_colors`), so several runs of one method can be
  told apart; the **method** is shown by the marker symbol (:func:`method_symbol`); where no
  run colours are given, a method has one colour everywhere (:func:`method_color`); a model
  component likewise (:data:`COMPONENT_COLORS`, light tints that no run or method uses);
* axes say what they measure and in which unit; steps are whole numbers (:func:`step_axis`);
  log axes are labelled with numbers (:func:`log_axis`);
* large data are pooled or binned before drawing: every figure's JSON stays under
  :data:`MAX_FIGURE_BYTES` (check with :func:`figure_json_size`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

MAX_FIGURE_BYTES = 2_000_000
"""What one figure may weigh as JSON when sent to a browser."""


# Components are light tints (bars with a dark outline), runs and methods saturated colours:
# a colour never means both a component and a run. (Components had category10's blue, orange
# and green, the first run colours too: orange was the projector on Layers and full
# fine-tuning on Compare.) tests/analysis/test_figures.py keeps components pale (CIELAB L* at
# least 80), run and method colours darker (L* at most 75), and every pair far apart.
COMPONENT_COLORS = {  # every component of spider.naming.COMPONENTS
    "vision": "#b3cde3", "projector": "#fddaec", "llm": "#ccebc5", "other": "#e5d8bd",
}
COMPONENT_OUTLINE = "#555555"
"""The outline of a component's bar: light tints need one to read on white."""


_METHOD_COLORS = {
    "spider": "#d62728", "full": "#1f77b4", "magnitude_mask": "#9467bd", "random_mask": "#8c564b",
    "l2": "#e377c2", "dare": "#bcbd22", "wise_ft": "#17becf", "tailor": "#ff7f0e",
    "hft": "#2ca02c", "lora": "#7f7f7f",
}


# Distinct, saturated colours that read on white: category10 first (the first ten runs are
# always told apart), then further dark ones.
# Grey is left out: it reads as "disabled".
RUN_PALETTE = tuple(c for c in dict.fromkeys([*qualitative.D3, *qualitative.Dark24])
                    if c.lower() not in ("#7f7f7f", "#778aae", "#b68e00"))


_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "x", "star", "cross",
            "triangle-down", "pentagon", "hexagon")


_METHOD_ORDER = ("spider", "full", "magnitude_mask", "random_mask", "l2", "dare", "wise_ft",
                 "tailor", "hft", "lora")


def method_color(method: str) -> str:
    """The colour of ``method`` in every figure (known methods fixed, others by name hash)."""
    if method in _METHOD_COLORS:
        return _METHOD_COLORS[method]
    palette = qualitative.Dark24
    return palette[zlib.crc32(str(method).encode()) % len(palette)]


def figure_json_size(fig: go.Figure) -> int:
    """Bytes of the figure's JSON (what ``st.plotly_chart`` sends to the browser)."""
    return len(fig.to_json().encode("utf-8"))


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
    """Axis settings for training steps: whole numbers only, never crowded. A dozen logged
    steps or fewer are ticked each (at the steps themselves, not at every integer between);
    more get plotly's own spacing, whole numbers only (left to itself, plotly puts a tick at
    every half step when only a few steps are shown)."""
    values = np.asarray(steps, dtype=float)
    values = np.unique(values[np.isfinite(values)])
    if not values.size:
        return {"tickformat": ",d"}
    if values.size <= 12:
        return {"tickmode": "array", "tickvals": [float(v) for v in values],
                "ticktext": [f"{int(v):,d}" for v in values]}
    return {"tickformat": ",d", "nticks": 10}


def log_axis(values) -> dict:
    """Axis settings for a log scale whose ticks read as numbers: 1, 2 and 5 times powers of
    ten within the data (finer within one decade, every power of ten only over more than
    three), each written out ("0.2", "3", "1000"). Left to itself, plotly labels the ticks inside a decade by their
    leading digit alone, so that a short range reads "4 3 2 0.1 9 8 7"."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return {"type": "log"}
    low, high = float(v.min()), float(v.max())
    first, last = int(np.floor(np.log10(low))), int(np.ceil(np.log10(high)))
    decades = np.log10(high) - np.log10(low)
    mantissas = ((1,) if decades > 3 else (1, 2, 5) if decades > 1
                 else (1, 2, 3, 4, 5, 6, 8))
    ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in mantissas]
    inside = [t for t in ticks if low / 1.0001 <= t <= high * 1.0001]
    if len(inside) < 2:  # a narrow range: the nearest ticks on either side as well
        below = [t for t in ticks if t < low] or [low]
        above = [t for t in ticks if t > high] or [high]
        inside = [below[-1], *inside, above[0]]
    span = np.log10(max(inside[-1], high)) - np.log10(min(inside[0], low))
    pad = 0.04 * (span or 1.0)
    return {"type": "log", "tickmode": "array", "tickvals": inside,
            "ticktext": [f"{t:g}" for t in inside],
            "range": [float(np.log10(min(inside[0], low)) - pad),
                      float(np.log10(max(inside[-1], high)) + pad)]}


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
