"""Why it forgot: which part of a run's update cost the upstream score, and how its answers
drifted.

Thin page: ``Run.attribution`` (``python -m analysis.attribute`` writes it) and the runs'
drift metrics (logged at every evaluation), drawn by ``analysis.figures.attribution``; the
sentence comes from ``analysis.attribute.best_reverts``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd
import streamlit as st

import analysis
from analysis import attribute
from analysis.figures import attribution as fig
from app import common, presentation
from spider import rundir

st.title("Why it forgot")
st.caption(
    "Revert one part of a run's update to the pre-trained weights and score it again: the "
    "upstream score that comes back is the forgetting that part caused, the downstream score "
    "that goes is what it learned. Below, how the upstream answers drifted during training."
)

readable = common.readable_runs_or_stop()

label_of = dict(zip(readable["path"], readable["id"]))
method_of = dict(zip(readable["path"], readable["method"]))
options = readable["path"].tolist()


def _default() -> str:
    chosen = [p for p in common.selected_runs() if p in label_of]
    if chosen:
        return chosen[0]
    samples = readable[readable["root"] == "samples"]
    full = samples.loc[samples["name"] == "full", "path"]
    return full.iloc[0] if len(full) else options[0]


def _name(path: str) -> str:
    return f"{label_of[path]} ({method_of[path]})"


@st.cache_data(show_spinner=False, max_entries=64)
def _attribution(path: str, signature: tuple) -> pd.DataFrame:
    del signature
    return analysis.load_run(path).attribution


default = _default()
path = st.selectbox("Run", options, index=options.index(default), format_func=_name)
# The run lives in ?runs= like on every page, so that a reload or a shared link shows it;
# the view's other settings are bound to the address (bind="query-params", key = the
# parameter's name).
if path != default:
    chosen = common.selected_runs()
    common.set_selected_runs([path, *[p for p in chosen if p != path]], readable)
    st.rerun()  # draw the picker again with its new default (see the Layers page)
try:
    frame = _attribution(path, common._stat_key(Path(path) / rundir.ATTRIBUTION_FILE))
except common.UserError as err:
    st.error(str(err))
    st.stop()

st.subheader("Reverting each part of the update")
if frame.empty:
    st.info("This run has no attribution yet. Compute it (about one evaluation per group) "
            "with:")
    st.code(f"python -m analysis.attribute {shlex.quote(path)} --by component\n"
            f"python -m analysis.attribute {shlex.quote(path)} --by layer\n"
            f"python -m analysis.attribute {shlex.quote(path)} --by module", language="bash")
else:
    c1, c2 = st.columns(2)
    groupings = [b for b in attribute.BY if b in set(frame["by"])]
    by = c1.selectbox("Grouped by", groupings, key="why_by", bind="query-params",
                      help="component: vision, projector, LLM; layer: each block; module: each "
                           "kind of weight (q, k, v, o, gate, up, down) across the layers.")
    mine = frame[frame["by"] == by]
    steps = sorted(int(s) for s in mine["step"].unique())
    step = c2.selectbox("Checkpoint step", steps, index=len(steps) - 1, key="why_step",
                        bind="query-params")
    rows = mine[mine["step"] == step]
    st.markdown(attribute.best_reverts(rows))
    presentation.show_figure(fig.attribution_bars(rows))
    refs = rows.set_index("group")
    if {"(none)", "(all)"} <= set(refs.index):
        none, base = refs.loc["(none)"], refs.loc["(all)"]
        st.caption(f"Nothing reverted: U {none['U']:.3f}, D {none['D']:.3f}. Everything "
                   f"reverted (the base model): U {base['U']:.3f}, D {base['D']:.3f}. "
                   f"{int(none['limit'])} examples per split.")
    with st.expander("The numbers", expanded=False):
        shown = rows[["group", "params", "U", "D", "H", "dU", "dD", "dH"]]
        st.dataframe(shown.sort_values("dU", ascending=False), hide_index=True)

st.subheader("Output drift over training")
others = [p for p in common.selected_runs() if p in label_of and p != path]
paths = st.multiselect("Runs", options, default=[path, *others][:4], format_func=_name,
                       # one per run: another run starts from its own default again
                       key=f"why_drift_{label_of[path]}", bind="query-params",
                       help="kl_to_base: how far the answer distributions moved from the base "
                            "model's; the shares split the upstream examples by the form of "
                            "their answers.")
if paths:
    labels = [label_of[p] for p in paths]
    try:
        metrics = common.runs_frame(paths, "metrics", labels)
    except common.UserError as err:
        st.error(str(err))
        st.stop()
    if metrics.empty or not metrics["metric"].isin(fig.DRIFT_METRICS).any():
        st.info("The chosen runs logged no drift metrics: runs made before they were added "
                "do not have them. A new run logs them at every evaluation.")
    else:
        presentation.show_figure(fig.drift_curves(metrics))
