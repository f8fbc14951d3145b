"""Spiderscope's library: SPIDER and its baselines as pluggable methods, model and data
loading for local LLaVA-style models, and the training runner.

Imports go one way: ``spider`` <- ``analysis`` <- ``app``. Nothing here imports plotly or
streamlit.
"""

__version__ = "0.1.0"
