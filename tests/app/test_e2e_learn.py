"""End to end in Debian's Chromium: the Learn page's widgets change the mask it draws, its
"start here" link opens Parameters on the SPIDER sample, and Parameters draws heatmaps."""

import re

from tests.app.conftest import wait_idle

NAV = "[data-testid='stSidebarNav'] a"
CHARTS = "[data-testid='stPlotlyChart']"
LEARN_DOWN = "model.language_model.layers.3.mlp.down_proj.weight"


def _heatmap_texts(page, chart: int) -> list[list[str]]:
    """The numbers printed in each heatmap of chart ``chart``, one list per heatmap (plotly
    draws after the script has finished: wait for the numbers first)."""
    page.wait_for_selector(f"{CHARTS} >> nth={chart} >> .heatmaplayer .hm text",
                           timeout=90_000)
    return page.evaluate(
        """(i) => Array.from(document.querySelectorAll("[data-testid='stPlotlyChart']")[i]
              .querySelectorAll('.heatmaplayer .hm'))
              .map(g => Array.from(g.querySelectorAll('text')).map(t => t.textContent))""",
        chart)


def _mask_once_changed(page, before: list[str]) -> list[str]:
    """The mask panel's numbers once they differ from ``before`` (plotly redraws a moment
    after the rerun ends); ``before`` again if they never change within 30 s."""
    for _ in range(100):
        now = _heatmap_texts(page, 0)[4]
        if now != before:
            return now
        page.wait_for_timeout(300)
    return before


def _metrics(page) -> list[str]:
    return page.locator("[data-testid='stMetricValue']").all_inner_texts()


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0


def test_learn_widgets_change_the_mask_and_parameters_draws(streamlit_server, browser_page,
                                                            screenshots_dir):
    page = browser_page
    page.goto(streamlit_server.url + "/")
    wait_idle(page, timeout=120)
    page.locator(NAV).filter(has_text=re.compile(r"^Learn$")).click()
    wait_idle(page, timeout=120)
    _no_exception(page)
    assert page.locator("h1", has_text="Learn: what SPIDER does").count() == 1

    # the first chart: θ0, S, I, G and the mask w (6 x 8 numbers each)
    panels = _heatmap_texts(page, 0)
    assert len(panels) == 5 and all(len(p) == 48 for p in panels)
    mask_before, metrics_before = panels[4], _metrics(page)

    slider = page.locator("input[type='range'][aria-label='Steps of fine-tuning']")
    slider.focus()
    slider.press("End")  # one rerun, at the slider's maximum (40 steps)
    wait_idle(page, timeout=120)
    _no_exception(page)
    assert slider.get_attribute("aria-valuetext") == "40"
    mask_after_steps = _mask_once_changed(page, mask_before)
    assert mask_after_steps != mask_before and _metrics(page) != metrics_before

    page.locator("[data-testid='stCheckbox'] label", has_text="Binary mask").click()
    wait_idle(page, timeout=120)
    _no_exception(page)
    binary = _mask_once_changed(page, mask_after_steps)
    assert binary != mask_after_steps and set(binary) == {"0.00", "1.00"}
    page.set_viewport_size({"width": 1400, "height": 4300})
    page.wait_for_timeout(800)
    page.screenshot(path=str(screenshots_dir / "learn.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})

    # Parameters by its navigation link: heatmaps of the default run's tensor
    page.locator(NAV).filter(has_text=re.compile(r"^Parameters$")).click()
    wait_idle(page, timeout=120)
    _no_exception(page)
    assert page.locator("h1", has_text="Parameters").count() == 1
    _assert_heatmaps_drawn(page)
    page.set_viewport_size({"width": 1400, "height": 3200})
    page.wait_for_timeout(800)
    page.screenshot(path=str(screenshots_dir / "parameters.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})

    # back to Learn; its "start here" link opens Parameters with the SPIDER sample selected
    page.locator(NAV).filter(has_text=re.compile(r"^Learn$")).click()
    wait_idle(page, timeout=120)
    page.locator("[data-testid='stPageLink'] a", has_text="Parameters").click()
    wait_idle(page, timeout=120)
    _no_exception(page)
    assert "runs=samples%2Fspider" in page.url or "runs=samples/spider" in page.url
    assert "param=model.language_model.layers.3.mlp.down_proj.weight" in page.url
    _assert_heatmaps_drawn(page)


def _assert_heatmaps_drawn(page) -> None:
    """The first chart holds the I, G, w and Δ heatmaps, drawn as images by plotly."""
    page.wait_for_selector(f"{CHARTS} .heatmaplayer .hm image", timeout=90_000)
    chart = page.locator(CHARTS).first
    assert chart.locator(".heatmaplayer .hm").count() == 4
    assert chart.locator(".heatmaplayer .hm image").count() == 4
    title = chart.locator(".gtitle").first.text_content()
    assert LEARN_DOWN in title and "160×448" in title
