"""Fixtures shared by every test. The packages (spider, analysis, app, bench) are installed
editable (scripts/setup.sh); helper modules beside tests (tests/spider/ties.py) are found
the way pytest finds them (the folder of a test module without ``__init__.py``)."""

from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and immune to a busy machine (two OpenMP threads
    sharing two loaded cores can be 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium through Playwright, one per test process: a second Playwright
    started beside a live one fails ("Sync API inside the asyncio loop"), so every test that
    needs a browser takes this one. Missing Chromium fails (never skips): the ``make test``
    set-up installs it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; run `bash scripts/setup_browser.sh` "
                    "(installs Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        yield browser
        browser.close()
