"""One parameter tensor up close: I, G, the mask w and the update Δ side by side as heatmaps,
value histograms, where a what-if mask differs from the trained one, where the mask side
flipped between two checkpoints, and a region of the tensor at full resolution.

Pure functions (tensors in, ``go.Figure`` out). A tensor is drawn weight by weight when it
fits the figure budget, else pooled by :func:`analysis.heatmaps.downsample` by the smallest
factor that fits (:func:`panel_cells`); :func:`cell_words` says which, for the page.
Importances use Viridis on [0, 1], masks Blues on [0, 1], updates a red–blue scale symmetric
about 0 (white = no change).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.figures.style import MAX_FIGURE_BYTES
from analysis.heatmaps import as_2d, downsample

# Colour scale per tensor kind (names of ``Run.tensor`` kinds and their short forms).
_PANEL_KINDS = {
    "importance_pre": ("importance", "I: pre-training importance"),
    "i": ("importance", "I: pre-training importance"),
    "importance_ft": ("importance", "G: fine-tuning importance"),
    "g": ("importance", "G: fine-tuning importance"),
    "mask": ("mask", "w: keep-weight (1 free, 0 pinned)"),
    "w": ("mask", "w: keep-weight (1 free, 0 pinned)"),
    "delta": ("update", "Δ = θ − θ0: update"),
    "δ": ("update", "Δ = θ − θ0: update"),
    "weight": ("update", "θ: weight"),
}


_KIND_STYLE = {  # colour scale, reduction used by downsample, what a cell shows
    "importance": ("Viridis", "mean", "block mean"),
    "mask": ("Blues", "mean", "block mean (density)"),
    "update": ("RdBu_r", "maxabs", "largest |x| in block"),
}


def _pool_panel(name: str, tensor: torch.Tensor, cells: int):
    """``(kind, label, Downsampled)``: a known kind pools its own way, others by ``auto``."""
    key = name.strip().lower()
    if key in _PANEL_KINDS:
        kind, label = _PANEL_KINDS[key]
        return kind, label, downsample(tensor, max_cells=cells, reduce=_KIND_STYLE[kind][1])
    pooled = downsample(tensor, max_cells=cells)  # mean if all in [0, 1], else max-|x|
    return ("importance" if pooled.reduce == "mean" else "update"), name, pooled


def panel_cells(n_panels: int, budget_bytes: int = 1_200_000,
                shape: tuple[int, int] | None = None) -> int | tuple[int, int]:
    """Cells per axis for ``n_panels`` heatmaps to fit ``budget_bytes`` of JSON.

    A float32 cell costs 4 bytes, 5.33 in base64. Without ``shape``: one limit for both axes,
    at most 512. With the tensor's 2-D ``shape``: ``(rows, cols)`` limits that pool only as
    much as the figure budget (:data:`MAX_FIGURE_BYTES`, less room for the rest) demands, so
    that a tensor which fits is drawn weight by weight (one cell = one weight), and a larger
    one is pooled by the same small factor on both axes.
    """
    if shape is None:
        return max(16, min(512, int(math.sqrt(budget_bytes / (5.34 * max(n_panels, 1))))))
    rows, cols = (max(int(n), 1) for n in shape)
    budget = int(0.8 * MAX_FIGURE_BYTES / (5.34 * max(n_panels, 1)))  # cells per panel
    if rows * cols <= budget:
        return rows, cols
    factor = math.sqrt(rows * cols / budget)
    while math.ceil(rows / math.ceil(factor)) * math.ceil(cols / math.ceil(factor)) > budget:
        factor += 1
    factor = math.ceil(factor)
    return math.ceil(rows / factor), math.ceil(cols / factor)


def panel_block(shape: tuple[int, int], n_panels: int) -> tuple[int, int]:
    """``(rows, cols)`` of weights one cell of :func:`tensor_panels` covers for a tensor of
    2-D ``shape`` drawn in ``n_panels`` panels: ``(1, 1)`` when it is drawn weight by weight."""
    limit_rows, limit_cols = panel_cells(n_panels, shape=shape)
    return math.ceil(shape[0] / limit_rows), math.ceil(shape[1] / limit_cols)


def cell_words(block: tuple[int, int], shape: tuple[int, int]) -> str:
    """What one heatmap cell is, in a sentence for beside the chart."""
    rows, cols = shape
    if block == (1, 1):
        return (f"Each cell is one weight: the {rows}×{cols} tensor is drawn whole, "
                f"{rows * cols:,} cells; zoom in to see single entries.")
    fr, fc = block
    return (f"Each cell pools a block of {fr}×{fc} weights (the {rows}×{cols} tensor is too "
            "large to send whole): masks and importances show the block mean, Δ the "
            "block's largest change with its sign. The .npz download holds every weight.")


def _z_range(kind: str, values: np.ndarray) -> tuple[float, float]:
    """A panel's colour range: ±max|x| for updates and weights (signed, centred on 0; ±1 when
    all are 0 or not finite), [0, 1] for importances and masks."""
    if kind == "update":
        finite = np.abs(values[np.isfinite(values)])
        bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        return -bound, bound
    return 0.0, 1.0


def tensor_panels(panels: Mapping[str, object], param: str, max_cells: int | None = None,
                  ranges: Mapping[str, tuple[float, float]] | None = None) -> go.Figure:
    """One parameter tensor seen several ways, side by side: I, G, mask, Δ, ...

    ``panels`` maps a kind (``importance_pre``/``I``, ``importance_ft``/``G``, ``mask``/``w``,
    ``delta``/``Δ``, ``weight``, or any name) to an array of the parameter's shape. Each
    panel is pooled with :func:`analysis.heatmaps.downsample` to ``max_cells`` per axis
    (default: what fits the 2 MB figure budget): importances and masks by block mean, updates
    and weights by largest |x| with sign. Axes are shared (zoom one, zoom all; row 0 at the
    top); each kind has a fixed colour range: [0, 1] for importances and masks, ±max|x| of
    the panel for updates. ``ranges`` overrides a panel's ``(zmin, zmax)`` by name, e.g. to
    give the Δ of two methods, in two figures, the same scale. Hover names the parameter and
    the original rows and columns a cell covers.
    """
    if not panels:
        raise ValueError("tensor_panels needs at least one panel")
    tensors = {name: as_2d(value) for name, value in panels.items()}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"panels of {param} differ in shape: {shapes}")
    cells = max_cells or panel_cells(len(tensors), shape=next(iter(shapes.values())))

    pooled = {name: _pool_panel(name, tensor, cells) for name, tensor in tensors.items()}
    first = next(iter(pooled.values()))[2]
    x_labels, y_labels, axis_type = first.axes()
    fr, fc = first.block

    n = len(pooled)
    fig = make_subplots(
        rows=1, cols=n, shared_yaxes=True, horizontal_spacing=0.02 if n > 1 else 0.0,
        subplot_titles=[f"{html.escape(label)}<br><sup>cell = "
                        + (_KIND_STYLE[kind][2] if cell.block != (1, 1) else "one weight")
                        + "</sup>" for kind, label, cell in pooled.values()],
    )
    fig.update_annotations(font_size=13)
    safe_param = html.escape(param)
    for col, (name, (kind, label, cell)) in enumerate(pooled.items(), start=1):
        colorscale, _, shows = _KIND_STYLE[kind]
        if ranges and name in ranges:
            zmin, zmax = (float(v) for v in ranges[name])
        else:
            zmin, zmax = _z_range(kind, cell.values)
        domain = fig.layout[f"xaxis{col if col > 1 else ''}"].domain
        fig.add_trace(go.Heatmap(
            z=cell.values, x=x_labels, y=y_labels, name=name,
            colorscale=colorscale, zmin=zmin, zmax=zmax,
            colorbar={"orientation": "h", "x": (domain[0] + domain[1]) / 2, "xanchor": "center",
                      "len": (domain[1] - domain[0]) * 0.9, "y": -0.3, "yanchor": "top",
                      "thickness": 12,
                      "title": {"text": html.escape(label.partition(":")[0]), "side": "top"}},
            hovertemplate=(f"<b>{safe_param}</b><br>{html.escape(label)}<br>" + (
                f"rows %{{y}}, cols %{{x}}<br>pooled cell ({fr}×{fc} weights), {shows}: "
                if fr * fc > 1 else "row %{y}, col %{x}<br>value: ") + "%{z:.4g}<extra></extra>"),
        ), row=1, col=col)
        fig.update_xaxes(type=axis_type, matches="x" if col > 1 else None, row=1, col=col,
                         title_text="column (input dim)", nticks=5)
    fig.update_yaxes(type=axis_type, autorange="reversed", nticks=10)
    fig.update_yaxes(title_text="row (output dim)", row=1, col=1)
    rows, cols = first.shape
    fig.update_layout(
        title=(f"{safe_param} — {rows}×{cols}"
               + (f", each cell pools {fr}×{fc} weights" if fr * fc > 1 else "")),
        height=580, margin={"b": 180, "t": 110},
    )
    return fig


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
    x, y, axis_type = pooled.axes()
    fig = go.Figure(go.Heatmap(
        z=values, x=x, y=y, colorscale="RdBu_r",
        zmin=-bound, zmax=bound, colorbar={"title": {"text": "Δw", "side": "top"}},
        hovertemplate=(f"<b>{html.escape(param)}</b><br>{where}<br>{pooled_note} in w: "
                       "%{z:.3g}<extra></extra>"),
    ))
    rows, cols = pooled.shape
    fig.update_yaxes(type=axis_type, autorange="reversed", nticks=10,
                     title_text="row (output dim)")
    fig.update_xaxes(type=axis_type, nticks=6, title_text="column (input dim)")
    fig.update_layout(
        title=(f"w under {html.escape(what_if)} minus w as trained — {rows}×{cols}"
               + (f", each cell pools {fr}×{fc} weights" if fr * fc > 1 else "")),
        height=420, margin={"t": 60, "b": 40, "l": 60, "r": 10},
    )
    return fig


def mask_flip_map(flips: torch.Tensor, param: str, step_a: int, step_b: int,
                  max_cells: int | tuple[int, int] | None = None) -> go.Figure:
    """Where the mask side changed between two checkpoints (``analysis.tensors.mask_flips``:
    +1 pinned → free, −1 free → pinned, 0 same side), drawn entry by entry when the tensor
    fits the figure budget (:func:`panel_cells`; or ``max_cells`` per axis), else pooled by
    block mean (the net share that flipped: red freed, blue pinned)."""
    flips = as_2d(torch.as_tensor(flips).float())
    cells = max_cells or panel_cells(1, shape=tuple(flips.shape))
    pooled = downsample(flips, max_cells=cells, reduce="mean")
    fr, fc = pooled.block
    one = fr * fc == 1
    what = ("+1 pinned → free, −1 free → pinned: %{z:.0f}" if one else
            f"pooled cell ({fr}×{fc} weights), net share flipped (freed − pinned): %{{z:.3f}}")
    where = "row %{y}, col %{x}" if one else "rows %{y}, cols %{x}"
    x, y, axis_type = pooled.axes()
    fig = go.Figure(go.Heatmap(
        z=pooled.values, x=x, y=y, colorscale="RdBu_r",
        zmin=-1, zmax=1, colorbar={"title": {"text": "flip", "side": "top"}},
        hovertemplate=f"<b>{html.escape(param)}</b><br>{where}<br>{what}<extra></extra>",
    ))
    rows, cols = pooled.shape
    fig.update_yaxes(type=axis_type, autorange="reversed", nticks=10,
                     title_text="row (output dim)")
    fig.update_xaxes(type=axis_type, nticks=6, title_text="column (input dim)")
    fig.update_layout(
        title=(f"Mask flips from step {int(step_a)} to step {int(step_b)} — {rows}×{cols}"
               + (f", each cell pools {fr}×{fc} weights" if not one else "")),
        height=420, margin={"t": 60, "b": 40, "l": 60, "r": 10},
    )
    return fig


REGION_FULL = 256
"""A region of at most this many rows and columns is drawn entry by entry, never pooled."""


def region_panels(views: Mapping[str, torch.Tensor], param: str, rows: tuple[int, int],
                  cols: tuple[int, int], max_cells: int = REGION_FULL) -> go.Figure:
    """Rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of every view (a kind, as in
    :func:`tensor_panels`), side by side. Within ``max_cells`` per axis each cell is one
    weight, and hover gives its row, column (of the whole tensor) and its exact float32
    value; a larger region is pooled as :func:`tensor_panels` pools."""
    if not views:
        raise ValueError("region_panels needs at least one view")
    (r0, r1), (c0, c1) = rows, cols
    parts = {name: as_2d(t)[r0:r1, c0:c1] for name, t in views.items()}
    n = len(parts)
    pooled = {name: _pool_panel(name, part, max_cells) for name, part in parts.items()}
    first = next(iter(pooled.values()))[2]
    fr, fc = first.block
    one = fr * fc == 1
    if one:
        x, y = list(range(c0, c1)), list(range(r0, r1))
    else:
        x = [f"{a + c0}–{b - 1 + c0}" for a, b in zip(first.col_edges[:-1], first.col_edges[1:])]
        y = [f"{a + r0}–{b - 1 + r0}" for a, b in zip(first.row_edges[:-1], first.row_edges[1:])]
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True,
                        horizontal_spacing=0.02 if n > 1 else 0.0,
                        subplot_titles=[html.escape(label) for _, label, _ in pooled.values()])
    safe_param = html.escape(param)
    for col, (name, (kind, label, cell)) in enumerate(pooled.items(), start=1):
        colorscale = _KIND_STYLE[kind][0]
        zmin, zmax = _z_range(kind, cell.values)
        domain = fig.layout[f"xaxis{col if col > 1 else ''}"].domain
        fig.add_trace(go.Heatmap(
            z=cell.values.astype(np.float32), x=x, y=y, name=name, colorscale=colorscale,
            zmin=zmin, zmax=zmax,
            colorbar={"orientation": "h", "x": (domain[0] + domain[1]) / 2,
                      "xanchor": "center", "len": (domain[1] - domain[0]) * 0.9, "y": -0.25,
                      "yanchor": "top", "thickness": 12,
                      "title": {"text": html.escape(label.partition(":")[0]), "side": "top"}},
            hovertemplate=(f"<b>{safe_param}</b><br>{html.escape(label)}<br>" + (
                "row %{y}, col %{x}<br>value %{z:.9g}" if one else
                f"rows %{{y}}, cols %{{x}}<br>pooled cell ({fr}×{fc} weights): %{{z:.4g}}")
                + "<extra></extra>"),
        ), row=1, col=col)
        fig.update_xaxes(matches="x" if col > 1 else None, row=1, col=col,
                         title_text="column", **({} if one else {"type": "category"}))
    fig.update_yaxes(autorange="reversed", **({} if one else {"type": "category"}))
    fig.update_yaxes(title_text="row", row=1, col=1)
    fig.update_layout(
        title=(f"{safe_param} — rows {r0}–{r1 - 1}, columns {c0}–{c1 - 1}"
               + (", one cell per weight" if one else f", each cell pools {fr}×{fc} weights")),
        height=520, margin={"b": 150, "t": 100},
    )
    return fig
