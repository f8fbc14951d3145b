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

import re
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


# --------------------------------------------------------------------------------------------
# Presentation mode (issue 25): large text, laid out for the width a projector gives
# --------------------------------------------------------------------------------------------

PRESENTATION_FONT = 16
"""The smallest chart text in presentation mode, in px: what reads from the back of a room."""
PRESENTATION_TITLE_FONT = 20
PRESENTATION_WIDTH = 780
"""The narrowest a chart gets in presentation mode, in CSS px: a 1280 px projector at 150 %
browser zoom is 853 px wide, less the page's margins; side-by-side charts stack there."""
_CHAR_WIDTH = 0.58
"""A character's average advance, in ems, of plotly's default sans-serif (a little over, so
that a line wrapped to fit really fits)."""


def _wrap(text: str, width_px: float, font_px: float) -> str:
    """``text`` with ``<br>`` between words so that no line is wider than ``width_px`` (a
    word longer than a line keeps its own line). Existing ``<br>`` are kept; a ``<sup>`` or
    ``<sub>`` part (plotly draws it at 70 %, under the smallest size) becomes
    :data:`PRESENTATION_FONT` px text."""
    text = re.sub(r"<(sup|sub)>(.*?)</\1>",
                  rf'<span style="font-size:{PRESENTATION_FONT}px">\2</span>', str(text))
    limit = max(8, int(width_px / (_CHAR_WIDTH * font_px)))
    lines: list[str] = []
    for part in str(text).split("<br>"):
        line = ""
        for word in re.findall(r"(?:<[^>]*>|[^ <])+", part):  # a tag is never split
            visible = len(re.sub(r"<[^>]+>", "", line + " " + word))
            if line and visible > limit:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "<br>".join(lines)


PRESENTATION_TEXT_COLOR = "#262730"
"""Chart text in presentation mode: near black (the theme's light grey fades on a projector)."""


def _bigger(font: dict | None, size: int = PRESENTATION_FONT) -> dict:
    """``font`` at least ``size`` px, near black unless it has a colour of its own."""
    font = dict(font or {})
    font["size"] = max(float(font.get("size") or 0), size)
    font.setdefault("color", PRESENTATION_TEXT_COLOR)
    return font


def _domain_width(layout: dict, x: float) -> float:
    """The share of the plot's width of the x axis whose domain holds ``x`` (paper units);
    1 when none does."""
    best = 1.0
    for name, axis in layout.items():
        if re.fullmatch(r"xaxis\d*", name) and isinstance(axis, dict):
            lo, hi = axis.get("domain", [0.0, 1.0])
            if lo - 1e-6 <= x <= hi + 1e-6:
                best = min(best, hi - lo)
    return best


def presentation_layout(fig: go.Figure, width: float = PRESENTATION_WIDTH) -> go.Figure:
    """A copy of ``fig`` for a projector, laid out for a chart ``width`` CSS px wide:

    * every text at least :data:`PRESENTATION_FONT` px (ticks, axis and legend titles,
      legends, annotations, colour bars, text in cells and on markers, contour labels), the
      title at least :data:`PRESENTATION_TITLE_FONT`;
    * titles, panel titles and axis titles wrapped at word breaks to the width they get;
    * margins grown by plotly to hold tick labels, titles, legends and colour bars
      (``automargin``), the legend laid out horizontally under the plot, where it wraps
      instead of running off the right edge;
    * taller by the text that grew, so that panels keep their room.
    """
    data = fig.to_dict()
    layout = data.setdefault("layout", {})
    plot_width = max(width - 120, 200)  # less the margins plotly keeps for labels
    layout["font"] = _bigger(layout.get("font"))
    title = layout.get("title")
    if isinstance(title, str):
        title = {"text": title}
    if title and title.get("text"):
        title["font"] = _bigger(title.get("font"), PRESENTATION_TITLE_FONT)
        title["text"] = _wrap(title["text"], width - 40, PRESENTATION_TITLE_FONT)
        # at the top of the figure, pushing the plot down by its own height: plotly's
        # default place for a title of several lines runs off the top, and even anchored
        # at the top it is placed too high by about half a line per line after the first
        lines = title["text"].count("<br>")
        title.update(automargin=True, yref="container", y=1, yanchor="top",
                     pad={"t": 8 + lines * PRESENTATION_TITLE_FONT * 0.7, "b": 8})
        layout["title"] = title
    axes = [k for k, v in layout.items() if re.fullmatch(r"[xy]axis\d*", k) and isinstance(v, dict)]
    for name in axes:
        axis = layout[name]
        axis["tickfont"] = _bigger(axis.get("tickfont"))
        axis["automargin"] = True
        axis_title = axis.get("title")
        if isinstance(axis_title, str):
            axis_title = {"text": axis_title}
        if axis_title and axis_title.get("text"):
            axis_title["font"] = _bigger(axis_title.get("font"))
            lo, hi = axis.get("domain", [0.0, 1.0])
            along = plot_width if name.startswith("x") else float(layout.get("height") or 450) - 100
            axis_title["text"] = _wrap(axis_title["text"], max(along * (hi - lo), 80),
                                       PRESENTATION_FONT)
            axis["title"] = axis_title
    if not axes:  # a figure without explicit axes still gets the big ticks plotly draws
        for name in ("xaxis", "yaxis"):
            layout[name] = {"tickfont": _bigger(None), "automargin": True}
    above = 0  # lines of annotations over the plot area (panel titles), which plotly's
    # margins do not make room for
    for annotation in layout.get("annotations", []) or []:
        annotation["font"] = _bigger(annotation.get("font"))
        if not annotation.get("text"):
            continue
        xref, yref = annotation.get("xref", "x"), annotation.get("yref", "y")
        if xref == "paper":
            share = _domain_width(layout, float(annotation.get("x", 0.5) or 0.0))
        elif xref.endswith(" domain"):  # placed in one panel: as wide as the panel
            lo, hi = (layout.get(_axis_name("x", int(xref[1:-7] or 1))) or {}).get(
                "domain", [0.0, 1.0])
            share = hi - lo
        else:  # placed at a data point: wrapped to a third of the plot
            share = 1 / 3
        annotation["text"] = _wrap(annotation["text"], max(plot_width * share, 80),
                                   PRESENTATION_FONT)
        y = float(annotation.get("y") or 0)
        if yref.endswith(" domain"):
            lo, hi = (layout.get(_axis_name("y", int(yref[1:-7] or 1))) or {}).get(
                "domain", [0.0, 1.0])
            y = lo + y * (hi - lo)
        if (yref == "paper" or yref.endswith(" domain")) and y >= 0.99 and annotation.get(
                "yanchor", "auto") in ("bottom", "auto"):
            above = max(above, annotation["text"].count("<br>") + 1)
    legend = dict(layout.get("legend") or {})
    legend["font"] = _bigger(legend.get("font"))
    if isinstance(legend.get("title"), dict) and legend["title"].get("text"):
        legend["title"]["font"] = _bigger(legend["title"].get("font"))
    # under the plot, at the bottom of the whole figure (clear of the x axes' titles), and
    # as wide as the figure, so entries wrap instead of leaving it
    legend.update(orientation="h", x=0, xanchor="left", xref="container",
                  y=0, yanchor="bottom", yref="container")
    legend.pop("entrywidth", None)
    layout["legend"] = legend
    layout["hoverlabel"] = {**(layout.get("hoverlabel") or {}),
                            "font": _bigger((layout.get("hoverlabel") or {}).get("font"))}
    for name, value in layout.items():  # coloraxis colour bars
        if re.fullmatch(r"coloraxis\d*", name) and isinstance(value, dict):
            value["colorbar"] = _presentation_colorbar(value.get("colorbar"))
    legend_shown = False
    for trace in data.get("data", []):
        for part in ("textfont", "insidetextfont", "outsidetextfont"):
            if part in trace or (part == "textfont" and (trace.get("text") is not None
                                                           or trace.get("texttemplate"))):
                trace[part] = _bigger(trace.get(part))
        if "colorbar" in trace or trace.get("showscale", trace.get("type") in (
                "heatmap", "contour", "histogram2d")) is True:
            trace["colorbar"] = _presentation_colorbar(trace.get("colorbar"))
        marker = trace.get("marker")
        if isinstance(marker, dict) and "colorbar" in marker:
            marker["colorbar"] = _presentation_colorbar(marker["colorbar"])
        contours = trace.get("contours")
        if isinstance(contours, dict) and contours.get("showlabels"):
            contours["labelfont"] = _bigger(contours.get("labelfont"))
        if trace.get("showlegend", True) is not False and trace.get("name"):
            legend_shown = True
    margin = dict(layout.get("margin") or {})
    margin["autoexpand"] = True
    title_lines = title["text"].count("<br>") + 1 if title and title.get("text") else 0
    line = 1.3  # a line of text is about 1.3 font sizes high
    margin["t"] = max(int(margin.get("t", 60) or 0),
                      int(title_lines * PRESENTATION_TITLE_FONT * (line + 0.7) + 16
                          + above * PRESENTATION_FONT * line + 8))
    margin["b"] = max(int(margin.get("b", 40) or 0), 40)
    layout["margin"] = margin
    # the text grew by a third: the figure grows by a quarter, and a legend under it adds
    # its rows
    height = float(layout.get("height") or 450)
    legend_rows = 60 if legend_shown and layout.get("showlegend", True) is not False else 0
    layout["height"] = int(height * 1.25 + legend_rows)
    return go.Figure(data)


def _presentation_colorbar(colorbar: dict | None) -> dict:
    bar = dict(colorbar or {})
    bar["tickfont"] = _bigger(bar.get("tickfont"))
    # room around the bar, for its title grown in size (plotly's margins leave a horizontal
    # bar under the plot a pixel or two short)
    bar["ypad"] = max(float(bar.get("ypad") or 10), 16)
    bar_title = bar.get("title")
    if isinstance(bar_title, str):
        bar_title = {"text": bar_title}
    if bar_title:
        bar_title["font"] = _bigger(bar_title.get("font"))
        bar["title"] = bar_title
    return bar
