"""Layers: what fine-tuning did inside the model, layer by layer, for one run or two.

Thin page: the layers frame comes cached from ``app.common``, the tables from
``analysis.explore`` (cached here by run signature, step and filters), the figures from
``analysis.explore_figures``. Only the per-parameter statistics logged during training are
read (layers.jsonl); no tensor is loaded.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import explore
from analysis import explore_figures as xfig
from app import common

_HEATMAP_VALUES = {
    "mask_density": "Share of weights free to move (w > 0)",
    "mask_mean": "Mean keep-weight w",
    "update_rel_norm": "Update size ‖Δ‖/‖θ0‖",
    "discrepancy_mean": "Mean G − I",
}
_NONE = "(none)"

st.title("Layers")
st.caption(
    "Inside one fine-tuning run, layer by layer: which share of each layer's weights the "
    "method let move, whether the new task values those weights more than pre-training did, "
    "and how far each layer moved from where it started."
)
with st.expander("What I, G and w mean", expanded=False):
    st.markdown(
        "- **I** — how much pre-training relied on a weight: its rank (0–1) by size in the "
        "base model.\n"
        "- **G** — how much the new task wants the weight changed: its rank (0–1) by the "
        "gradient summed over training so far.\n"
        "- **w** — SPIDER's keep-weight: a weight may move only where **G > I** (w > 0), and "
        "is pinned to its pre-trained value elsewhere (w = 0).\n"
        "- **‖Δ‖/‖θ0‖** — how far a layer moved, relative to its size before fine-tuning.\n\n"
        "Methods without a per-weight mask (LoRA) or without importances (full fine-tuning, "
        "the baselines) show what they have; the rest is marked as not recorded."
    )

runs = common.list_all_runs()
readable = runs[runs["status"] != "damaged"]
if readable.empty:
    st.info("No readable runs found. The bundled samples live in "
            f"`{common.bundled_runs_root()}`.")
    st.stop()

label_of = dict(zip(readable["path"], readable["id"]))
method_of = dict(zip(readable["path"], readable["method"]))
status_of = dict(zip(readable["path"], readable["status"]))
options = readable["path"].tolist()


def _default_pair() -> list[str]:
    """The chosen runs (first two), else the SPIDER and full fine-tuning samples."""
    chosen = [p for p in common.selected_runs(runs) if p in label_of]
    if chosen:
        return chosen[:2]
    samples = readable[readable["root"] == "samples"]
    pair = [samples.loc[samples["name"] == n, "path"].iloc[0]
            for n in ("spider", "full") if (samples["name"] == n).any()]
    return pair or options[:1]


def _name(path: str) -> str:
    text = f"{label_of[path]} ({method_of[path]})"
    status = status_of.get(path, "done")
    return text if status == "done" else f"{text} [{status}]"


pair = _default_pair()
c1, c2 = st.columns(2)
run_a = c1.selectbox("Run", options, index=options.index(pair[0]), format_func=_name)
others = [_NONE, *[p for p in options if p != run_a]]
default_b = pair[1] if len(pair) > 1 and pair[1] in others else _NONE
run_b = c2.selectbox("Side by side with", others, index=others.index(default_b),
                     format_func=lambda p: p if p == _NONE else _name(p),
                     help="A second run, e.g. full fine-tuning next to SPIDER.")
paths = [run_a] + ([] if run_b == _NONE else [run_b])


@st.cache_data(show_spinner=False, max_entries=64)
def _layers(path: str, signature: tuple, label: str) -> pd.DataFrame:
    del signature
    return common.run_frame(path, "layers").assign(run=label)


try:
    frames = {p: _layers(p, common.run_signature(p), label_of[p]) for p in paths}
except common.UserError as err:
    st.error(str(err))
    st.stop()

empty = [p for p, f in frames.items() if f.empty]
for p in empty:
    st.info(f"{label_of[p]} has logged no layer statistics yet (they are written every "
            "--log-every steps).")
frames = {p: f for p, f in frames.items() if not f.empty}
if not frames:
    st.stop()

# ----------------------------------------------------------------------------- controls
all_rows = pd.concat(frames.values(), ignore_index=True)
components = [c for c in ("vision", "projector", "llm", "other")
              if c in set(all_rows["component"])]
modules = sorted(set(all_rows["module"]), key=explore.module_name)
steps = sorted(int(s) for s in all_rows["step"].unique())

f1, f2 = st.columns(2)
picked_components = f1.multiselect(
    "Components", components, default=components, format_func=explore.component_name,
    help="Only the parts of the model that trained have statistics.")
picked_modules = f2.multiselect(
    "Modules", modules, default=modules, format_func=explore.module_name,
    help="Pool only these kinds of weights into each layer's numbers.")
step = st.select_slider("Step", options=steps, value=steps[-1],
                        help="The bar charts show this step; the heatmap marks it.")
h1, h2 = st.columns(2)
heat_value = h1.selectbox("Heatmap shows", list(_HEATMAP_VALUES),
                          format_func=_HEATMAP_VALUES.get)
_SCALES = ("fitted to each run", "shared by the runs shown", "absolute 0–1")
scale = h2.radio("Colour scale", _SCALES, horizontal=True,
                 help="Fitted: the colours span the values present, so that small differences "
                      "(all around 0.5, say) show; each heatmap states its range. Shared: one "
                      "range for both runs. Absolute: 0 to 1.")
if not picked_components or not picked_modules:
    st.warning("Choose at least one component and one module.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=256)
def _views(path: str, signature: tuple, label: str, comps: tuple, mods: tuple,
           value: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer table at every logged step, layer x step matrix of ``value``) of one run,
    filtered: the step slider then only picks rows."""
    frame = explore.filter_layers(_layers(path, signature, label), comps, mods)
    return explore.layer_table_all_steps(frame), explore.layer_step_matrix(frame, value)


filters = (tuple(picked_components), tuple(picked_modules))
views = {}
for p in frames:
    every_step, matrix = _views(p, common.run_signature(p), label_of[p], *filters, heat_value)
    views[p] = (explore.table_at_step(every_step, step), matrix)
matrices = pd.concat([m for _, m in views.values()], ignore_index=True)
shared = explore.fitted_range(matrices[heat_value])
zranges = {p: (0.0, 1.0) if scale == _SCALES[2] else shared if scale == _SCALES[1]
           else explore.fitted_range(m[heat_value]) for p, (_, m) in views.items()}
tables = pd.concat([t for t, _ in views.values()], ignore_index=True)
# bar axes shared by the runs shown, so that bars of equal length mean equal values
yrange = {}
for value in ("discrepancy_mean", "correlation", "update_rel_norm"):
    finite = tables[value].dropna()
    if len(finite):
        lo, hi = min(0.0, float(finite.min())), max(0.0, float(finite.max()))
        pad = 0.08 * (hi - lo or 1.0)
        yrange[value] = (lo - (pad if lo < 0 else 0.0), hi + pad)
yrange["frac_ft_gt_pre"] = (0.0, 1.0)
yrange_key = tuple(sorted(yrange.items()))


# Figures are cached whole (building one costs a tenth of a second or more): moving one
# widget rebuilds only the figures that depend on it.
@st.cache_resource(show_spinner=False, max_entries=128)
def _heatmap(path: str, signature: tuple, label: str, comps: tuple, mods: tuple, value: str,
             zrange: tuple, at: int):
    matrix = _views(path, signature, label, comps, mods, value)[1]
    return xfig.layer_step_heatmap(matrix, value, zrange, step=at,
                                   title=f"{_HEATMAP_VALUES[value]} per layer and step")


@st.cache_resource(show_spinner=False, max_entries=128)
def _bars(path: str, signature: tuple, label: str, comps: tuple, mods: tuple, at: int,
          values: tuple, titles: tuple, ranges: tuple):
    every_step = _views(path, signature, label, comps, mods, heat_value)[0]
    return xfig.layer_bars(explore.table_at_step(every_step, at), list(values),
                           titles=list(titles), yrange=dict(ranges))


# ----------------------------------------------------------------------------- the runs
_DISCREPANCY = ("discrepancy_mean", "frac_ft_gt_pre", "correlation")
columns = st.columns(len(views))
for column, (path, (table, _matrix)) in zip(columns, views.items()):
    with column:
        st.subheader(_name(path))
        at = int(table["step"].iloc[0]) if len(table) else step
        if at != step:
            st.caption(f"This run logged no statistics at step {step}; showing step {at}.")
        sig = common.run_signature(path)
        st.plotly_chart(_heatmap(path, sig, label_of[path], *filters, heat_value,
                                 zranges[path], at))
        if table[list(_DISCREPANCY)].isna().all().all():
            st.info(f"{_name(path)} records no importances I and G (only SPIDER computes "
                    "them), so there is no discrepancy to show; its mask and update size are "
                    "above and below.")
        else:
            st.plotly_chart(_bars(
                path, sig, label_of[path], *filters, at, _DISCREPANCY,
                (f"Mean G − I at step {at}<br><sup>> 0: the task values the weights more "
                 "than pre-training did</sup>",
                 "Share of weights with G > I<br><sup>free to move under SPIDER</sup>",
                 "Correlation of I and G<br><sup>near 0: the task wants other weights than "
                 "pre-training relied on</sup>"), yrange_key))
        st.plotly_chart(_bars(
            path, sig, label_of[path], *filters, at, ("update_rel_norm",),
            (f"Update size ‖Δ‖/‖θ0‖ at step {at}<br><sup>how far each layer moved, relative "
             "to its size</sup>",), yrange_key))
        st.download_button(
            "Layer table (CSV)", table.to_csv(index=False),
            f"layers-{label_of[path].replace('/', '-')}-step{at}.csv", "text/csv",
            key=f"layers_csv_{path}")
