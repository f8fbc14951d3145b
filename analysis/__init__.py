"""Spiderscope analysis: run data -> tidy pandas DataFrames -> plotly figures.

``stats`` computes (DataFrame in, DataFrame out, fixed columns), ``heatmaps`` pools big
tensors for display, ``figures`` draws (pure functions to ``go.Figure``, no I/O).
"""

from analysis import figures, heatmaps, stats
from analysis.figures import (
    discrepancy_bars,
    figure_json_size,
    mask_density_heatmap,
    mask_histogram,
    score_curves,
    tensor_panels,
    tradeoff_plane,
)
from analysis.heatmaps import Downsampled, downsample
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
    "METRICS_COLUMNS",
    "SUMMARY_COLUMNS",
    "TRAIN_COLUMNS",
    "Downsampled",
    "cells_table",
    "discrepancy_bars",
    "downsample",
    "figure_json_size",
    "figures",
    "heatmaps",
    "layer_discrepancy",
    "mask_density",
    "mask_density_heatmap",
    "mask_histogram",
    "moved_overlap",
    "score_curves",
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
]
