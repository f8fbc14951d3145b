"""Why a run forgot: what reverting each group of its update buys back, and the output drift
of its upstream answers over training.

Inputs: :func:`analysis.attribute.attribution_frame` (``Run.attribution``) and the runs'
metrics frames (``Run.metrics``, the drift metrics the Evaluator logs on ``upstream``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.figures.style import _color, _empty, method_symbol

DRIFT_METRICS = {
    "kl_to_base": "KL(base ‖ tuned) of the answer tokens",
    "format_errors": "answered in the wrong form (superficial)",
    "content_errors": "right form, wrong answer (essential)",
    "answer_type_drift": "answered in the downstream task's form",
}
"""The drift metrics of ``spider.hooks.Evaluator`` (split ``upstream``) and their titles."""

_REFERENCES = ("(none)", "(all)")


def attribution_bars(frame: pd.DataFrame, title: str = "") -> go.Figure:
    """Per group: the upstream score recovered (``dU``) and the downstream score lost
    (``−dD``) by reverting that group's update, largest recovery on top. ``frame``: the rows
    of one run, step and grouping (the reference rows ``(none)``, ``(all)`` are left out)."""
    rows = frame[~frame["group"].isin(_REFERENCES)]
    if rows.empty:
        return _empty(title or "Reverting each group", "No group rows to show.")
    rows = rows.sort_values(["dU", "dD"], ascending=[True, True])  # bottom to top
    groups = rows["group"].astype(str).tolist()
    fig = go.Figure([
        go.Bar(y=groups, x=rows["dU"].to_numpy(float), orientation="h", name="U recovered",
               marker_color="#2a9d8f",
               hovertemplate="%{y}: upstream %{x:+.3f}<extra></extra>"),
        go.Bar(y=groups, x=(-rows["dD"]).to_numpy(float), orientation="h", name="D lost",
               marker_color="#e76f51",
               hovertemplate="%{y}: downstream lost %{x:.3f}<extra></extra>"),
    ])
    fig.update_layout(
        title=title or "Reverting each group: upstream recovered vs downstream lost",
        barmode="group", height=max(280, 60 + 38 * len(groups)),
        xaxis_title="score difference to the unreverted checkpoint",
        legend={"orientation": "h", "y": -0.15}, margin={"l": 10, "r": 10, "t": 50, "b": 40})
    fig.add_vline(x=0, line_color="#888", line_width=1)
    return fig


def drift_curves(metrics: pd.DataFrame, colors: Mapping[str, str] | None = None) -> go.Figure:
    """The drift metrics over steps, one panel each (:data:`DRIFT_METRICS`), a line per run.
    ``metrics``: runs' metrics frames (columns ``run``, ``method``, ``step``, ``split``,
    ``metric``, ``value``)."""
    drift = metrics[(metrics["split"] == "upstream") & metrics["metric"].isin(DRIFT_METRICS)]
    if drift.empty:
        return _empty("Output drift over training",
                      "The chosen runs logged no drift metrics (runs made before they were "
                      "added do not have them).")
    names = list(DRIFT_METRICS)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[DRIFT_METRICS[n] for n in names],
                        horizontal_spacing=0.06)
    for run in pd.unique(drift["run"]):
        mine = drift[drift["run"] == run]
        method = str(mine["method"].iloc[0])
        for col, name in enumerate(names, start=1):
            line = mine[mine["metric"] == name].sort_values("step")
            if line.empty:
                continue
            fig.add_trace(go.Scatter(
                x=line["step"].to_numpy(float), y=line["value"].to_numpy(float),
                mode="lines+markers", name=f"{run} ({method})", legendgroup=str(run),
                showlegend=col == 1, line={"color": _color(colors, run), "width": 2},
                marker={"symbol": method_symbol(method), "size": 7},
                hovertemplate=(f"<b>{html.escape(str(run))}</b><br>{name} %{{y:.3f}}"
                               "<br>step %{x}<extra></extra>")), row=1, col=col)
    for col, name in enumerate(names, start=1):
        fig.update_xaxes(title_text="step", row=1, col=col)
        if name != "kl_to_base":
            fig.update_yaxes(range=[0, 1], tickformat=".0%", row=1, col=col)
    fig.update_annotations(font_size=11)
    fig.update_layout(title="Output drift of the upstream answers over training", height=340,
                      legend={"orientation": "h", "y": -0.25},
                      margin={"l": 10, "r": 10, "t": 70, "b": 40})
    return fig


FORGETTING_DRIFT_COLUMNS = ("run", "method", "step", "F", "kl_to_base")


def forgetting_drift_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run: its forgetting F (:func:`analysis.stats.summary_table`, the upstream change
    since step 0) and its ``kl_to_base`` at its last evaluated step (the step of F where
    both were logged there, else the last step that logged ``kl_to_base``). Runs without
    ``kl_to_base`` or without F are left out. Columns :data:`FORGETTING_DRIFT_COLUMNS`."""
    from analysis import stats

    stats.require_columns(metrics, stats.METRICS_COLUMNS, "metrics DataFrame")
    kl = metrics[(metrics["split"] == "upstream") & (metrics["metric"] == "kl_to_base")]
    kl = kl.dropna(subset=["value"]).drop_duplicates(["run", "step"], keep="last")
    if kl.empty:
        return pd.DataFrame(columns=list(FORGETTING_DRIFT_COLUMNS))
    summary = stats.summary_table(metrics).dropna(subset=["F"])
    rows = []
    for r in summary.itertuples():
        mine = kl[kl["run"] == r.run].sort_values("step")
        if mine.empty:
            continue
        at = mine[mine["step"] == r.step] if not pd.isna(r.step) else mine.iloc[0:0]
        last = at.iloc[-1] if len(at) else mine.iloc[-1]
        rows.append({"run": r.run, "method": r.method, "step": int(last["step"]),
                     "F": float(r.F), "kl_to_base": float(last["value"])})
    return pd.DataFrame(rows, columns=list(FORGETTING_DRIFT_COLUMNS))


def forgetting_vs_drift(table: pd.DataFrame, colors: Mapping[str, str] | None = None
                        ) -> go.Figure:
    """One point per run: ``kl_to_base`` (x) against forgetting F (y), both at the run's last
    evaluation (input :func:`forgetting_drift_table`). Runs low and to the right drifted
    far and forgot much; a run far right but near F = 0 moved its answers without losing
    the old task."""
    title = "Forgetting F against output drift kl_to_base (last evaluation of each run)"
    if table.empty:
        return _empty(title, "None of the chosen runs logged kl_to_base.")
    fig = go.Figure()
    for r in table.itertuples():
        fig.add_trace(go.Scatter(
            x=[float(r.kl_to_base)], y=[float(r.F)], mode="markers+text", name=str(r.run),
            text=[str(r.run)], textposition="top center",
            marker={"size": 12, "color": _color(colors, r.run),
                    "symbol": method_symbol(str(r.method)),
                    "line": {"color": "white", "width": 1}},
            customdata=[[int(r.step), str(r.method)]],
            hovertemplate=(f"<b>{html.escape(str(r.run))}</b> (%{{customdata[1]}})<br>"
                           "kl_to_base %{x:.4f}<br>F %{y:+.3f}<br>step %{customdata[0]}"
                           "<extra></extra>")))
    fig.add_hline(y=0, line_color="#888", line_width=1, line_dash="dot")
    fig.update_layout(title=title, height=420, showlegend=False,
                      xaxis_title="kl_to_base: KL(base ‖ tuned) of the upstream answers",
                      yaxis_title="F = U − U at step 0 (negative = forgotten)",
                      margin={"l": 10, "r": 10, "t": 60, "b": 40})
    return fig
