"""End to end in Chromium: every page opens by its navigation link and draws without error.

A real ``streamlit run`` (fixture ``streamlit_server``) and Debian's Chromium through
Playwright. Screenshots of every page go to ``$SPIDERSCOPE_SCREENSHOTS`` (or the test's
temporary folder) so that a person can look at them.
"""

from pathlib import Path

import pytest

from tests.app.conftest import screenshot, start_server, wait_idle

PAGES = ("Learn", "Compare", "Layers", "Parameters", "Why it forgot", "Train")
# each page's address: the file name of its script under app/views/ (Learn is the root)
ADDRESS = {"Learn": "", "Why it forgot": "forgetting"}
# pages that show results of the sample runs, so must draw charts on first open
CHARTED = {"Compare": 3, "Layers": 3, "Parameters": 1}


def _nav_link(page, title: str):
    return page.locator("[data-testid='stSidebarNavLink']", has_text=title).first


def _chosen(page) -> list[str]:
    """The runs shown as chosen in the Compare page's multiselect."""
    tags = page.locator("[data-testid='stMultiSelect'] [data-tag]")
    return [tags.nth(i).get_attribute("aria-label") for i in range(tags.count())]


def test_every_page_opens_by_its_link_and_draws(streamlit_server, browser_page,
                                                screenshots_dir):
    page = browser_page
    page.goto(streamlit_server.url)
    wait_idle(page)
    # .streamlit/config.toml: no Deploy button, served on 127.0.0.1 only (no warning)
    assert page.locator("[data-testid='stAppDeployButton']").count() == 0
    assert "listens on" not in page.locator("[data-testid='stSidebar']").inner_text()
    for title in PAGES:
        _nav_link(page, title).click()
        page.wait_for_url(f"**/{ADDRESS.get(title, title.lower())}**")
        wait_idle(page)
        page.wait_for_timeout(300)  # charts are drawn by plotly.js after the script ends
        heading = page.locator("h1").first.inner_text()
        assert title.lower() in heading.lower(), f"{title}: the page's heading is {heading!r}"
        errors = page.locator("[data-testid='stException']")
        assert errors.count() == 0, f"{title}: {errors.first.inner_text()[:500]}"
        if title in CHARTED:
            charts = page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot")
            charts.first.wait_for(timeout=90_000)
            assert charts.count() >= CHARTED[title], f"{title} drew {charts.count()} charts"
        screenshot(page, screenshots_dir / f"{title.lower()}.png")


def test_selection_carries_between_pages_and_survives_a_reload(streamlit_server,
                                                               browser_page):
    page = browser_page
    page.goto(f"{streamlit_server.url}/compare?runs=samples/spider&runs=samples/full")
    wait_idle(page)
    assert sorted(_chosen(page)) == ["samples/full (full)", "samples/spider (spider)"]
    # the HTML report of the chosen runs is made when asked for, and opens on its own
    with page.expect_download(timeout=120_000) as download:
        page.get_by_role("button", name="HTML report (opens offline)").click()
    report = Path(download.value.path()).read_text(encoding="utf-8")
    assert report.startswith("<!DOCTYPE html>") and "samples/spider, samples/full" in report
    wait_idle(page)
    _nav_link(page, "Layers").click()
    wait_idle(page)
    assert "runs=samples%2Fspider" in page.url or "runs=samples/spider" in page.url
    page.reload()
    wait_idle(page)
    _nav_link(page, "Compare").click()
    wait_idle(page)
    assert sorted(_chosen(page)) == ["samples/full (full)", "samples/spider (spider)"]


def test_a_fresh_server_opened_at_a_page_address_shows_the_whole_app(browser_page, tmp_path):
    # a bookmarked link after a restart: the first request of the server names a page
    with start_server(tmp_path) as server:
        page = browser_page
        page.goto(f"{server.url}/layers?runs=samples/spider")
        wait_idle(page)
        nav = page.locator("[data-testid='stSidebarNavLink']").all_inner_texts()
        assert [t.strip() for t in nav] == list(PAGES)
        assert "Where runs are read from" in page.locator("[data-testid='stSidebar']").inner_text()
        assert page.locator("h1").first.inner_text() == "Layers"
        assert page.locator("[data-testid='stException']").count() == 0


def test_runs_folder_typed_in_the_sidebar_is_listed_or_refused(streamlit_server, browser_page):
    import shutil

    from tests.app.test_compare_page import copy_run

    # a runs folder is one of the configured folders or inside one (here the server's)
    elsewhere = streamlit_server.runs_dir / "elsewhere"
    copy_run("spider", elsewhere / "moved-run")
    try:
        page = browser_page
        page.goto(f"{streamlit_server.url}/compare")
        wait_idle(page)
        page.locator("[data-testid='stSidebar'] [data-testid='stExpander'] summary",
                     has_text="Where runs are read from").click()
        box = page.get_by_label("Your runs folder", exact=True).and_(page.locator("input"))
        for typed, reason in ((str(streamlit_server.runs_dir / "missing"), "does not exist"),
                              ("/", "/ is the whole file system, not a folder of runs"),
                              ("/etc", "/etc is a system folder, not a folder of runs")):
            box.fill(typed)
            box.press("Enter")
            wait_idle(page)
            page.locator("[data-testid='stSidebar'] [data-testid='stAlert']",
                         has_text=reason).wait_for(timeout=90_000)
        box.fill(str(elsewhere))
        box.press("Enter")
        wait_idle(page)
        # the new folder's run is listed in the runs table and offered in the chooser
        page.locator("[data-testid='stSidebar'] [data-testid='stAlert']").wait_for(
            state="detached", timeout=90_000)
        wait_idle(page)
        page.locator("[data-testid='stMultiSelect']", has_text="Runs to compare").locator(
            "input").click()  # the chooser (the filters above it are multiselects too)
        page.get_by_role("option", name="moved-run (spider)", exact=True).wait_for(
            timeout=90_000)
        assert page.locator("[data-testid='stException']").count() == 0
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
