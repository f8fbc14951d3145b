"""``python -m app [STREAMLIT OPTIONS]``: the app, served with its heavy imports done first.

``streamlit run app/streamlit_app.py`` imports nothing until the first browser connects, so
the first page waits for torch, pandas and plotly (seconds on a busy machine) after the URL
is printed. Here they are imported before the server starts: once the URL appears, the first
page is quick. Options are passed to ``streamlit run`` (e.g. ``--server.port 8502``).
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

    run_worked_example(ExampleSettings(steps=1))

    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    seconds = warm_imports()
    print(f"Spiderscope: imports done in {seconds:.1f} s; starting the server.", flush=True)
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(APP), *argv]
    cli.main()


if __name__ == "__main__":
    main()
