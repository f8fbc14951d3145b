"""In Chromium, at a laptop's 1280×720: what a person sees and gets on Compare, Layers and
Parameters (issue 23: downloads that arrive, scales and labels that say what they show).

A real ``streamlit run`` (fixture ``streamlit_server``) and Debian's Chromium through
Playwright; screenshots go to ``$SPIDERSCOPE_SCREENSHOTS`` (or the test's temporary folder).
"""

from pathlib import Path

import pytest

from tests.app.conftest import screenshot, wait_idle

LAPTOP = {"width": 1280, "height": 720}


@pytest.fixture
def laptop_page(chromium):
    context = chromium.new_context(viewport=LAPTOP, accept_downloads=True)
    page = context.new_page()
    yield page
    context.close()


def _download(page, label: str) -> bytes:
    with page.expect_download(timeout=120_000) as download:
        page.get_by_role("button", name=label).click()
    failure = download.value.failure()
    assert failure is None, f"{label}: the download failed ({failure})"
    return Path(download.value.path()).read_bytes()


def test_compare_downloads_arrive_one_after_another(streamlit_server, laptop_page,
                                                    screenshots_dir):
    page = laptop_page
    page.goto(f"{streamlit_server.url}/compare?runs=samples/spider&runs=samples/full")
    wait_idle(page)
    # right after another download the report used to be a 404 (a deferred file dropped by
    # the rerun the first download caused); twice over, in both orders
    for _ in range(2):
        csv = _download(page, "Runs table (CSV)").decode()
        assert csv.startswith("run,method,") and "samples/spider" in csv
        assert "0.9199999999999999" not in csv and "99999999" not in csv
        html = _download(page, "HTML report (opens offline)").decode()
        assert html.startswith("<!DOCTYPE html>") and "samples/spider" in html
        assert _download(page, "2×2 cells (CSV)").decode().startswith("run,")
    log = streamlit_server.log.read_text(errors="replace")
    assert "MediaFileStorageError" not in log and "not found" not in log
    screenshot(page, screenshots_dir / "compare-laptop.png")


def _top(page, text: str) -> list[float]:
    """Page y of every chart whose text includes ``text``."""
    charts = page.locator("[data-testid='stPlotlyChart']", has_text=text)
    return [charts.nth(i).bounding_box()["y"] for i in range(charts.count())]


def test_layers_puts_like_charts_of_two_runs_level(streamlit_server, laptop_page,
                                                   screenshots_dir):
    page = laptop_page
    page.goto(f"{streamlit_server.url}/layers?runs=samples/magnitude_mask&runs=samples/spider")
    wait_idle(page)
    page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot").first.wait_for(timeout=90_000)
    page.wait_for_timeout(500)
    heat, update = _top(page, "per layer and step"), _top(page, "Update size")
    assert len(heat) == 2 and abs(heat[0] - heat[1]) < 2, heat
    assert len(update) == 2 and abs(update[0] - update[1]) < 2, update
    # a long run name stays on one line (cut with …), so nothing below it shifts
    headings = page.locator("div[title*='magnitude_mask']")
    assert headings.count() == 1 and headings.first.bounding_box()["height"] < 40
    assert "whole possible range" in page.locator("[data-testid='stCaptionContainer']",
                                                  has_text="whole possible range").first.inner_text()
    screenshot(page, screenshots_dir / "layers-laptop.png")


def test_parameters_says_what_a_cell_is(streamlit_server, laptop_page, screenshots_dir):
    page = laptop_page
    down = "model.language_model.layers.3.mlp.down_proj.weight"
    page.goto(f"{streamlit_server.url}/parameters?runs=samples/spider&param={down}")
    wait_idle(page)
    page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot").first.wait_for(timeout=90_000)
    text = page.locator("[data-testid='stCaptionContainer']",
                        has_text="What a cell is").first.inner_text()
    assert "Each cell is one weight" in text and "160×448" in text
    screenshot(page, screenshots_dir / "parameters-laptop.png")


def test_python_m_app_imports_first_then_serves(chromium, tmp_path):
    """``python -m app`` (``make app``) does the heavy imports, and the Learn page's first
    worked example, before it prints the URL: the first page then waits for no import."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from tests.app.conftest import ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, SPIDERSCOPE_RUNS=str(tmp_path), PYTHONPATH=str(ROOT),
               PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--server.port", str(port), "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("URL:" in line for line in lines):
            lines.append(process.stdout.readline())
            assert process.poll() is None, "".join(lines)
        text = "".join(lines)
        assert "imports done" in text and text.index("imports done") < text.index("URL:")
        page = chromium.new_context(viewport=LAPTOP).new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        wait_idle(page)
        assert page.locator("h1").first.inner_text().startswith("Learn")
        assert page.locator("[data-testid='stException']").count() == 0
        page.context.close()
    finally:
        process.terminate()
        process.wait(timeout=20)
