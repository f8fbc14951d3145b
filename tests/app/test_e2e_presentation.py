"""Presentation mode and figure export in Chromium (issue 25, items 3 and 5).

On a projector's 1280 × 720, and at 150 % browser zoom of it (an 853 × 480 CSS-pixel window
at 1.5 device pixels per CSS pixel: what Chromium's zoom does to a page), with
``?present=true``: every chart's titles, tick labels, legend, colour bar and annotations stay
inside the chart, titles overlap neither each other nor tick labels, chart text is at least
16 px and page text at least 18 px, on Learn, Compare, Layers and Parameters with the sample
runs. And the camera button saves a PNG at twice a slide's size, or an SVG, with the whole
legend.

Screenshots go to ``$SPIDERSCOPE_SCREENSHOTS`` (or the test's temporary folder).
"""

from __future__ import annotations

import struct
from pathlib import Path

from tests.app.conftest import screenshot, wait_idle

CHARTS = "[data-testid='stPlotlyChart'] .js-plotly-plot"
DOWN = "model.language_model.layers.3.mlp.down_proj.weight"
PAGES = {
    "learn": "",
    "compare": "compare?runs=samples/spider&runs=samples/full&runs=samples/magnitude_mask",
    "layers": "layers?runs=samples/spider&runs=samples/full",
    "parameters": f"parameters?runs=samples/spider&param={DOWN}",
}
SCREENS = {  # name: (CSS viewport, device pixels per CSS pixel)
    "1280x720": ({"width": 1280, "height": 720}, 1.0),
    "zoom150": ({"width": 853, "height": 480}, 1.5),
}

# Per chart: the box of the whole chart (its first .main-svg) and every piece of text plotly
# drew, by kind, with its box and computed font size. Hidden pieces (no box) are left out.
_MEASURE = """
(plots) => plots.map((plot, index) => {
  const main = plot.querySelector('.main-svg').getBoundingClientRect();
  const kinds = {
    title: '.infolayer .gtitle, .g-xtitle text, .g-ytitle text, .infolayer .annotation text, '
         + '.legendtitletext, .cbtitle text',
    tick: '.xtick text, .ytick text',
    legend: '.legendtext',
    colorbar: '.colorbar',
    celltext: '.textpoint text, .contourlabels text',
  };
  const items = [];
  for (const [kind, selector] of Object.entries(kinds)) {
    for (const el of plot.querySelectorAll(selector)) {
      const b = el.getBoundingClientRect();
      if (b.width < 0.5 || b.height < 0.5) continue;
      if (getComputedStyle(el).display === 'none' || el.closest('[display="none"]')) continue;
      // the smallest size in the text: a line of it may be set smaller (<sup>, <sub>)
      const font = kind === 'colorbar' ? null : Math.min(...[el, ...el.querySelectorAll('tspan')]
        .filter(t => t.textContent.trim()).map(t => parseFloat(getComputedStyle(t).fontSize)));
      const text = kind === 'colorbar' ? 'colour bar' : el.textContent;
      const bar = el.closest('.colorbar');  // a colour bar's own title is part of it
      const owner = bar ? [...plot.querySelectorAll('.colorbar')].indexOf(bar) : -1;
      items.push({kind, text, font, owner, box: [b.left, b.top, b.right, b.bottom]});
    }
  }
  return {index, box: [main.left, main.top, main.right, main.bottom],
          title: (plot.querySelector('.gtitle') || {}).textContent || '', items};
})
"""

# Every visible element of the page (outside charts, formulas and tables drawn on a canvas)
# that holds text itself, with its computed font size.
_PAGE_TEXT = """
() => {
  const out = [];
  const main = document.querySelector("[data-testid='stMain']");
  for (const el of main.querySelectorAll('*')) {
    if (el.closest('svg, .katex, canvas, [data-testid="stPlotlyChart"], .stDataFrame')) continue;
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const b = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (b.width < 1 || b.height < 1 || style.visibility === 'hidden') continue;
    out.push({text: el.textContent.trim().slice(0, 40), font: parseFloat(style.fontSize),
              tag: el.tagName, id: el.closest('[data-testid]')?.dataset.testid || ''});
  }
  return out;
}
"""


# Labels and key numbers that Streamlit cuts with "…" (or clips) when their column is narrow.
_CUT = """
() => [...document.querySelectorAll("[data-testid='stMain'] :is([data-testid='stMetricValue'], "
    + "[data-testid='stMetricLabel'], [data-testid='stWidgetLabel']) *")]
  .filter(e => e.getBoundingClientRect().width > 0 && e.scrollWidth > e.clientWidth + 1
          && getComputedStyle(e).overflowX !== 'visible')
  .map(e => e.textContent)
"""


def _inside(inner, outer, slack=2.0) -> bool:
    """``inner`` within ``outer``, give or take a colour bar's 1 px outline."""
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack
            and inner[2] <= outer[2] + slack and inner[3] <= outer[3] + slack)


def _overlap(a, b, slack=1.0) -> bool:
    return (min(a[2], b[2]) - max(a[0], b[0]) > slack
            and min(a[3], b[3]) - max(a[1], b[1]) > slack)


def chart_problems(charts: list[dict], min_font: float | None) -> list[str]:
    """What is wrong with the measured charts: text or colour bars leaving the chart, titles
    on titles or on tick labels, text under ``min_font``."""
    problems = []
    for chart in charts:
        name = f"chart {chart['index']} {chart['title'][:30]!r}"
        items = chart["items"]
        for item in items:
            if item["kind"] != "celltext" and not _inside(item["box"], chart["box"]):
                problems.append(f"{name}: {item['kind']} {item['text'][:40]!r} leaves the chart "
                                f"{[round(v) for v in item['box']]} vs "
                                f"{[round(v) for v in chart['box']]}")
            if min_font and item["font"] is not None and item["font"] < min_font - 0.01:
                problems.append(f"{name}: {item['kind']} {item['text'][:30]!r} at "
                                f"{item['font']:g} px")
        titles = [i for i in items if i["kind"] == "title"]
        others = [i for i in items if i["kind"] in ("tick", "colorbar")]
        for k, a in enumerate(titles):
            for b in titles[k + 1:] + others:
                if a["owner"] >= 0 and a["owner"] == b["owner"]:
                    continue  # a colour bar and its own title or ticks
                if _overlap(a["box"], b["box"]):
                    problems.append(f"{name}: title {a['text'][:30]!r} overlaps {b['kind']} "
                                    f"{b['text'][:30]!r}")
    return problems


def _open(page, url: str) -> list[dict]:
    page.goto(url)
    wait_idle(page)
    page.locator(CHARTS).first.wait_for(timeout=90_000)
    page.wait_for_timeout(800)  # plotly's relayout to the column's width
    assert page.locator("[data-testid='stException']").count() == 0
    return page.locator(CHARTS).evaluate_all(_MEASURE)


def test_presentation_mode_fits_a_projector_and_150_percent_zoom(
        streamlit_server, chromium, screenshots_dir):
    problems: list[str] = []
    for screen, (viewport, scale) in SCREENS.items():
        context = chromium.new_context(viewport=viewport, device_scale_factor=scale)
        page = context.new_page()
        try:
            for name, address in PAGES.items():
                sep = "&" if "?" in address else "?"
                charts = _open(page, f"{streamlit_server.url}/{address}{sep}present=true")
                where = f"{name} at {screen}"
                assert charts, f"{where}: no chart drawn"
                # the mode is on: no sidebar, the toggle at the top says so
                assert page.locator("[data-testid='stSidebar']").is_hidden(), where
                assert page.get_by_role("switch", name="Presentation mode").is_checked()
                problems += [f"{where}: {p}" for p in chart_problems(charts, 16)]
                small = [t for t in page.evaluate(_PAGE_TEXT) if t["font"] < 18 - 0.01]
                problems += [f"{where}: page text {t['text']!r} ({t['id']}) at {t['font']:g} px"
                             for t in small]
                problems += [f"{where}: {text!r} cut short" for text in page.evaluate(_CUT)]
                if name == "learn":  # controls with a help text stay (only help icons go)
                    assert page.get_by_role("button", name="Re-seed").is_visible(), where
                screenshot(page, screenshots_dir / f"present-{name}-{screen}.png")
        finally:
            context.close()
    assert not problems, "\n".join(problems)


def test_presentation_toggle_is_kept_in_the_address_and_switches_off(streamlit_server,
                                                                     browser_page):
    page = browser_page
    switch = page.get_by_role("switch", name="Presentation mode")
    page.goto(f"{streamlit_server.url}/compare?present=true")
    wait_idle(page)
    # (the page may rerun once, e.g. to put the chosen runs in the address, before it settles)
    page.locator("[data-testid='stSidebar']").wait_for(state="hidden", timeout=30_000)
    assert switch.is_checked()
    # a secondary control (Compare's filters) is hidden too; the chooser stays (once drawn)
    page.get_by_text("Runs to compare", exact=True).wait_for(state="visible", timeout=30_000)
    assert page.get_by_text("Name contains", exact=True).is_hidden()
    # the mode outlives a page switch, by the navigation in the top bar
    page.locator("[data-testid='stTopNavLink']", has_text="Layers").click()
    wait_idle(page)
    page.wait_for_url("**/layers?*present=true*", timeout=30_000)
    assert switch.is_checked()
    # off: the address forgets it, the sidebar (and its navigation) is back
    page.get_by_text("Presentation mode", exact=True).click()  # the label: the input is hidden
    wait_idle(page)
    page.wait_for_function("() => !location.search.includes('present')", timeout=30_000)
    page.locator("[data-testid='stSidebar']").wait_for(state="visible", timeout=30_000)
    assert not switch.is_checked()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _camera(page, chart) -> bytes:
    chart.hover()
    with page.expect_download(timeout=120_000) as download:
        chart.locator(".modebar-btn[data-title^='Download plot']").click(force=True)
    assert download.value.failure() is None
    return Path(download.value.path()).read_bytes()


def test_camera_saves_png_at_twice_a_slide_and_svg_with_the_whole_legend(
        streamlit_server, chromium, screenshots_dir):
    # beside the sidebar at 1280 x 720 the chart is about 820 px wide on screen
    context = chromium.new_context(viewport={"width": 1280, "height": 720},
                                   accept_downloads=True)
    page = context.new_page()
    try:
        page.goto(f"{streamlit_server.url}/{PAGES['compare']}")
        wait_idle(page)
        chart = page.locator(CHARTS).first
        chart.wait_for(timeout=90_000)
        on_screen = chart.bounding_box()
        assert on_screen["width"] < 1000
        height = page.locator(CHARTS).first.evaluate("p => p._fullLayout.height")
        assert _png_size(_camera(page, chart)) == (2 * 1280, 2 * height)

        page.get_by_role("radio", name="SVG").click()  # the sidebar's "Chart downloads"
        wait_idle(page)
        chart = page.locator(CHARTS).first
        svg = _camera(page, chart).decode()
        assert svg.lstrip().startswith("<svg")
        legend = chart.evaluate("p => [...p.querySelectorAll('.legendtext')]"
                                ".map(e => e.textContent)")
        assert any("samples/spider" in t for t in legend), legend
        # drawn on its own, every legend entry lies whole inside the saved picture
        page.set_content(f"<html><body style='margin:0'>{svg}</body></html>")
        boxes = page.evaluate(
            "() => { const s = document.querySelector('svg').getBoundingClientRect();"
            " return {svg: [s.left, s.top, s.right, s.bottom], legend: [...document"
            ".querySelectorAll('.legendtext')].map(e => { const b = e.getBoundingClientRect();"
            " return {text: e.textContent, box: [b.left, b.top, b.right, b.bottom]}; })}; }")
        assert [e["text"] for e in boxes["legend"]] == legend
        assert boxes["svg"][2] - boxes["svg"][0] >= 1280 - 1
        for entry in boxes["legend"]:
            assert _inside(entry["box"], boxes["svg"]), entry
        page.screenshot(path=str(screenshots_dir / "export-compare.png"))
    finally:
        context.close()


def test_export_config_saves_twice_a_slide_in_the_chosen_format():
    import plotly.graph_objects as go

    from app.presentation import EXPORT_WIDTH, export_config

    small = go.Figure(layout={"height": 430})
    options = export_config(small, "scores", "svg")["toImageButtonOptions"]
    # never the chart's size on screen (820 x 430 beside the sidebar): a slide's width
    assert options == {"format": "svg", "filename": "scores", "width": EXPORT_WIDTH,
                       "height": 430, "scale": 2}
    wide = go.Figure(layout={"width": 1600})  # a figure wider than a slide keeps its width
    options = export_config(wide, "x", "bmp")["toImageButtonOptions"]
    assert (options["width"], options["height"], options["format"]) == (1600, 450, "png")
