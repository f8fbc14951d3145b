"""Plotly figures of runs, one module per kind of figure: pure functions from DataFrames (or
tensors) to ``go.Figure``, no I/O. The app's pages and the HTML report (``analysis.report``)
draw with the same functions, so the same thing looks the same in both.

* :mod:`~analysis.figures.style` — colours (per run, per method, per component), marker
  symbols, step and log axes, the JSON budget (:data:`MAX_FIGURE_BYTES`);
* :mod:`~analysis.figures.curves` — scores and training loss over training;
* :mod:`~analysis.figures.tradeoff` — the trade-off plane U vs D with lines of equal H;
* :mod:`~analysis.figures.heatmaps` — layers x steps of one statistic; runs x 2x2 cells;
* :mod:`~analysis.figures.layers` — bars per layer at one step;
* :mod:`~analysis.figures.tensors` — one tensor's I, G, w, Δ panels, histograms, what-if;
* :mod:`~analysis.figures.learn` — the Learn page's worked example.
* :mod:`~analysis.figures.attribution` — why a run forgot: reverting groups, output drift,
  forgetting F against kl_to_base across runs.

Labels, formats and colour scales of statistics come from :mod:`spider.statistics`. Names are
importable from this package (``from analysis.figures import tradeoff_plane``); each module is
imported on first use, so a page that draws no tensor does not import torch for it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "style": ("MAX_FIGURE_BYTES", "COMPONENT_COLORS", "RUN_PALETTE", "method_color",
              "figure_json_size", "run_colors", "method_symbol", "step_axis", "log_axis"),
    "curves": ("compare_score_curves", "compare_loss_curves"),
    "tradeoff": ("ISO_H_LEVELS", "iso_h_curve", "place_labels", "tradeoff_plane"),
    "heatmaps": ("HEATMAP_SCALES", "heatmap_range", "range_words", "layer_step_heatmap",
                 "cells_heatmap"),
    "layers": ("layer_bars",),
    "tensors": ("panel_cells", "panel_block", "cell_words", "tensor_panels",
                "value_histograms", "mask_change", "mask_flip_map", "region_panels",
                "REGION_FULL"),
    "learn": ("Panel", "matrix_grid", "example_history", "tie_scatter"),
    "attribution": ("DRIFT_METRICS", "attribution_bars", "drift_curves",
                    "forgetting_drift_table", "forgetting_vs_drift"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"analysis.figures.{_MODULE_OF[name]}"), name)
    if name in _WHERE:
        return importlib.import_module(f"analysis.figures.{name}")
    raise AttributeError(f"module 'analysis.figures' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_WHERE])
