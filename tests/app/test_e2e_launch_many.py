"""End to end in Chromium: the "SPIDER vs full" preset launches two runs that the Train page
watches together — both on one live chart, each with its own status — to the end without a
reload, and "Open in Compare" opens both (issue #25: the panel used to follow the first run
only, so full fine-tuning, the run that forgets, trained unseen)."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

import pytest

from tests.app.conftest import screenshot, wait_idle
from tests.app.test_e2e_train import PROGRESS, _no_exception, _status, _wait_for

LEGEND = ".legendtext"  # plotly's legend entries (SVG text)


def _set_number(page, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def _legend(page) -> list[str]:
    return [t.strip() for t in page.locator(LEGEND).all_text_contents()]


@pytest.mark.usefixtures("streamlit_server")
def test_spider_vs_full_both_on_the_live_chart_to_the_end_and_open_together(
        streamlit_server, browser_page, screenshots_dir):
    page, runs_dir = browser_page, streamlit_server.runs_dir
    before = {p.name for p in runs_dir.iterdir()}
    names = runs_dir / ".queue" / "names"
    names.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in names.iterdir()}
    page.goto(streamlit_server.url + "/train?preset=spider_vs_full")
    wait_idle(page, 180)
    _no_exception(page)
    # the address filled the form (two methods) and launched nothing
    page.get_by_text("SPIDER vs full is filled in").wait_for(timeout=30_000)
    assert page.get_by_text("2 runs: spider, full").count() == 1
    assert not [p for p in runs_dir.iterdir() if p.name not in before and p.name != ".queue"]

    # two short runs: 6 steps, evaluated at 0, 3 and 6 on 5 examples per split
    _set_number(page, "Steps", 6)
    _set_number(page, "Evaluate every (steps)", 3)
    page.get_by_text("More settings").click()
    _set_number(page, "Test examples per evaluation", 5)
    _set_number(page, "Statistics every (steps)", 3)
    page.get_by_role("button", name="Launch", exact=True).click()

    def new_runs():  # the names Launch reserved (a queued run has no folder yet)
        found = sorted(runs_dir / p.name for p in names.iterdir() if p.name not in taken)
        return found if len(found) == 2 else None

    spider, full = sorted(_wait_for(new_runs, 120, "the two runs' names"),
                          key=lambda p: not p.name.startswith("spider"))
    assert spider.name.startswith("spider") and full.name.startswith("full")
    # one launch, one panel: while SPIDER trains, full is on the page too, said to be queued
    # behind it (its own status, not hidden behind a run picker)
    page.get_by_text(f"Queued: starts when {spider.name} has finished").wait_for(
        timeout=120_000)
    assert page.get_by_text(spider.name, exact=True).count() >= 1
    # ... and both reach the end, said by the page itself (no reload)
    deadline = time.monotonic() + 420
    while page.get_by_text("Done.").count() < 2:
        assert time.monotonic() < deadline, "the page did not show both runs done"
        page.wait_for_timeout(500)
    assert _status(spider) == "done" and _status(full) == "done"
    wait_idle(page, 60)
    _no_exception(page)
    assert page.locator(PROGRESS).count() == 0
    # one chart holds both runs: the legend names each (once per chart: scores and loss)
    legend = _legend(page)
    assert legend.count(f"{spider.name} (spider)") == 2, legend
    assert legend.count(f"{full.name} (full)") == 2, legend
    screenshot(page, screenshots_dir / "train-launch-many-done.png")

    # "Open in Compare" carries both runs
    link = page.get_by_role("link", name="Open in Compare")
    query = parse_qs(urlparse(link.get_attribute("href")).query)
    assert query["runs"] == [spider.name, full.name]
    link.click()
    wait_idle(page, 180)
    assert parse_qs(urlparse(page.url).query)["runs"] == [spider.name, full.name]
    page.get_by_text(full.name).first.wait_for(timeout=90_000)
    _no_exception(page)
