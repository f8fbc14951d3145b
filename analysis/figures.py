"""Plotly figures of runs: pure functions from DataFrames (or arrays) to ``go.Figure``.

No I/O and no computation beyond shaping: the numbers come from :mod:`analysis.stats` and
:mod:`analysis.heatmaps`. Conventions every figure follows, so that panels can be compared
by eye:

* a method has the same colour everywhere (:func:`method_color`); a component likewise
  (:data:`COMPONENT_COLORS`);
* masks and importances use fixed colour ranges [0, 1]; updates use a range symmetric about
  0 (white = no change);
* axes say what they measure and in which unit; hover text names the run, parameter or layer;
* large data are pooled or binned here, never shipped raw: every figure's JSON stays under
  :data:`MAX_FIGURE_BYTES` (check with :func:`figure_json_size`).
"""

from __future__ import annotations

import html
import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analysis import stats
from analysis.heatmaps import as_2d, downsample
from spider.metrics import harmonic_mean

MAX_FIGURE_BYTES = 2_000_000
"""What one figure may weigh as JSON when sent to a browser."""

COMPONENT_ORDER = ("vision", "projector", "llm", "other")
COMPONENT_COLORS = {
    "vision": "#1f77b4", "projector": "#ff7f0e", "llm": "#2ca02c", "other": "#7f7f7f",
}
_METHOD_COLORS = {
    "spider": "#d62728", "full": "#1f77b4", "magnitude_mask": "#9467bd", "random_mask": "#8c564b",
    "l2": "#e377c2", "dare": "#bcbd22", "wise_ft": "#17becf", "tailor": "#ff7f0e",
    "hft": "#2ca02c", "lora": "#7f7f7f",
}
_SPLIT_DASH = {"upstream": "solid", "downstream": "dash"}
_DISCREPANCY_AXES = {  # value column -> y-axis title
    "discrepancy_mean": "mean G − I (rank units; > 0: task values the weights more)",
    "frac_ft_gt_pre": "share of weights with G > I",
    "correlation": "correlation of I and G (Pearson r; 0: unrelated)",
}
_RUN_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "cross")
NON_BLOCK = "non-block"
"""Layer label of parameters outside transformer blocks (embeddings, final norm, lm_head)."""

ISO_H_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

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


def method_color(method: str) -> str:
    """The colour of ``method`` in every figure (known methods fixed, others by name hash)."""
    if method in _METHOD_COLORS:
        return _METHOD_COLORS[method]
    palette = qualitative.Dark24
    return palette[zlib.crc32(str(method).encode()) % len(palette)]


def figure_json_size(fig: go.Figure) -> int:
    """Bytes of the figure's JSON (what ``st.plotly_chart`` sends to the browser)."""
    return len(fig.to_json().encode("utf-8"))


def layer_label(layer) -> str:
    """``"3"`` for block 3, :data:`NON_BLOCK` for a missing layer."""
    return NON_BLOCK if layer is None or pd.isna(layer) else str(int(layer))


def _pick_run(df: pd.DataFrame, run: str | None, what: str) -> str:
    runs = list(pd.unique(df["run"]))
    if run is None:
        if len(runs) != 1:
            raise ValueError(f"{what} shows one run; pass run= one of {runs}")
        return runs[0]
    if run not in runs:
        raise ValueError(f"run {run!r} not in the {what} data; runs: {runs}")
    return run


def _components(values) -> list[str]:
    present = list(pd.unique(values))
    return [c for c in COMPONENT_ORDER if c in present] + sorted(
        c for c in present if c not in COMPONENT_ORDER
    )


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def score_curves(metrics_df: pd.DataFrame, splits: Sequence[str] = ("upstream", "downstream")
                 ) -> go.Figure:
    """Upstream and downstream score against training step, every run on one chart.

    Colour = method, dash = split (solid upstream, dashed downstream): forgetting shows as a
    solid line falling while its dashed partner rises.
    """
    stats.require_columns(metrics_df, stats.METRICS_COLUMNS, "metrics DataFrame")
    rows = metrics_df[(metrics_df["metric"] == "score") & metrics_df["split"].isin(splits)]
    rows = rows.drop_duplicates(subset=["run", "step", "split"], keep="last")
    fig = go.Figure()
    for run in pd.unique(metrics_df["run"]):
        mine = rows[rows["run"] == run]
        if mine.empty:
            continue
        method = str(mine["method"].iloc[0])
        for split in splits:
            line = mine[mine["split"] == split].sort_values("step")
            if line.empty:
                continue
            name = f"{run} · {split}"
            fig.add_trace(go.Scatter(
                x=line["step"].to_numpy(), y=line["value"].to_numpy(dtype=float),
                mode="lines+markers", name=name, legendgroup=str(run),
                line={"color": method_color(method), "dash": _SPLIT_DASH.get(split, "dot")},
                marker={"size": 5},
                hovertemplate=(f"<b>{html.escape(str(run))}</b> ({html.escape(method)})<br>"
                               f"{html.escape(split)} score %{{y:.3f}}<br>step %{{x}}"
                               "<extra></extra>"),
            ))
    fig.update_layout(
        title="Upstream (pre-training ability) and downstream (task) score over training",
        xaxis_title="training step",
        yaxis_title="score (split's main metric, 0–1)",
        yaxis_range=[0, 1.02],
        legend_title_text="run · split (colour = method)",
        hovermode="closest",
    )
    return fig


def iso_h_curve(h: float, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Points (U, D) in [0, 1]² with harmonic mean 2UD/(U + D) = ``h``.

    Solving for D: D = hU / (2U − h), defined for U > h/2; D ≤ 1 needs U ≥ h / (2 − h).
    """
    u = np.linspace(h / (2.0 - h), 1.0, points)
    return u, h * u / (2.0 * u - h)


def tradeoff_plane(data: pd.DataFrame, h_levels: Sequence[float] = ISO_H_LEVELS,
                   colors: Mapping[str, str] | None = None,
                   symbols: Mapping[str, str] | None = None) -> go.Figure:
    """Upstream U (x) against downstream D (y): where each run ends, and how it got there.

    ``data`` is a metrics frame (each run's path over its evaluated steps, final step
    marked) or a summary frame with U and D columns (final points only). Grey dotted lines
    join points of equal H = 2UD/(U + D), the SPIDER paper's balance score: moving across
    them is a real gain, moving along them is a trade. ``colors`` / ``symbols`` map a run to
    its colour and marker symbol (default: the method's colour, markers told apart by run).
    """
    fig = go.Figure()
    for h in h_levels:
        u, d = iso_h_curve(h)
        fig.add_trace(go.Scatter(
            x=u, y=d, mode="lines", name=f"H = {h:g}", meta={"H": h}, showlegend=False,
            line={"color": "rgba(120,120,120,0.6)", "dash": "dot", "width": 1},
            hovertemplate=f"iso-H line: H = {h:g}<extra></extra>",
        ))
        fig.add_annotation(x=1.0, y=float(d[-1]), text=f"H={h:g}", showarrow=False,
                           xanchor="left", font={"size": 10, "color": "gray"})

    if {"U", "D"} <= set(data.columns):
        stats.require_columns(data, ("run", "method", "U", "D"), "summary DataFrame")
        path = pd.DataFrame({"run": data["run"], "method": data["method"],
                             "step": data["step"] if "step" in data.columns else np.nan,
                             "U": data["U"], "D": data["D"]}).dropna(subset=["U", "D"])
    else:
        path = stats.score_table(data)

    runs = pd.unique(path["run"])
    seen_methods: dict[str, int] = {}
    for run in runs:
        mine = path[path["run"] == run]
        method = str(mine["method"].iloc[0])
        color = (colors or {}).get(run) or method_color(method)
        # runs of one method share its colour; their markers differ (e.g. full vs hybrid)
        symbol = (symbols or {}).get(run) or _RUN_SYMBOLS[seen_methods.get(method, 0)
                                                          % len(_RUN_SYMBOLS)]
        seen_methods[method] = seen_methods.get(method, 0) + 1
        label = f"{html.escape(str(run))} ({html.escape(method)})"
        hover = (f"<b>{label}</b><br>step %{{customdata[0]}}<br>U %{{x:.3f}}, D %{{y:.3f}}"
                 "<br>H %{customdata[1]:.3f}<extra></extra>")
        u, d = mine["U"].to_numpy(float), mine["D"].to_numpy(float)
        h = harmonic_mean(u, d)
        steps = pd.to_numeric(mine["step"], errors="coerce").to_numpy(float)
        custom = np.column_stack([steps, h])
        if len(mine) > 1:
            fig.add_trace(go.Scatter(
                x=u, y=d, mode="lines+markers", name=f"{run} path", legendgroup=str(run),
                showlegend=False, line={"color": color, "width": 1},
                marker={"size": 5, "color": color}, customdata=custom, hovertemplate=hover,
            ))
        fig.add_trace(go.Scatter(
            # names beside the points only while few enough not to overprint each other
            x=u[-1:], y=d[-1:], mode="markers+text" if len(runs) <= 4 else "markers",
            name=str(run), legendgroup=str(run), text=[str(run)], textposition="top center",
            marker={"size": 13, "color": color, "symbol": symbol,
                    "line": {"color": "black", "width": 1}},
            customdata=custom[-1:], hovertemplate=hover, meta={"final": True},
        ))
    fig.update_layout(
        title="Trade-off: upstream ability kept (U) vs downstream task learned (D)",
        xaxis={"title": "upstream score U (0–1, higher = less forgetting)",
               "range": [0, 1.08], "constrain": "domain"},
        yaxis={"title": "downstream score D (0–1)", "range": [0, 1.02],
               "scaleanchor": "x", "scaleratio": 1},
        legend_title_text="run (final step)",
        height=600,  # the plane is square (equal units on both axes): give it room
    )
    return fig


# --------------------------------------------------------------------------------------------
# Layers over steps
# --------------------------------------------------------------------------------------------


def mask_density_heatmap(layers_df: pd.DataFrame, run: str | None = None,
                         value: str = "mask_density") -> go.Figure:
    """Layer x step heatmap of the share of free weights, one panel per component.

    ``value``: ``mask_density`` (fraction with w > 0) or ``mask_mean`` (mean keep-weight).
    The colour range is fixed to [0, 1] in every panel; rows are block indices with
    non-block parameters in their own row.
    """
    if value not in ("mask_density", "mask_mean"):
        raise ValueError(f"value must be 'mask_density' or 'mask_mean', got {value!r}")
    stats.require_columns(layers_df, ("run",), "layers DataFrame")
    run = _pick_run(layers_df, run, "mask density heatmap")
    dens = stats.mask_density(layers_df[layers_df["run"] == run], by=("component", "layer"))
    title = f"Share of weights free to move (w > 0), per layer and step — run {run}"
    if value == "mask_mean":
        title = f"Mean keep-weight w per layer and step — run {run}"
    if dens[value].isna().all():
        return _empty(title, f"run {run} ({dens['method'].iloc[0]}) has no mask")

    components = _components(dens["component"])
    heights = [max(dens.loc[dens["component"] == c, "layer"].nunique(dropna=False), 1)
               for c in components]
    fig = make_subplots(
        rows=len(components), cols=1, shared_xaxes=True, vertical_spacing=0.06,
        row_heights=[h / sum(heights) for h in heights], subplot_titles=components,
    )
    steps = np.sort(pd.unique(dens["step"]))
    for row, component in enumerate(components, start=1):
        part = dens[dens["component"] == component].assign(
            label=lambda f: f["layer"].map(layer_label))
        layers = sorted(pd.unique(part["layer"].dropna()))
        labels = ([NON_BLOCK] if part["layer"].isna().any() else []) + [str(int(x)) for x in layers]
        z = part.pivot(index="label", columns="step", values=value).reindex(
            index=labels, columns=steps)
        numel = part.pivot(index="label", columns="step", values="numel").reindex(
            index=labels, columns=steps)
        fig.add_trace(go.Heatmap(
            x=steps, y=labels, z=z.to_numpy(np.float32), customdata=numel.to_numpy(np.float64),
            coloraxis="coloraxis", name=component,
            hovertemplate=(f"<b>{component}</b> layer %{{y}}<br>step %{{x}}<br>"
                           f"{value.replace('_', ' ')} %{{z:.1%}}<br>"
                           "%{customdata:,.0f} weights<extra></extra>"),
        ), row=row, col=1)
        fig.update_yaxes(type="category", title_text="layer", row=row, col=1)
    fig.update_xaxes(title_text="training step", row=len(components), col=1)
    fig.update_layout(
        title=title,
        coloraxis={"colorscale": "Blues", "cmin": 0.0, "cmax": 1.0,
                   "colorbar": {"title": {"text": "share" if value == "mask_density" else "w"},
                                "tickformat": ".0%" if value == "mask_density" else ".1f"}},
        height=min(2200, max(350, 120 + 14 * sum(heights))),
    )
    return fig


def discrepancy_bars(discrepancy_df: pd.DataFrame, run: str | None = None,
                     step: int | None = None, value: str = "discrepancy_mean") -> go.Figure:
    """Per-layer mean G − I (or fraction G > I, or correlation of I and G) as bars coloured by
    component.

    Input: :func:`analysis.stats.layer_discrepancy`. ``step`` defaults to the run's last.
    Positive bars of G − I: layers whose weights the task values more than pre-training did —
    where SPIDER lets weights move. A correlation near 0: the task relies on other weights
    than pre-training did.
    """
    if value not in _DISCREPANCY_AXES:
        raise ValueError(f"value must be one of {', '.join(_DISCREPANCY_AXES)}, got {value!r}")
    stats.require_columns(
        discrepancy_df, ("run", "method", "step", "component", "layer", *stats.LAYER_DISCREPANCY_VALUES),
        "layer discrepancy DataFrame",
    )
    run = _pick_run(discrepancy_df, run, "discrepancy bars")
    mine = discrepancy_df[discrepancy_df["run"] == run]
    step = int(mine["step"].max()) if step is None else step
    mine = mine[mine["step"] == step]
    if mine.empty:
        raise ValueError(f"run {run!r} has no layer statistics at step {step}")
    title = (f"Fine-tuning vs pre-training importance per layer — run {run}, step {step}")
    if mine[value].isna().all():
        return _empty(title, f"run {run} ({mine['method'].iloc[0]}) records no importances")

    fig = go.Figure()
    for component in _components(mine["component"]):
        part = mine[mine["component"] == component]
        part = part.assign(_order=part["layer"].astype("Float64").fillna(np.inf)).sort_values("_order")
        x = [f"{component} {layer_label(layer)}" for layer in part["layer"]]
        custom = np.column_stack([
            part["discrepancy_mean"].to_numpy(float), part["frac_ft_gt_pre"].to_numpy(float),
            part["numel"].to_numpy(float), part["correlation"].to_numpy(float),
        ])
        fig.add_trace(go.Bar(
            x=x, y=part[value].to_numpy(float), name=component,
            marker_color=COMPONENT_COLORS.get(component, "#333333"), customdata=custom,
            hovertemplate=("<b>%{x}</b><br>mean G − I %{customdata[0]:+.4f}<br>"
                           "G > I on %{customdata[1]:.1%} of weights<br>"
                           "correlation of I and G %{customdata[3]:.3f}<br>"
                           "%{customdata[2]:,.0f} weights<extra></extra>"),
        ))
    ytitle = _DISCREPANCY_AXES[value]
    fig.update_layout(
        title=title, xaxis_title="layer (component, block index)", yaxis_title=ytitle,
        legend_title_text="component", bargap=0.15,
        yaxis_tickformat=".0%" if value == "frac_ft_gt_pre" else None,
    )
    fig.update_xaxes(type="category", categoryorder="array",
                     categoryarray=[t for trace in fig.data for t in trace.x])
    if value != "frac_ft_gt_pre":
        fig.add_hline(y=0, line_color="black", line_width=1)
    return fig


# --------------------------------------------------------------------------------------------
# One tensor
# --------------------------------------------------------------------------------------------


def _pool_panel(name: str, tensor: torch.Tensor, cells: int):
    """``(kind, label, Downsampled)``: a known kind pools its own way, others by ``auto``."""
    key = name.strip().lower()
    if key in _PANEL_KINDS:
        kind, label = _PANEL_KINDS[key]
        return kind, label, downsample(tensor, max_cells=cells, reduce=_KIND_STYLE[kind][1])
    pooled = downsample(tensor, max_cells=cells)  # mean if all in [0, 1], else max-|x|
    return ("importance" if pooled.reduce == "mean" else "update"), name, pooled


def panel_cells(n_panels: int, budget_bytes: int = 1_200_000) -> int:
    """Cells per axis for ``n_panels`` heatmaps to fit ``budget_bytes`` of JSON.

    A float32 cell costs 4 bytes, 5.33 in base64; at most 512 per axis.
    """
    return max(16, min(512, int(math.sqrt(budget_bytes / (5.34 * max(n_panels, 1))))))


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
    cells = max_cells or panel_cells(len(tensors))

    pooled = {name: _pool_panel(name, tensor, cells) for name, tensor in tensors.items()}
    first = next(iter(pooled.values()))[2]
    x_labels, y_labels = first.col_labels(), first.row_labels()
    fr, fc = first.block

    n = len(pooled)
    fig = make_subplots(
        rows=1, cols=n, shared_yaxes=True, horizontal_spacing=0.02 if n > 1 else 0.0,
        subplot_titles=[f"{html.escape(label)}<br><sup>cell = {_KIND_STYLE[kind][2]}</sup>"
                        for kind, label, _ in pooled.values()],
    )
    fig.update_annotations(font_size=13)
    safe_param = html.escape(param)
    for col, (name, (kind, label, cell)) in enumerate(pooled.items(), start=1):
        colorscale, _, shows = _KIND_STYLE[kind]
        if ranges and name in ranges:
            zmin, zmax = (float(v) for v in ranges[name])
        elif kind == "update":
            finite = np.abs(cell.values[np.isfinite(cell.values)])
            bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            zmin, zmax = -bound, bound
        else:
            zmin, zmax = 0.0, 1.0
        domain = fig.layout[f"xaxis{col if col > 1 else ''}"].domain
        fig.add_trace(go.Heatmap(
            z=cell.values, x=x_labels, y=y_labels, name=name,
            colorscale=colorscale, zmin=zmin, zmax=zmax,
            colorbar={"orientation": "h", "x": (domain[0] + domain[1]) / 2, "xanchor": "center",
                      "len": (domain[1] - domain[0]) * 0.9, "y": -0.3, "yanchor": "top",
                      "thickness": 12, "title": {"text": html.escape(name), "side": "top"}},
            hovertemplate=(f"<b>{safe_param}</b><br>{html.escape(label)}<br>" + (
                f"rows %{{y}}, cols %{{x}}<br>pooled cell ({fr}×{fc} weights), {shows}: "
                if fr * fc > 1 else "row %{y}, col %{x}<br>value: ") + "%{z:.4g}<extra></extra>"),
        ), row=1, col=col)
        fig.update_xaxes(type="category", matches="x" if col > 1 else None, row=1, col=col,
                         title_text="column (input dim)", nticks=5)
    fig.update_yaxes(type="category", autorange="reversed", nticks=10)
    fig.update_yaxes(title_text="row (output dim)", row=1, col=1)
    rows, cols = first.shape
    fig.update_layout(
        title=(f"{safe_param} — {rows}×{cols}"
               + (f", each cell pools {fr}×{fc} weights" if fr * fc > 1 else "")),
        height=580, margin={"b": 180, "t": 110},
    )
    return fig


def mask_histogram(values, bins: int = 50, param: str | None = None) -> go.Figure:
    """Distribution of keep-weights w in [0, 1], binned here (the JSON stays small).

    Entries exactly 0 (pinned to theta0) and exactly 1 (free) are drawn as their own bars:
    under SPIDER's rule about half the weights sit at 0 and a quarter at 1 (DESIGN §1), and
    a plain histogram would hide them inside the edge bins.
    """
    x = torch.as_tensor(np.asarray(values)) if not torch.is_tensor(values) else values
    x = x.detach().reshape(-1).cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    n = x.numel()
    if n == 0:
        raise ValueError("mask_histogram got no values")
    zeros = int(torch.count_nonzero(x == 0))
    ones = int(torch.count_nonzero(x == 1))
    outside = int(torch.count_nonzero((x < 0) | (x > 1) | torch.isnan(x)))
    counts = torch.histc(x, bins=bins, min=0.0, max=1.0).double()
    counts[0] -= zeros  # histc puts 0 in the first bin and 1 in the last
    counts[-1] -= ones
    edges = np.linspace(0.0, 1.0, bins + 1)
    share = counts.numpy() / n
    name = f" — {param}" if param else ""
    fig = go.Figure()
    fig.add_trace(go.Bar(
        x=(edges[:-1] + edges[1:]) / 2, y=share, width=1.0 / bins, name="0 < w < 1",
        marker_color="#6baed6", customdata=np.column_stack([edges[:-1], edges[1:]]),
        hovertemplate="w in [%{customdata[0]:.2f}, %{customdata[1]:.2f}): "
                      "%{y:.2%} of weights<extra></extra>",
    ))
    for at, count, label, color in ((0.0, zeros, "w = 0 (pinned to θ0)", "#636363"),
                                    (1.0, ones, "w = 1 (free)", "#08306b")):
        fig.add_trace(go.Bar(
            x=[at], y=[count / n], width=0.6 / bins, name=f"{label}: {count / n:.1%}",
            marker_color=color, hovertemplate=f"{label}: %{{y:.2%}} of weights<extra></extra>",
        ))
    subtitle = f"{n:,} weights"
    if outside:
        subtitle += f"; {outside:,} outside [0, 1] or NaN, not shown"
    fig.update_layout(
        title=f"Keep-weight distribution{html.escape(name)}<br><sup>{subtitle}</sup>",
        xaxis={"title": "keep-weight w (0 = pinned to θ0, 1 = free)", "range": [-0.03, 1.03]},
        yaxis={"title": "share of weights", "tickformat": ".0%"},
        barmode="overlay", legend_title_text="",
    )
    return fig
