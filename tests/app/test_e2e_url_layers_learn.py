"""End to end in Debian's Chromium: every view setting of Layers, Learn and "Why it forgot" is
in the address (issue 25, item 4). A teacher prepares tabs: a reload, and the same address
opened in a fresh browser (a shared link, no session), show the same view."""

from __future__ import annotations

import shutil
import time
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from spider.rundir import AttributionRow, RunDir
from tests.app.conftest import wait_idle
from tests.app.test_compare_page import SAMPLES

EXCEPTION = "[data-testid='stException']"


def _query(page) -> dict[str, list[str]]:
    return parse_qs(urlparse(page.url).query)


def _select(page, label: str, option: str) -> None:
    box = page.locator("[data-testid='stSelectbox']", has_text=label).first
    box.locator("input").click()
    page.locator("[role='option']", has_text=option).first.click()
    wait_idle(page)


def _selected(page, label: str) -> str:
    return page.locator("[data-testid='stSelectbox']", has_text=label).first.locator(
        "input").input_value()


def _slider(page, label: str):
    return page.locator(f"input[type='range'][aria-label='{label}']")


def _checked_radio(page, label: str) -> list[str]:
    checked = page.locator("[data-testid='stRadio']", has_text=label).locator("input:checked")
    checked.first.wait_for(timeout=90_000)  # drawn once the script has reached it
    return checked.evaluate_all("els => els.map(e => e.closest('label').innerText)")


def _eventually(read, expected, timeout_s: float = 90):
    """``read()`` once it equals ``expected`` (the page draws while the script runs; a reload
    can look idle for a moment before its script starts), else its last value."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.3)
        value = read()
    return value


def _fresh(browser_page, url: str):
    """The address opened in a new browser context: no cookies, no Streamlit session."""
    page = browser_page.context.browser.new_context(
        viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    wait_idle(page, timeout=180)
    return page


def test_layers_view_survives_a_reload_and_a_shared_link(streamlit_server, browser_page):
    page = browser_page
    page.goto(f"{streamlit_server.url}/layers?runs=samples/spider")
    wait_idle(page, timeout=180)
    assert page.locator(EXCEPTION).count() == 0
    # picked twice over: each pick lands (the picker is redrawn with the new pair)
    _select(page, "Side by side with", "samples/lora (lora)")
    assert _query(page)["runs"] == ["samples/spider", "samples/lora"]
    _select(page, "Side by side with", "samples/full (full)")
    _select(page, "Heatmap shows", "Mean G − I")
    step = _slider(page, "Step")
    step.focus()
    step.press("Home")  # the first logged step
    wait_idle(page)
    first_step = step.get_attribute("aria-valuetext")
    page.locator("[data-testid='stRadio'] label", has_text="fitted to each run").click()
    wait_idle(page)

    query = _query(page)
    assert query["runs"] == ["samples/spider", "samples/full"]
    assert query["layers_value"] == ["Mean G − I"]
    assert query["layers_step"] == [first_step]
    assert query["layers_scale_discrepancy_mean"] == ["fitted to each run"]

    for view in (lambda: (page.reload(), wait_idle(page, timeout=180), page)[-1],
                 lambda: _fresh(page, page.url)):
        shown = view()
        assert shown.locator(EXCEPTION).count() == 0
        assert _selected(shown, "Run") == "samples/spider (spider)"
        assert _selected(shown, "Side by side with") == "samples/full (full)"
        assert _selected(shown, "Heatmap shows") == "Mean G − I"
        assert _slider(shown, "Step").get_attribute("aria-valuetext") == first_step
        assert _checked_radio(shown, "Colour scale") == ["fitted to each run"]
        shown.get_by_text("fitted to this run's values").first.wait_for(timeout=90_000)
        assert _query(shown) == query


def test_learn_example_survives_a_reload_and_a_shared_link(streamlit_server, browser_page):
    page = browser_page
    page.goto(f"{streamlit_server.url}/")  # Learn is the default page
    wait_idle(page, timeout=180)
    default_metrics = page.locator("[data-testid='stMetricValue']").all_inner_texts()
    steps = _slider(page, "Steps of fine-tuning")
    steps.focus()
    steps.press("End")  # 40 steps
    wait_idle(page)
    page.locator("[data-testid='stCheckbox'] label", has_text="Binary mask").click()
    wait_idle(page)
    page.locator("[data-testid='stRadio'] label", has_text="|gradient| (ablation)").click()
    wait_idle(page)
    page.get_by_role("button", name="Re-seed").click()
    wait_idle(page)
    metrics = page.locator("[data-testid='stMetricValue']").all_inner_texts()
    assert metrics != default_metrics

    query = _query(page)
    assert query["learn_steps"] == ["40"]
    assert query["learn_binary"] == ["true"]
    assert query["learn_accumulate"] == ["|gradient| (ablation)"]
    assert query["learn_seed"] == ["1"]

    for view in (lambda: (page.reload(), wait_idle(page, timeout=180), page)[-1],
                 lambda: _fresh(page, page.url)):
        shown = view()
        assert shown.locator(EXCEPTION).count() == 0
        assert _slider(shown, "Steps of fine-tuning").get_attribute("aria-valuetext") == "40"
        assert shown.locator("[data-testid='stCheckbox']", has_text="Binary mask").locator(
            "input").is_checked()
        assert _checked_radio(shown, "S accumulates the") == ["|gradient| (ablation)"]
        shown.get_by_text("seed 1", exact=True).wait_for(timeout=90_000)
        # the same example: the same numbers
        assert _eventually(lambda: shown.locator(  # noqa: B023 (read at once, in the loop)
            "[data-testid='stMetricValue']").all_inner_texts(), metrics) == metrics


def _attributed_run(runs_dir):
    """A copy of the full sample with an attribution at two steps, grouped two ways."""
    path = runs_dir / "url-attributed"
    if not path.exists():
        shutil.copytree(SAMPLES / "full", path)
        RunDir(path).append_attribution([
            AttributionRow(step, by, group, {"upstream": u, "downstream": d}, n, 100)
            for step in (100, 150)
            for by, groups in (("component", ("projector", "llm")), ("layer", ("llm.0", "llm.1")))
            for group, u, d, n in (("(none)", 0.5, 0.9, 0), (groups[0], 0.6, 0.88, 2),
                                   (groups[1], 0.8, 0.3, 40), ("(all)", 0.9, 0.1, 42))])
    return path


def test_why_it_forgot_view_survives_a_reload_and_a_shared_link(streamlit_server, browser_page):
    _attributed_run(streamlit_server.runs_dir)
    page = browser_page
    page.goto(f"{streamlit_server.url}/forgetting?runs=url-attributed")
    wait_idle(page, timeout=180)
    assert page.locator(EXCEPTION).count() == 0
    assert _selected(page, "Run") == "url-attributed (full)"
    _select(page, "Grouped by", "layer")
    _select(page, "Checkpoint step", "100")
    assert _query(page)["why_by"] == ["layer"] and _query(page)["why_step"] == ["100"]
    # another run: it goes to ?runs=, and its own drift chart starts afresh
    _select(page, "Run", "samples/full (full)")
    assert _query(page)["runs"][0] == "samples/full"
    drift = page.locator("[data-testid='stMultiSelect']", has_text="Runs").first
    # the previous run's tag stands until the page has rerun: wait for the new one to lead
    # (a busy machine took seconds)
    expect(drift.locator("[data-tag]").first).to_have_attribute(
        "aria-label", "samples/full (full)", timeout=90_000)
    _select(page, "Run", "url-attributed (full)")
    _select(page, "Grouped by", "layer")
    _select(page, "Checkpoint step", "100")
    query = _query(page)
    assert query["runs"][0] == "url-attributed"

    for view in (lambda: (page.reload(), wait_idle(page, timeout=180), page)[-1],
                 lambda: _fresh(page, page.url)):
        shown = view()
        assert shown.locator(EXCEPTION).count() == 0
        assert _selected(shown, "Run") == "url-attributed (full)"
        assert _selected(shown, "Grouped by") == "layer"
        assert _selected(shown, "Checkpoint step") == "100"
        assert shown.get_by_text("Reverting llm.0").count() >= 1


def test_learn_offers_the_handout_for_download(streamlit_server, browser_page):
    """Issue 25 item 8: the Learn page's button downloads the one-page handout (made on click)."""
    page = browser_page
    page.goto(f"{streamlit_server.url}/")
    wait_idle(page, timeout=180)
    button = page.get_by_role("button", name="Handout for the class")
    with page.expect_download(timeout=120_000) as download:
        button.click()
    path = download.value.path()
    document = open(path, encoding="utf-8").read()
    assert download.value.suggested_filename == "spider-handout.html"
    assert document.count("Plotly.newPlot") == 2 and "@media print" in document
    assert "Where SPIDER let the weights move" in document
