"""Spiderscope's app: ``streamlit run app/streamlit_app.py`` (from any folder).

This entry script sets the page up, draws the shared sidebar (``app/common.py``) and hands
over to the page chosen in the navigation. Each page is a thin script in ``app/views/``:
widgets -> a cached call into ``analysis``/``spider`` -> a figure ->
``presentation.show_figure`` (``st.plotly_chart`` with presentation mode and export settings).

The folder is not called ``pages``: Streamlit treats a ``pages/`` folder beside the entry
script as its older multipage mode, and a server whose first request is a page's address
(a bookmarked ``/compare?runs=...`` after a restart) would then run that page alone, without
this script's navigation and sidebar.
"""

import sys
from pathlib import Path

# ``streamlit run`` puts only this file's folder on sys.path; the pages import the
# ``app``, ``analysis`` and ``spider`` packages from the repository root.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import streamlit as st  # noqa: E402

from app import common, presentation  # noqa: E402

st.set_page_config(page_title="Spiderscope", page_icon="🕷️", layout="wide")

_PAGES = Path(__file__).resolve().parent / "views"
# presentation mode hides the sidebar: the pages' navigation moves to the top bar
page = st.navigation([
    st.Page(_PAGES / "learn.py", title="Learn", default=True),
    st.Page(_PAGES / "compare.py", title="Compare"),
    st.Page(_PAGES / "layers.py", title="Layers"),
    st.Page(_PAGES / "parameters.py", title="Parameters"),
    st.Page(_PAGES / "forgetting.py", title="Why it forgot"),
    st.Page(_PAGES / "train.py", title="Train"),
], position="top" if presentation.active() else "sidebar")
presentation.toggle()
common.sidebar()
common.sync_url()
page.run()
