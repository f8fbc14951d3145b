"""Does watching a run slow it down? The Train page's live refresh, measured side by side.

A *watched* run has a poller beside it that does, once a second, what the Train page's
fragment does on each refresh (``app.watch.RunWatch.poll`` on the run, the job overview of
the runs folder, the figures rebuilt when new lines came, and every figure serialised to JSON
as ``st.plotly_chart`` sends it). An *unwatched* run has nothing beside it. Runs alternate
(unwatched, watched, watched, unwatched, ...) so that drifting machine load hits both alike.

Then, separately, the page itself: Streamlit's AppTest renders the Train page once a second
while a run trains, and the live panel's own server time (what the fragment runs on each
refresh, Streamlit's serialisation of the charts included) is read from the page.

Speed is the runner's own measure: optimizer steps per second of training time (the
``seconds`` of each step in ``metrics.jsonl``; evaluations excluded). Prints both speeds,
their ratio (target >= 0.9) and the refresh's cost (median and 95th percentile; target
<= 50 ms).

    .venv/bin/python bench/bench_watch.py [--pairs 3] [--steps 80]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import plotly.io as pio

from app import jobs, watch
from spider.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]

# One thread per runner: on a shared 2-core machine two spinning OpenMP threads can be many
# times slower, which would swamp what is measured here.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def refresh(root: Path, watcher: watch.RunWatch, figures: dict) -> None:
    """One refresh of the Train page's fragment, without Streamlit."""
    jobs.jobs_overview(root)
    for run_dir in jobs.iter_user_runs(root):
        jobs.run_status(run_dir)
    snap = watcher.poll()
    watch.live_figures(watcher, snap, figures)  # as the page: each rebuilt when its lines came
    for _, fig in figures.values():
        if fig is not None:
            pio.to_json(fig, validate=False)  # what st.plotly_chart serialises on every rerun


def train(root: Path, name: str, steps: int, watched: bool, batch_size: int
          ) -> tuple[float, list[tuple[float, float]]]:
    """Run one training; returns (steps per second of training time, refresh costs as
    (wall seconds, CPU seconds of the polling thread))."""
    run_dir = root / name
    cmd = [sys.executable, "-m", "spider.train", "--output-dir", str(run_dir),
           "--steps", str(steps), "--batch-size", str(batch_size), "--eval-every", str(steps * 10), "--eval-limit", "10",
           "--save-every", str(steps * 10), "--log-every", "10", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_ENV)
    costs: list[tuple[float, float]] = []
    stop = threading.Event()

    def poll() -> None:
        watcher, figures = watch.RunWatch(run_dir), {}
        while not stop.wait(1.0):
            started, cpu = time.perf_counter(), time.thread_time()
            refresh(root, watcher, figures)
            costs.append((time.perf_counter() - started, time.thread_time() - cpu))

    poller = threading.Thread(target=poll, daemon=True)
    if watched:
        poller.start()
    if proc.wait() != 0:
        raise SystemExit(f"the runner failed: {' '.join(cmd)}")
    stop.set()
    if watched:
        poller.join()
    seconds = [e["seconds"] for e in RunDir(run_dir).read_events() if e.get("event") == "train"]
    return len(seconds) / sum(seconds), costs


def page_refresh_times(root: Path, steps: int) -> list[float]:
    """Milliseconds of the Train page's live panel per refresh while a run trains."""
    from streamlit.testing.v1 import AppTest

    os.environ["SPIDERSCOPE_RUNS"] = str(root)
    run_dir = root / "page-run"
    cmd = [sys.executable, "-m", "spider.train", "--output-dir", str(run_dir),
           "--steps", str(steps), "--eval-every", str(steps * 10), "--eval-limit", "10",
           "--save-every", str(steps * 10), "--log-every", "10", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_ENV)
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=600)
    at.switch_page("views/train.py")
    times = []
    try:
        while proc.poll() is None:
            at.run()
            if (run_dir / "metrics.jsonl").exists():  # the run is under way: a real refresh
                times.append(at.session_state["train_refresh_ms"])
            time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="watched/unwatched pairs")
    parser.add_argument("--steps", type=int, default=80, help="steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--no-page", action="store_true", help="skip the page measurement")
    args = parser.parse_args()
    speeds: dict[bool, list[float]] = {True: [], False: []}
    costs: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for pair in range(args.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            for watched in order:
                speed, cost = train(root, f"run-{pair}-{'w' if watched else 'u'}", args.steps,
                                    watched, args.batch_size)
                speeds[watched].append(speed)
                costs += cost
                print(f"pair {pair}: {'watched  ' if watched else 'unwatched'} "
                      f"{speed:6.2f} steps/s" + (f"  ({len(cost)} refreshes)" if watched
                                                 else ""), flush=True)
    unwatched, watched = statistics.median(speeds[False]), statistics.median(speeds[True])
    costs_ms = sorted(c[0] * 1000 for c in costs)
    cpu_ms = sorted(c[1] * 1000 for c in costs)
    p95 = costs_ms[min(len(costs_ms) - 1, int(0.95 * len(costs_ms)))]
    print(f"\nunwatched: {unwatched:.2f} steps/s (median of {args.pairs})")
    print(f"watched:   {watched:.2f} steps/s (median of {args.pairs}, refreshed every 1 s)")
    print(f"ratio watched / unwatched: {watched / unwatched:.3f}   (target >= 0.9)")
    print(f"refresh: median {statistics.median(costs_ms):.1f} ms, 95th percentile "
          f"{p95:.1f} ms, max {costs_ms[-1]:.1f} ms over {len(costs_ms)} refreshes "
          "(target <= 50 ms)")
    print(f"refresh CPU time (the poller's own thread, unaffected by waiting for a core): "
          f"median {statistics.median(cpu_ms):.1f} ms = {statistics.median(cpu_ms) / 10:.1f} % "
          "of one core at one refresh a second")
    if not args.no_page:
        with tempfile.TemporaryDirectory() as tmp:
            page = sorted(page_refresh_times(Path(tmp), args.steps * 3))
        print(f"Train page's live panel (AppTest, Streamlit included): median "
              f"{statistics.median(page):.1f} ms, max {page[-1]:.1f} ms over {len(page)} "
              "refreshes")


if __name__ == "__main__":
    main()
