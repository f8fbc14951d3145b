"""Presentation mode and figure export (issue 25, items 3 and 5).

* **Presentation mode** (the toggle, kept in the address as ``?present=true``, the form
  Streamlit's binding of a toggle to the address reads): the sidebar and secondary controls
  are hidden, the pages' navigation moves to the top bar, page text is at least 18 px and chart text at least 16 px
  (:func:`analysis.figures.style.presentation_layout`), and side-by-side charts stack when
  the window is narrow, so that a projector at 1280 × 720, or at 150 % browser zoom, shows
  every title, label and colour bar whole.
* **Figure export**: every chart's camera button downloads the figure at twice its size
  (``scale`` 2) laid out at :data:`EXPORT_WIDTH` or wider, so a legend on the right is never
  cut, as PNG or SVG (the sidebar's "Chart downloads" choice; while SVG is chosen, charts
  are drawn in Arial, which the programs that open the SVG have too).

Pages show every plotly figure through :func:`show_figure`; a page wraps controls that a
talk does not need in ``st.container(key=secondary_key("..."))`` to have them hidden.
"""

from __future__ import annotations

import re
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from analysis.figures.style import PRESENTATION_WIDTH, presentation_layout

KEY = "present"
"""The toggle's key, and its query parameter."""
FORMAT_KEY = "figure_format"
FORMATS = {"png": "PNG (2×)", "svg": "SVG"}
EXPORT_WIDTH = 1280
"""The narrowest export, in CSS pixels: a slide's width. Plotly's camera otherwise takes
the chart's size on screen (820 × 430 beside a sidebar), where a legend on the right is cut
("samples/spider (spid")."""
EXPORT_SCALE = 2
SVG_FONT = "Arial, 'Liberation Sans', Helvetica, sans-serif"
"""Chart text while SVG downloads are chosen (see :func:`show_figure`)."""
SECONDARY_PREFIX = "secondary_"

# Hides the sidebar and secondary controls, enlarges the page's text. Streamlit sizes text
# in rem: a 22 px root makes body text 22 px and captions (0.875 rem) 19 px; what Streamlit
# sizes in px (widget labels, metric labels, slider ticks) is raised one by one below.
# Columns that hold a chart stack below 1000 px (a 1280 px projector at 150 % zoom is
# 853 px wide): a chart then gets the whole width instead of a third of it.
PRESENTATION_CSS = """
<style>
html { font-size: 22px; }
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"],
[data-testid="stExpandSidebarButton"], [data-testid="stSidebarCollapseButton"],
[data-testid="stMainMenu"], [data-testid="stAppDeployButton"], [data-testid="stDecoration"],
[data-testid="stDownloadButton"], [data-testid="stWidgetLabel"] [data-testid="stTooltipIcon"],
[data-testid="stMetricLabel"] [data-testid="stTooltipIcon"],
[class*="st-key-secondary_"] { display: none !important; }
[data-testid="stMainBlockContainer"] { padding: 4.5rem 1.25rem 2rem 1.25rem; max-width: none; }
[data-testid="stMain"] :is(p, li, label, summary, td, th, button, input, textarea, code,
  [data-testid="stCaptionContainer"], [data-testid="stMetricLabel"],
  [data-testid="stWidgetLabel"], [data-testid="stSliderTickBarMin"],
  [data-testid="stSliderTickBarMax"], [data-testid="stSliderThumbValue"],
  [data-testid="stMarkdownContainer"]):not(.katex *) { font-size: max(18px, 1em) !important; }
[data-testid="stCaptionContainer"] { opacity: 1 !important; color: #31333f !important; }
/* labels and key numbers wrap instead of ending in "…" in a narrow column */
[data-testid="stMetricValue"] > div, [data-testid="stMain"] .stMarkdownEllipsis,
[data-testid="stMain"] .stMarkdownEllipsis *, [data-testid="stWidgetLabel"] > div {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
@media (max-width: 1000px) {
  [data-testid="stHorizontalBlock"]:has([data-testid="stPlotlyChart"]) { flex-wrap: wrap; }
  [data-testid="stHorizontalBlock"]:has([data-testid="stPlotlyChart"])
    > [data-testid="stColumn"] { flex: 1 1 100% !important; width: 100% !important;
                                 min-width: 100% !important; }
}
</style>
"""


def _from_url() -> bool:
    # what Streamlit's binding of the toggle reads as on: "true" (it drops other values)
    return st.query_params.get(KEY, "").lower() == "true"


def active() -> bool:
    """Whether presentation mode is on: the toggle's value, or before the toggle is drawn in
    this session, the address's ``present``."""
    if KEY in st.session_state:
        return bool(st.session_state[KEY])
    return _from_url()


def toggle() -> bool:
    """Draw the presentation toggle (in the sidebar; at the top of the page while presenting,
    where the sidebar is hidden), bound to the address, and apply the mode. Call once per
    run, before the page."""
    on = active()
    where = st.container(horizontal=True, horizontal_alignment="right") if on else st.sidebar
    with where:
        on = st.toggle("Presentation mode", key=KEY, bind="query-params",
                       help="For a projector: no sidebar, large text and chart labels, "
                            "charts stacked when the window is narrow. Kept in the address "
                            "(?present=true).")
    with st.sidebar:
        st.segmented_control(
            "Chart downloads", list(FORMATS), format_func=FORMATS.get, default="png",
            key=FORMAT_KEY, required=True,
            help="What a chart's camera button saves: a PNG at twice the chart's size, or "
                 "an SVG, for slides. Either is laid out at least "
                 f"{EXPORT_WIDTH} px wide, so the legend is whole.")
    if on:
        st.html(PRESENTATION_CSS)
    return on


def secondary_key(name: str) -> str:
    """The key of a container whose controls presentation mode hides."""
    return SECONDARY_PREFIX + name


def export_config(fig: go.Figure, filename: str, fmt: str = "png") -> dict[str, Any]:
    """Plotly's ``config`` for a chart: the camera button saves ``fmt`` ("png" or "svg") at
    :data:`EXPORT_SCALE` times a size of at least :data:`EXPORT_WIDTH` wide and the figure's
    own height, not the chart's size on screen."""
    width = max(int(fig.layout.width or 0), EXPORT_WIDTH)
    height = int(fig.layout.height or 450)
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": fmt if fmt in FORMATS else "png",
                                 "filename": filename, "width": width, "height": height,
                                 "scale": EXPORT_SCALE},
    }


def _filename(fig: go.Figure, key: str | None) -> str:
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else ""
    stem = re.sub(r"<[^>]+>", " ", title or key or "spiderscope-chart")
    stem = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:60]
    return stem or "spiderscope-chart"


def show_figure(fig: go.Figure, *, key: str | None = None, width: Any = "stretch",
                **kwargs: Any):
    """``st.plotly_chart`` for every chart of the app: in presentation mode the figure gets
    presentation fonts, margins and legend; always the export settings of
    :func:`export_config`."""
    fmt = str(st.session_state.get(FORMAT_KEY) or "png")
    if active():
        fig = presentation_layout(fig, PRESENTATION_WIDTH)
    elif fmt == "svg":
        fig = go.Figure(fig)  # a copy: figures are cached and shared between sessions
    if fmt == "svg" and not fig.layout.font.family:
        # an SVG names its fonts without carrying them: drawn elsewhere in a font the
        # viewer lacks (the app's Source Sans), text runs wider than plotly measured and a
        # legend on the right leaves the picture; a font every viewer has is measured alike
        fig.update_layout(font_family=SVG_FONT)
    config = {**export_config(fig, _filename(fig, key), fmt), **kwargs.pop("config", {})}
    return st.plotly_chart(fig, key=key, width=width, config=config, **kwargs)


__all__ = ["EXPORT_SCALE", "EXPORT_WIDTH", "FORMATS", "FORMAT_KEY", "KEY", "PRESENTATION_CSS",
           "active", "export_config", "secondary_key", "show_figure", "toggle"]
