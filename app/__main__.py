"""``python -m app [STREAMLIT OPTIONS]``: the app, served with its heavy imports done first.

``streamlit run app/streamlit_app.py`` imports nothing until the first browser connects, so
the first page waits for torch, pandas and plotly (seconds on a busy machine) after the URL
is printed. Here they are imported before the server starts: once the URL appears, the first
page is quick. Options are passed to ``streamlit run`` (e.g. ``--server.port 8502``).

What the first page still waits for is mostly the browser, not this process (measured with
``bench/bench_app.py`` on the 2-core machine: ~0.5 s of the server's CPU in a first page of
~2.8 s). Streamlit's frontend loads the code of an element kind the first time a page shows
one: plotly.js, a 4.7 MB script, for the first chart. In Chromium there the page's script
had finished ~1.3 s after the URL was opened, and plotly.js arrived ~0.3 s later; parsing it
(~0.8 s, off the main thread) and running it (~0.35 s) before the first chart is drawn is
most of the rest. So the Learn page draws only what a first visit needs: its "careful
reader" section (a fourth chart and a table, whose grid code is another 1.5 MB of script)
is drawn once opened.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "streamlit_app.py"


def warm_imports() -> float:
    """Import what the pages import (seconds taken): a module is imported once per process,
    and the server runs the pages in this process."""
    start = time.perf_counter()
    root = str(APP.parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import plotly.graph_objects  # noqa: F401
    import streamlit  # noqa: F401

    import analysis  # noqa: F401  (pandas, numpy, torch, safetensors)
    import analysis.explore  # noqa: F401
    import analysis.figures.curves  # noqa: F401
    import analysis.figures.heatmaps  # noqa: F401
    import analysis.figures.learn  # noqa: F401
    import analysis.worked_example  # noqa: F401  (spider's methods: the Learn page)

    # not the app's own modules: their st.cache_data functions belong to the server's runtime
    # torch imports more on first use (torch._dynamo for an optimizer, torch.distributed for
    # a method's parameters): one small worked example, the Learn page's own, pulls it in
    from analysis.worked_example import ExampleSettings, run_worked_example

    example = run_worked_example(ExampleSettings(steps=1))
    _warm_figures(example)
    return time.perf_counter() - start


def _warm_figures(example) -> None:
    """Draw and serialise the Learn page's figures once, as ``st.plotly_chart`` does: plotly
    imports each trace's and layout part's classes on first use (heatmap, shapes,
    annotations, axis titles), and Streamlit imports ``plotly.tools`` and the JSON writer on
    its first chart, ~40 modules the first page otherwise imports while the browser waits.
    The icon names a page validates (``page_icon``, ``:material/...``) are imported too."""
    import plotly.io
    import plotly.tools  # noqa: F401  (st.plotly_chart imports it on its first chart)
    import streamlit.emojis  # noqa: F401
    import streamlit.material_icon_names  # noqa: F401

    from analysis.figures.learn import Panel, example_history, matrix_grid, tie_scatter

    last = example.last
    figures = (
        matrix_grid([[Panel("θ0", example.theta0, "signed", "theta0"),
                      Panel("w", last.mask, "mask")]], marked=[(0, 0)], marked_label="tie"),
        example_history(example.history, current_step=1),
        tie_scatter(last.importance_pre, last.importance_ft, last.mask, marked=[(0, 0)]),
    )
    for figure in figures:
        plotly.io.to_json(figure, validate=False)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    seconds = warm_imports()
    print(f"Spiderscope: imports done in {seconds:.1f} s; starting the server.", flush=True)
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *argv]
    cli.main()


if __name__ == "__main__":
    main()
