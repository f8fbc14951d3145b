"""Time of every app page on the bundled sample runs: in a real server and browser, and in
Streamlit's AppTest.

    .venv/bin/python bench/bench_app.py [--repeat 5] [--server-only | --apptest-only]
                                        [--runs 300]

**Server** (what a person waits for; Chromium through Playwright): ``python -m app`` is
started on a free port; **first page** = seconds from the moment it prints its URL to the
Learn page drawn in the browser (script finished), the median of ``--starts`` server starts
(3); then every page is opened by its navigation link: **switch cold** (first visit: files
read, figures built) and **switch warm** (later visits, from the caches: the median of
``--visits`` rounds through every page, 3, and the slowest). ``--launcher streamlit`` times a plain
``streamlit run app/streamlit_app.py`` instead (imports wait for the first browser).
Targets: first page <= 3 s after the URL, every warm switch <= 1 s.

**Many runs** (``--runs 300``, issue 24): both measurements with a user runs folder of that
many runs beside the samples — hard-linked copies of sample runs (``bench_listing``'s
generator, no data copied), cycling through several methods, every seventh one failed — so
that Compare's filters, chooser and paged table are timed at that scale.

**AppTest** (the script runner alone, no browser): **cold** = first render after every
Streamlit cache is cleared, **warm** = median of ``--repeat`` further renders, **moved** =
median render after moving a main widget to a value not shown before (Compare: smoothing;
Layers: the step slider). Also printed: the largest figure each page sends (JSON bytes; the
budget is 2 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAGES = ("learn", "compare", "layers", "parameters", "forgetting", "train")
# the sample runs the many-runs folder copies, in turn (methods and data differ between them)
MANY_SOURCES = ("spider", "full", "lora", "hybrid", "l2", "magnitude_mask")
# every seventh run failed: 7 is coprime with the 6 sources, so each method has failed runs
FAILED_EVERY = 7


def make_many_runs(root: Path, count: int, sources=MANY_SOURCES,
                   failed_every: int = FAILED_EVERY) -> list[Path]:
    """``count`` finished runs in ``root`` (``run-0000``...): hard links to the files of the
    sample runs ``sources`` in turn, with their own run.json (the listing record written as
    at the end of a run); every ``failed_every``-th says it failed. Same file system as the
    samples (hard links)."""
    import json

    from bench.bench_listing import finished_copy, link_tree
    from spider import rundir

    samples = ROOT / "sample_checkpoints" / "runs"
    templates = {}
    made = []
    for index in range(count):
        source = sources[index % len(sources)]
        if source not in templates:
            templates[source] = finished_copy(samples / source, root / ".templates" / source)
        target = root / f"run-{index:04d}"
        link_tree(templates[source], target, copy=(rundir.RUN_FILE,))
        if failed_every and index % failed_every == failed_every - 1:
            info = json.loads((target / rundir.RUN_FILE).read_text())
            info.update(status="failed", error="loss is not finite (made by bench_app)")
            (target / rundir.RUN_FILE).write_text(json.dumps(info))
        made.append(target)
    return made


def _move_compare(at, i: int) -> None:
    at.slider[0].set_value(round(0.05 * (i + 1), 2))


def _move_layers(at, i: int) -> None:
    steps = list(at.select_slider[0].options)
    at.select_slider[0].set_value(int(steps[i % len(steps)]))


MOVES = {"compare": _move_compare, "layers": _move_layers}
TARGET_WARM_S = 1.0


def _largest_figure(at) -> int:
    sizes = [len(c.proto.spec.encode()) for c in at.get("plotly_chart")]
    return max(sizes, default=0)


def measure(repeat: int) -> list[dict]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=300)
    at.run()  # imports (torch, transformers, plotly) happen here, outside every timing
    rows = []
    for page in PAGES:
        st.cache_data.clear()
        st.cache_resource.clear()
        at.switch_page(f"views/{page}.py")
        start = time.perf_counter()
        at.run()
        cold = time.perf_counter() - start
        warm = []
        for _ in range(repeat):
            start = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - start)
        moved = []
        for i in range(repeat if page in MOVES else 0):
            MOVES[page](at, i)
            start = time.perf_counter()
            at.run()
            moved.append(time.perf_counter() - start)
        rows.append({
            "page": page, "cold_s": cold, "warm_s": statistics.median(warm),
            "moved_s": statistics.median(moved) if moved else float("nan"),
            "warm_max_s": max(warm), "charts": len(at.get("plotly_chart")),
            "largest_figure_kb": _largest_figure(at) / 1024,
            "exception": bool(at.exception),
        })
    return rows


TARGET_FIRST_S = 3.0
TARGET_SWITCH_S = 1.0
_TITLES = {"learn": "Learn", "compare": "Compare", "layers": "Layers",
           "parameters": "Parameters", "forgetting": "Why it forgot", "train": "Train"}
_DONE = """title => {
  const app = document.querySelector("[data-testid='stApp']");
  const h1 = document.querySelector("h1");
  return app && app.dataset.testScriptState === "notRunning" && h1
         && h1.innerText.toLowerCase().includes(title)
         && !document.querySelector("[data-testid='stSkeleton']");
}"""


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used: on a machine busy with
    other work, the part of a wait that is the server's own, whatever the load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def measure_server(launcher: str = "app", timeout: float = 300,
                   runs_dir: str | None = None, warm_visits: int = 3,
                   switches: bool = True) -> dict:
    """First page after the URL is printed, and each page switch cold and warm (seconds of
    wall time, ``*_s``, and of the server's CPU time, ``*_cpu``). A warm switch is the median
    of ``warm_visits`` rounds through every page (``*_warm_max_s``: the slowest); with
    ``switches=False`` only the first page is timed."""
    import socket
    import subprocess
    import tempfile
    import threading

    from playwright.sync_api import sync_playwright

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--server.port", str(port), "--server.address", "127.0.0.1",
             "--server.headless", "true"]
    command = ([sys.executable, "-m", "app", *flags] if launcher == "app" else
               [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
                *flags])
    runs = runs_dir or tempfile.mkdtemp(prefix="bench-app-runs-")
    env = dict(os.environ, SPIDERSCOPE_RUNS=runs, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    result: dict = {"launcher": launcher}
    with sync_playwright() as playwright:
        # the browser is up before the server starts: its own start is not timed
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        url_at: list[float] = []
        seen = threading.Event()

        def read() -> None:
            for line in process.stdout:
                if "URL:" in line and not seen.is_set():
                    url_at.append(time.perf_counter())
                    seen.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            if not seen.wait(timeout):
                raise RuntimeError(f"{' '.join(command)} printed no URL in {timeout:.0f} s")
            result["url_after_start_s"] = url_at[0] - started
            cpu = _cpu_seconds(process.pid)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function(_DONE, arg="learn", timeout=timeout * 1000, polling=20)
            result["first_page_s"] = time.perf_counter() - url_at[0]
            result["first_page_cpu"] = _cpu_seconds(process.pid) - cpu
            rounds = ["cold"] + ["warm"] * warm_visits if switches else []
            for visit in rounds:
                for name in PAGES:
                    link = page.locator("[data-testid='stSidebarNavLink']",
                                        has_text=_TITLES[name]).first
                    start, cpu = time.perf_counter(), _cpu_seconds(process.pid)
                    link.click()
                    page.wait_for_timeout(30)  # the click's rerun starts
                    page.wait_for_function(_DONE, arg=_TITLES[name].lower(),
                                           timeout=timeout * 1000, polling=20)
                    result.setdefault(f"{name}_{visit}_all", []).append(
                        (time.perf_counter() - start, _cpu_seconds(process.pid) - cpu))
            for key in [k for k in result if k.endswith("_all")]:
                times = sorted(result[key])  # by wall time: the median round, its cpu
                stem = key[:-len("_all")]
                result[f"{stem}_s"], result[f"{stem}_cpu"] = times[len(times) // 2]
                result[f"{stem}_max_s"] = times[-1][0]
        finally:
            browser.close()
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    return result


def print_server(result: dict) -> None:
    first = result["first_page_s"]
    firsts = result.get("first_pages_s", [first])
    spread = (f" (median of {len(firsts)} server starts: "
              f"{', '.join(f'{t:.2f}' for t in firsts)})" if len(firsts) > 1 else "")
    print(f"server ({'python -m app' if result['launcher'] == 'app' else 'streamlit run'}): "
          f"URL printed {result['url_after_start_s']:.1f} s after start; first page "
          f"{first:.2f} s after the URL{spread}, {result['first_page_cpu']:.2f} s of it the "
          f"server's CPU ({'ok' if first <= TARGET_FIRST_S else 'over'} {TARGET_FIRST_S:g} s)")
    visits = len(result.get(f"{PAGES[0]}_warm_all", [None]))
    print(f"{'page':<11} {'cold s':>7} {'(cpu)':>6} {'warm s':>7} {'(cpu)':>6} {'max':>6}  "
          f"status (wall time, warm: median of {visits} visits; cpu = the server's own share)")
    for name in PAGES:
        warm = result[f"{name}_warm_s"]
        print(f"{name:<11} {result[f'{name}_cold_s']:7.2f} {result[f'{name}_cold_cpu']:6.2f} "
              f"{warm:7.2f} {result[f'{name}_warm_cpu']:6.2f} "
              f"{result[f'{name}_warm_max_s']:6.2f}  "
              f"{'ok' if warm <= TARGET_SWITCH_S else f'over {TARGET_SWITCH_S:g} s'}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="warm renders per page")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--launcher", choices=("app", "streamlit"), default="app",
                        help="serve with python -m app (imports first) or streamlit run")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--server-only", action="store_true", help="only the server timings")
    only.add_argument("--apptest-only", action="store_true", help="only the AppTest timings")
    parser.add_argument("--visits", type=int, default=3,
                        help="warm visits of every page (the median is reported)")
    parser.add_argument("--starts", type=int, default=3,
                        help="server starts whose first page is timed (the median is reported)")
    parser.add_argument("--runs", type=int, default=0,
                        help="also list this many runs (hard-linked copies of sample runs) "
                             "in the user's runs folder")
    args = parser.parse_args(argv)
    if args.runs:
        import atexit
        import shutil
        import tempfile

        many = Path(tempfile.mkdtemp(prefix="bench-app-many-"))
        atexit.register(shutil.rmtree, many, ignore_errors=True)
        make_many_runs(many, args.runs)
        os.environ["SPIDERSCOPE_RUNS"] = str(many)
        print(f"{args.runs} runs in {many} (and the {len(list((ROOT / 'sample_checkpoints' / 'runs').iterdir()))} samples)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not args.apptest_only:
        runs_dir = os.environ.get("SPIDERSCOPE_RUNS") if args.runs else None
        server = measure_server(args.launcher, runs_dir=runs_dir, warm_visits=args.visits)
        firsts = [server["first_page_s"]] + [
            measure_server(args.launcher, runs_dir=runs_dir, switches=False)["first_page_s"]
            for _ in range(args.starts - 1)]
        server["first_pages_s"] = firsts
        server["first_page_s"] = statistics.median(firsts)
        print_server(server)
        print(f"(Chromium 1280x720, {os.cpu_count()} CPUs, load average {load:.1f})\n")
        if args.server_only:
            if args.json:
                Path(args.json).write_text(json.dumps([server], indent=1))
            return [server]
    os.environ.setdefault("SPIDERSCOPE_RUNS", str(ROOT / ".bench-empty-runs"))
    rows = measure(args.repeat)
    print(f"{'page':<11} {'cold s':>7} {'warm s':>7} {'warm max':>8} {'moved s':>7} {'charts':>6} "
          f"{'largest fig':>11}  status")
    for r in rows:
        slowest = max(r["warm_s"], r["moved_s"] if r["moved_s"] == r["moved_s"] else 0.0)
        status = "EXCEPTION" if r["exception"] else (
            "ok" if slowest <= TARGET_WARM_S else f"over {TARGET_WARM_S} s")
        moved = "" if r["moved_s"] != r["moved_s"] else f"{r['moved_s']:.2f}"
        print(f"{r['page']:<11} {r['cold_s']:7.2f} {r['warm_s']:7.2f} {r['warm_max_s']:8.2f} "
              f"{moved:>7} "
              f"{r['charts']:6d} {r['largest_figure_kb']:9.0f} kB  {status}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(AppTest, {os.cpu_count()} CPUs, load average {load:.1f}; warm = median of "
          f"{args.repeat}; "
          f"target warm <= {TARGET_WARM_S} s, figures <= 2048 kB)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
