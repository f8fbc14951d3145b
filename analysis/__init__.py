"""Spiderscope analysis: run data -> tidy pandas DataFrames -> plotly figures.

``run`` reads run directories (``load_run``, ``list_runs``), ``stats`` computes (DataFrame
in, DataFrame out, fixed columns), ``heatmaps`` pools big tensors for display, ``figures``
draws (one module per kind of figure; pure functions to ``go.Figure``, no I/O) and
``report`` lays runs out as one HTML file (``python -m analysis.report``; imported on first
use of ``analysis.report`` or ``analysis.write_report``).
"""

from analysis import figures, heatmaps, stats
from analysis.figures import figure_json_size, tensor_panels, tradeoff_plane
from analysis.heatmaps import Downsampled, downsample
from analysis.run import LIST_COLUMNS, TENSOR_KINDS, Run, RunReadError, list_runs, load_run
from analysis.stats import (
    CELLS,
    LAYERS_COLUMNS,
    METRICS_COLUMNS,
    SUMMARY_COLUMNS,
    TRAIN_COLUMNS,
    cells_table,
    layer_discrepancy,
    mask_density,
    moved_overlap,
    score_table,
    stream_tensor_stats,
    summary_table,
    tensor_discrepancy,
    to_csv,
    update_cosine,
    update_share,
    update_size,
)

__all__ = [
    "CELLS",
    "LAYERS_COLUMNS",
    "LIST_COLUMNS",
    "METRICS_COLUMNS",
    "SUMMARY_COLUMNS",
    "TENSOR_KINDS",
    "TRAIN_COLUMNS",
    "Downsampled",
    "Run",
    "RunReadError",
    "cells_table",
    "downsample",
    "figure_json_size",
    "figures",
    "heatmaps",
    "layer_discrepancy",
    "list_runs",
    "load_run",
    "mask_density",
    "moved_overlap",
    "report",
    "score_table",
    "stats",
    "stream_tensor_stats",
    "summary_table",
    "tensor_discrepancy",
    "tensor_panels",
    "to_csv",
    "tradeoff_plane",
    "update_cosine",
    "update_share",
    "update_size",
    "write_report",
]


def __getattr__(name: str):
    # ``report`` is imported on demand, so that ``python -m analysis.report`` does not find
    # it already imported by this package (runpy warns about that).
    if name in ("report", "write_report"):
        import importlib

        report = importlib.import_module("analysis.report")
        return report if name == "report" else report.write_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
