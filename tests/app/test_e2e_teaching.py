"""End to end in Chromium: what a newcomer types does what it says (issue 25, teaching mode).

Typing a method's name and Enter in a multiselect picks that one option: the pickers search
the names only (not descriptions, not letters scattered through a label) and offer no
"Select all matches", and next to Launch the page says what will be queued.
"""

from __future__ import annotations

from tests.app.conftest import wait_idle

EXCEPTION = "[data-testid='stException']"


def _chips(page, label: str) -> list[str]:
    """The chosen options shown as chips in the multiselect labelled ``label``."""
    box = page.locator("[data-testid='stMultiSelect']", has_text=label).first
    tags = box.locator("[data-tag]")
    return [tags.nth(i).get_attribute("aria-label") for i in range(tags.count())]


def _type_and_enter(page, label: str, text: str) -> None:
    box = page.locator("[data-testid='stMultiSelect']", has_text=label).first
    field = box.locator("input").first
    field.click()
    field.fill(text)
    page.wait_for_timeout(300)  # the options list filters as typed
    options = page.locator("[role='option']")
    shown = [options.nth(i).inner_text() for i in range(options.count())]
    assert not any("select" in s.lower() and "match" in s.lower() for s in shown), shown
    field.press("Enter")
    page.keyboard.press("Escape")
    wait_idle(page)


def test_typing_full_and_enter_picks_one_method_and_one_run(streamlit_server, browser_page):
    page = browser_page
    page.goto(streamlit_server.url)
    wait_idle(page)
    page.get_by_role("link", name="Train", exact=True).click()  # not the tour's "Train: ..."
    wait_idle(page)
    page.get_by_role("spinbutton", name="Steps", exact=True).wait_for()
    assert _chips(page, "Methods") == ["spider"]
    page.get_by_text("1 run: spider", exact=True).wait_for()

    _type_and_enter(page, "Methods", "full")
    assert _chips(page, "Methods") == ["spider", "full"]
    page.get_by_text("2 runs: spider, full", exact=True).wait_for()
    assert page.locator(EXCEPTION).count() == 0

    page.goto(f"{streamlit_server.url}/compare?runs=samples/spider")
    wait_idle(page)
    assert _chips(page, "Runs to compare") == ["samples/spider (spider)"]
    _type_and_enter(page, "Runs to compare", "full")
    assert _chips(page, "Runs to compare") == ["samples/spider (spider)", "samples/full (full)"]
    assert page.locator(EXCEPTION).count() == 0
