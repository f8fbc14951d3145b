"""Figures of one parameter tensor beyond :func:`analysis.figures.tensor_panels`: value
histograms side by side, and where a what-if mask differs from the trained one.

Pure functions (tensors in, ``go.Figure`` out); every figure is binned or pooled here, so its
JSON stays small whatever the tensor's size.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.heatmaps import downsample

HIST_TITLES = {
    "importance_pre": "I: pre-training importance",
    "importance_ft": "G: fine-tuning importance",
    "mask": "w: keep-weight",
    "delta": "Δ = θ − θ0",
    "weight": "θ: weight",
}
_COLORS = {"importance_pre": "#440154", "importance_ft": "#21918c", "mask": "#2171b5",
           "delta": "#d6604d", "weight": "#636363"}
# kinds whose exact zeros (and, for the mask, exact ones) mean something of their own
_EXACT = {"mask": (0.0, 1.0), "delta": (0.0,)}


def _bins(x: torch.Tensor, kind: str, bins: int) -> tuple[float, float]:
    if kind in ("importance_pre", "importance_ft", "mask"):
        return 0.0, 1.0
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return -1.0, 1.0
    bound = float(finite.abs().max())
    return (-bound, bound) if bound > 0 else (-1.0, 1.0)


def value_histograms(views: Mapping[str, torch.Tensor], bins: int = 40) -> go.Figure:
    """One histogram per kind, side by side (share of entries per bin).

    Exact zeros of the mask and of Δ (weights pinned to θ0, or unchanged) and exact ones of
    the mask (fully free) are counted apart and named in the panel title, so that they do
    not hide in the edge bins.
    """
    if not views:
        raise ValueError("value_histograms needs at least one tensor")
    panels = []  # (kind, title, bar centres, shares, edges)
    for kind, tensor in views.items():
        x = torch.as_tensor(tensor).detach().reshape(-1).float().cpu()
        n = max(x.numel(), 1)
        notes = []
        keep = torch.isfinite(x)
        for value in _EXACT.get(kind, ()):
            exact = x == value
            notes.append(f"= {value:g}: {float(exact.sum()) / n:.1%}")
            keep &= ~exact
        low, high = _bins(x, kind, bins)
        shares = torch.histc(x[keep], bins=bins, min=low, max=high).double().numpy() / n
        title = html.escape(HIST_TITLES.get(kind, kind))
        if notes:
            title += f"<br><sup>{'; '.join(notes)} (not in the bars)</sup>"
        panels.append((kind, title, shares, np.linspace(low, high, bins + 1)))
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.06,
                        subplot_titles=[title for _, title, _, _ in panels])
    for col, (kind, _, shares, edges) in enumerate(panels, start=1):
        fig.add_trace(go.Bar(
            x=(edges[:-1] + edges[1:]) / 2, y=shares, width=float(edges[1] - edges[0]),
            marker_color=_COLORS.get(kind, "#636363"), name=kind, showlegend=False,
            customdata=np.column_stack([edges[:-1], edges[1:]]),
            hovertemplate=(f"{html.escape(HIST_TITLES.get(kind, kind))}<br>"
                           "[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y:.2%} of entries"
                           "<extra></extra>"),
        ), row=1, col=col)
        fig.update_xaxes(title_text="value", row=1, col=col)
    fig.update_annotations(font_size=13)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    fig.update_yaxes(title_text="share of entries", row=1, col=1)
    fig.update_layout(height=300, margin={"t": 70, "b": 40, "l": 50, "r": 10}, bargap=0)
    return fig


def mask_change(mask: torch.Tensor, mask_alt: torch.Tensor, param: str, what_if: str,
                max_cells: int = 256) -> go.Figure:
    """Where a what-if mask differs from the trained one: ``w_what_if − w``, pooled by block
    mean (red: the what-if frees more, blue: it frees less, white: no change)."""
    diff = torch.as_tensor(mask_alt).float() - torch.as_tensor(mask).float()
    pooled = downsample(diff, max_cells=max_cells, reduce="mean")
    values = pooled.values
    finite = np.abs(values[np.isfinite(values)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fr, fc = pooled.block
    pooled_note = f"pooled cell ({fr}×{fc} weights), mean change" if fr * fc > 1 else "change"
    where = "rows %{y}, cols %{x}" if fr * fc > 1 else "row %{y}, col %{x}"
    fig = go.Figure(go.Heatmap(
        z=values, x=pooled.col_labels(), y=pooled.row_labels(), colorscale="RdBu_r",
        zmin=-bound, zmax=bound, colorbar={"title": {"text": "Δw", "side": "top"}},
        hovertemplate=(f"<b>{html.escape(param)}</b><br>{where}<br>{pooled_note} in w: "
                       "%{z:.3g}<extra></extra>"),
    ))
    rows, cols = pooled.shape
    fig.update_yaxes(type="category", autorange="reversed", nticks=10,
                     title_text="row (output dim)")
    fig.update_xaxes(type="category", nticks=6, title_text="column (input dim)")
    fig.update_layout(
        title=(f"w under {html.escape(what_if)} minus w as trained — {rows}×{cols}"
               + (f", each cell pools {fr}×{fc} weights" if fr * fc > 1 else "")),
        height=420, margin={"t": 60, "b": 40, "l": 60, "r": 10},
    )
    return fig
