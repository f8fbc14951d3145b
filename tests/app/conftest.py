"""Fixtures for the app's tests: Streamlit's AppTest, a real server, and Chromium.

* ``runs_dir``: an empty user runs folder (``SPIDERSCOPE_RUNS`` points at it for the test).
* ``app_page(name, query=None)``: an ``AppTest`` of the whole app (entry script, navigation,
  sidebar) switched to ``app/views/<name>.py`` and run once.
* ``streamlit_server``: ``streamlit run app/streamlit_app.py`` on a free port of 127.0.0.1,
  with its own ``SPIDERSCOPE_RUNS`` folder, started once per test process; ``.url``,
  ``.runs_dir``.
* ``browser_page``: a fresh Playwright page in Debian's Chromium (``/usr/bin/chromium``; the
  ``make test`` set-up installs it, see ``scripts/setup_browser.sh``).
* ``wait_idle(page)``: wait until the app's script has finished running.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app" / "streamlit_app.py"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


# --------------------------------------------------------------------------------------------
# AppTest
# --------------------------------------------------------------------------------------------


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """An empty folder used as the user's runs folder (``SPIDERSCOPE_RUNS``)."""
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setenv("SPIDERSCOPE_RUNS", str(folder))
    return folder


@pytest.fixture
def app_page(runs_dir):
    """``open(name, query=None, timeout=120)``: the app on page ``name`` after one run.

    ``query`` sets URL query parameters first (e.g. ``{"runs": ["samples/spider"]}``), as a
    link would.
    """
    from streamlit.testing.v1 import AppTest

    def open_page(name: str, query: dict | None = None, timeout: float = 120):
        at = AppTest.from_file(str(APP), default_timeout=timeout)
        for key, value in (query or {}).items():
            at.query_params[key] = value
        # One run first: st.navigation registers the pages during it
        at.run()
        at.switch_page(f"views/{name}.py")
        return at.run()

    return open_page


# --------------------------------------------------------------------------------------------
# A real server and a real browser
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    runs_dir: Path
    process: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer on {url} within {timeout:.0f} s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def start_server(base: Path):
    """``streamlit run app/streamlit_app.py`` on a free port of 127.0.0.1, from the repository
    root (so that ``.streamlit/config.toml`` applies), with an empty runs folder in ``base``;
    yields a :class:`Server` once its health endpoint answers, and stops it at the end."""
    runs = base / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log = base / "streamlit.log"
    port = _free_port()
    env = dict(os.environ, SPIDERSCOPE_RUNS=str(runs), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
        yield Server(url=url, runs_dir=runs, process=process, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def streamlit_server(tmp_path_factory):
    """The app served once per test process (see :func:`start_server`)."""
    with start_server(tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture
def browser_page(chromium):
    """A fresh page (own context: no shared cookies or session) 1400x1000."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    yield page
    context.close()


def wait_idle(page, timeout: float = 120) -> None:
    """Wait until the app's script is not running, and has stayed so for a moment (a rerun
    triggered by a widget starts a few milliseconds after the click)."""
    deadline = time.monotonic() + timeout
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout * 1000)
    calm = 0
    while time.monotonic() < deadline:
        if page.locator(IDLE).count() == 1:
            calm += 1
            if calm >= 3:
                return
        else:
            calm = 0
        page.wait_for_timeout(150)
    raise TimeoutError(f"the app was still running after {timeout:.0f} s")


def screenshot(page, path) -> None:
    """Save the whole page: Streamlit scrolls its main block, not the document, so the
    viewport is stretched to the content's height for the shot, then restored."""
    size = page.viewport_size
    height = page.evaluate(
        "() => { const m = document.querySelector(\"[data-testid='stMain']\");"
        " return Math.max(m ? m.scrollHeight : 0, document.body.scrollHeight); }")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, 600), 12000)})
    page.wait_for_timeout(400)  # let plotly re-lay out to the new size
    page.screenshot(path=str(path))
    page.set_viewport_size(size)


@pytest.fixture
def screenshots_dir(tmp_path) -> Path:
    """Where screenshots go: ``$SPIDERSCOPE_SCREENSHOTS`` if set (to keep and look at them),
    else the test's temporary folder."""
    folder = Path(os.environ.get("SPIDERSCOPE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
