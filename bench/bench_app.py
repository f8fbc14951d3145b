"""Render time of every app page on the bundled sample runs, cold and warm.

    .venv/bin/python bench/bench_app.py [--repeat 5]

Each page runs in Streamlit's AppTest (the same script runner a server uses, without the
browser): **cold** = first render after every Streamlit cache is cleared (files read, frames
built), **warm** = median of ``--repeat`` further renders (what a user sees when moving a
widget or coming back to the page). **moved** = median render after moving a main widget to a
value not shown before (Compare: smoothing; Layers: the step slider), which rebuilds the
figures that depend on it. The whole app script (navigation, sidebar) is included.
Also printed: the largest figure each page sends (JSON bytes; the budget is 2 MB). Target:
warm ≤ 1.5 s per page.
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
sys.path.insert(0, str(ROOT))

PAGES = ("learn", "compare", "layers", "parameters", "train")


def _move_compare(at, i: int) -> None:
    at.slider[0].set_value(round(0.05 * (i + 1), 2))


def _move_layers(at, i: int) -> None:
    steps = list(at.select_slider[0].options)
    at.select_slider[0].set_value(int(steps[i % len(steps)]))


MOVES = {"compare": _move_compare, "layers": _move_layers}
TARGET_WARM_S = 1.5


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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="warm renders per page")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
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
