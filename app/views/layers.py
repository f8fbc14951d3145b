"""Layers: what fine-tuning did inside the model, layer by layer, for one run or two.

Thin page: the layers frame comes cached from ``app.common``, the tables from
``analysis.explore`` (cached here by run signature, step and filters), the figures from
``analysis.figures``. Only the per-parameter statistics logged during training are
read (layers.jsonl); no tensor is loaded.
"""

from __future__ import annotations

import html
import textwrap

import pandas as pd
import streamlit as st

from analysis import explore, tensors
from analysis import figures as fig
from app import common, presentation
from spider import statistics
from spider.naming import COMPONENTS

# the statistics a heatmap offers, and their labels: the vocabulary (spider.statistics)
_HEATMAP_VALUES = {k: v[:1].upper() + v[1:] for k, v in statistics.heatmap_values().items()}
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
        "the baselines) show what they have; the rest is marked as not recorded.\n\n"
        "Parts of the model a run did not train (its `--train` setting: e.g. the vision "
        "encoder, or the MLPs under `--train attn`) are **frozen**: grey rows, never moved "
        "from the pre-trained weights."
    )

readable = common.readable_runs_or_stop()

label_of = dict(zip(readable["path"], readable["id"]))
method_of = dict(zip(readable["path"], readable["method"]))
status_of = dict(zip(readable["path"], readable["status"]))
options = readable["path"].tolist()


def _default_pair() -> list[str]:
    """The chosen runs (first two), else the SPIDER and full fine-tuning samples."""
    chosen = [p for p in common.selected_runs() if p in label_of]
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
# The runs live in ?runs= like on every page (a reload or a shared link shows the same
# pair); written only when the reader picked other runs here, so that arriving with a wider
# selection (from Compare) keeps it until then. The rerun draws the pickers again with the new
# pair as their default: a picker's identity includes its default, so without it the next
# pick would land on a picker that no longer exists and be lost.
if paths != pair:
    common.set_selected_runs(paths, readable)
    st.rerun()


@st.cache_data(show_spinner=False, max_entries=64)
def _layers(path: str, signature: tuple, label: str) -> pd.DataFrame:
    del signature
    return common.run_frame(path, "layers").assign(run=label)


try:
    frames = {p: _layers(p, common.run_signature(p), label_of[p]) for p in paths}
except common.UserError as err:
    st.error(str(err))
    st.stop()



@st.cache_data(show_spinner=False, max_entries=64)
def _status(path: str, signature: tuple) -> tuple[pd.DataFrame, str]:
    """(every base-model parameter and whether the run trained it, its --train setting):
    from run.json and the base model's file header, no tensor read."""
    del signature
    run = common.load_run_cached(path)
    return tensors.parameter_status(run), tensors.train_setting(run)


status = {p: _status(p, common.run_signature(p)) for p in paths}

empty = [p for p, f in frames.items() if f.empty]
for p in empty:
    st.info(f"{label_of[p]} has logged no layer statistics yet (they are written every "
            "--log-every steps).")
frames = {p: f for p, f in frames.items() if not f.empty}
if not frames:
    st.stop()

# ----------------------------------------------------------------------------- controls
# the frozen parts too (status: the base model's parameters), so that they show as frozen;
# distinct pairs first, and each set built once (a 7B run logs hundreds of thousands of rows)
every_part = pd.concat([f[["component", "module"]].drop_duplicates()
                        for f in [*frames.values(), *(status[p][0] for p in frames)]],
                       ignore_index=True)
present = set(every_part["component"])
components = [c for c in COMPONENTS if c in present]
modules = sorted(set(every_part["module"]), key=explore.module_name)
steps = sorted({int(s) for f in frames.values() for s in f["step"].unique()})

# Every view setting is bound to the address (bind="query-params", the key is the parameter's
# name): a reload, a shared link or the Learn page's tour shows the same view.
f1, f2 = st.columns(2)
picked_components = f1.multiselect(
    "Components", components, default=components, format_func=explore.component_name,
    key="layers_components", bind="query-params",
    help="Only the parts of the model that trained have statistics; the parts a run left "
         "frozen show as grey rows.")
picked_modules = f2.multiselect(
    "Modules", modules, default=modules, format_func=explore.module_name,
    key="layers_modules", bind="query-params",
    help="Pool only these kinds of weights into each layer's numbers.")
step = st.select_slider("Step", options=steps, value=steps[-1], key="layers_step",
                        bind="query-params",
                        help="The bar charts show this step; the heatmap marks it.")
h1, h2 = st.columns(2)
heat_value = h1.selectbox("Heatmap shows", list(_HEATMAP_VALUES),
                          format_func=_HEATMAP_VALUES.get, key="layers_value",
                          bind="query-params")
_SCALES = {"absolute": "absolute", "shared": "shared by the runs shown",
           "fitted": "fitted to each run"}
# honest by default: a share on its whole 0–100 % range; a value without a fixed range
# (update size, mean G − I) on one range for the runs shown, signed values centred on 0
_default_scale = "absolute" if statistics.value_range(heat_value) else "shared"
scale = h2.radio("Colour scale", list(_SCALES), horizontal=True, format_func=_SCALES.get,
                 index=list(_SCALES).index(_default_scale), key=f"layers_scale_{heat_value}",
                 bind="query-params",
                 help="Absolute: the value's whole range (0–100 % for a share), so that 50 % "
                      "and 56 % look nearly alike, as they are. Shared: from the smallest to "
                      "the largest value of the runs shown. Fitted: each run's own values, "
                      "so that small differences show (and look larger than they are). "
                      "Signed values (mean G − I) are always centred on 0, white. Each "
                      "heatmap's range is written under it.")
if not picked_components or not picked_modules:
    st.warning("Choose at least one component and one module.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=256)
def _views(path: str, signature: tuple, label: str, comps: tuple, mods: tuple,
           value: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer table at every logged step, layer x step matrix of ``value``) of one run,
    filtered: the step slider then only picks rows."""
    whole = _layers(path, signature, label)
    frame = explore.filter_layers(whole, comps, mods)
    frozen = explore.frozen_layers(_status(path, signature)[0], comps, mods)
    return (explore.layer_table_all_steps(frame),
            explore.layer_step_matrix(frame, value, frozen, steps=whole))


filters = (tuple(picked_components), tuple(picked_modules))
views = {}
for p in frames:
    every_step, matrix = _views(p, common.run_signature(p), label_of[p], *filters, heat_value)
    views[p] = (explore.table_at_step(every_step, step), matrix)
matrices = pd.concat([m for _, m in views.values()], ignore_index=True)
zranges = {p: fig.heatmap_range(heat_value, (m if scale == "fitted" else matrices)[heat_value],
                                 scale, method_of[p]) for p, (_, m) in views.items()}
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
    return fig.layer_step_heatmap(matrix, value, zrange, step=at,
                                   title=f"{_HEATMAP_VALUES[value]} per layer and step",
                                   train=_status(path, signature)[1])


@st.cache_resource(show_spinner=False, max_entries=128)
def _bars(path: str, signature: tuple, label: str, comps: tuple, mods: tuple, at: int,
          values: tuple, titles: tuple, ranges: tuple):
    every_step = _views(path, signature, label, comps, mods, heat_value)[0]
    return fig.layer_bars(explore.table_at_step(every_step, at), list(values),
                           titles=list(titles), yrange=dict(ranges))


# ----------------------------------------------------------------------------- the runs
# Like with like: each kind of chart is one row, the runs side by side in it, so that the two
# runs' heatmaps, update sizes and discrepancies line up whatever each run records.
_DISCREPANCY = ("discrepancy_mean", "frac_ft_gt_pre", "correlation")
_SUBTITLES = {  # what a bar chart's value means, in a few words, under its title
    "discrepancy_mean": "> 0: the task values the weights more than pre-training did",
    "frac_ft_gt_pre": "free to move under SPIDER",
    "correlation": "near 0: the task wants other weights than pre-training relied on",
    "update_rel_norm": "how far each layer moved, relative to its size",
}


def _bar_title(value: str, at: int | None = None) -> str:
    name = statistics.label(value)
    name = name[:1].upper() + name[1:] + (f" at step {at}" if at is not None else "")
    # wrapped: a half-page column cuts a long line off at its edge
    return f"{name}<br><sup>{'<br>'.join(textwrap.wrap(_SUBTITLES[value], 48))}</sup>"


def _run_heading(path: str) -> None:
    """The run's name on one line (cut with … where the column is too narrow; the whole name
    on hover), so that the two columns' charts start at the same height."""
    text = html.escape(_name(path))
    st.markdown(f'<div title="{text}" style="font-size:1.35rem;font-weight:600;'
                f'white-space:nowrap;overflow:hidden;text-overflow:ellipsis;'
                f'margin-bottom:0.25rem">{text}</div>', unsafe_allow_html=True)


def _row(title: str | None = None):
    if title:
        st.markdown(f"**{title}**")
    return dict(zip(views, st.columns(len(views))))


@st.cache_data(show_spinner=False, max_entries=64)
def _frozen(path: str, signature: tuple, comps: tuple, mods: tuple) -> pd.DataFrame:
    """explore.frozen_layers of the run's parameter status (a 7B model's status has
    hundreds of tensors: grouped once per filter, not on every rerun)."""
    return explore.frozen_layers(_status(path, signature)[0], comps, mods)


def _frozen_words(path: str) -> str:
    """What the run left frozen, in words, under its heatmap ("" when it trained all shown)."""
    train = status[path][1]
    layers = _frozen(path, sigs[path], *filters)
    if layers.empty:
        return ""
    whole = layers[layers["all_frozen"]]
    partly = layers[~layers["all_frozen"]]
    words = []
    if len(whole):
        words.append("Grey rows are frozen — not trained in this run "
                     f"(`{train}`), so they have no statistics: "
                     + ", ".join(whole["name"]) + ".")
    if len(partly):
        mods = list(dict.fromkeys(m for ms in partly["frozen_modules"] for m in ms.split(", ")))
        words.append("Frozen in the other layers (their numbers pool the trained tensors "
                     f"only; `{train}`): " + ", ".join(explore.module_name(m) for m in mods)
                     + ".")
    return " ".join(words)


steps_at = {path: int(table["step"].iloc[0]) if len(table) else step
            for path, (table, _) in views.items()}
sigs = {path: common.run_signature(path) for path in views}

for path, column in _row().items():
    with column:
        _run_heading(path)
        if steps_at[path] != step:
            st.caption(f"This run logged no statistics at step {step}; showing step "
                       f"{steps_at[path]}.")
        presentation.show_figure(_heatmap(path, sigs[path], label_of[path], *filters, heat_value,
                                 zranges[path], steps_at[path]))
        st.caption(fig.range_words(heat_value, zranges[path], scale, method_of[path]))
        frozen_note = _frozen_words(path)
        if frozen_note:
            st.caption(frozen_note)

for path, column in _row().items():
    with column:
        presentation.show_figure(_bars(path, sigs[path], label_of[path], *filters, steps_at[path],
                              ("update_rel_norm",),
                              (_bar_title("update_rel_norm", steps_at[path]),), yrange_key))

def _why_share_and_mean(path: str) -> str:
    """One sentence on why the share with G > I and the mean G − I can disagree, with the
    run's own numbers at the shown step ("" where it logged no importances).

    I = rank(θ0) and G = rank(S) are sigmoids of each weight's z-score in its tensor
    (spider/importance.py), not even ranks: a few very large summed gradients stretch the
    std of |S|, so G bunches near its middle while I spreads wider. G then edges out I by a
    little on the many weights with a small θ0 and falls short by a lot on the largest ones.
    The spreads come from the logged first and second moments, pooled over the tensors shown.
    """
    rows = explore.filter_layers(frames[path], *filters)
    rows = rows[rows["step"] == steps_at[path]]
    need = ["numel", "importance_pre_mean", "importance_ft_mean", "importance_pre_sq_mean",
            "importance_ft_sq_mean", "frac_ft_gt_pre"]
    if rows.empty or any(c not in rows for c in need):
        return ""
    rows = rows[need].apply(pd.to_numeric, errors="coerce").dropna()
    if rows.empty or rows["numel"].sum() <= 0:
        return ""
    weight = rows["numel"] / rows["numel"].sum()
    mean = {c: float((rows[c] * weight).sum()) for c in need[1:]}
    spread_i = max(mean["importance_pre_sq_mean"] - mean["importance_pre_mean"] ** 2, 0) ** 0.5
    spread_g = max(mean["importance_ft_sq_mean"] - mean["importance_ft_mean"] ** 2, 0) ** 0.5
    return (
        f"**Share and mean can disagree** (here {mean['frac_ft_gt_pre']:.0%} of the weights "
        f"have G > I, mean G − I = {mean['importance_ft_mean'] - mean['importance_pre_mean']:+.4f}): "
        "I and G are not even ranks but a sigmoid of each weight's z-score in its tensor, "
        f"and G is bunched nearer its middle (spread {spread_g:.2f}) than I "
        f"({spread_i:.2f}) because a few very large summed gradients stretch the scale — so "
        "G beats I by a little on the many weights with a small θ0 and loses by a lot on the "
        "few largest: a share counts wins, a mean weighs them.")


for path, column in _row().items():
    table = views[path][0]
    with column:
        if table[list(_DISCREPANCY)].isna().all().all():
            st.info(f"{_name(path)} records no importances I and G (only SPIDER computes "
                    "them), so there is no discrepancy to show.")
        else:
            presentation.show_figure(_bars(
                path, sigs[path], label_of[path], *filters, steps_at[path], _DISCREPANCY,
                tuple(_bar_title(v, steps_at[path] if i == 0 else None)
                      for i, v in enumerate(_DISCREPANCY)), yrange_key))
            why = _why_share_and_mean(path)
            if why:
                st.caption(why)

# ----------------------------------------------------------------------------- two runs
@st.cache_data(show_spinner=False, max_entries=16)
def _agreement(path_a: str, sig_a: tuple, path_b: str, sig_b: tuple, params: tuple):
    """(step, table of analysis.tensors.update_agreement, tensors compared) or None."""
    from analysis import tensors

    del sig_a, sig_b  # cache key only
    run_a, run_b = common.load_run_cached(path_a), common.load_run_cached(path_b)
    at = tensors.common_step(run_a, run_b)
    if at is None:
        return None
    table = tensors.update_agreement(run_a, run_b, at, params=list(params))
    return at, table


_AGREEMENT = ("moved_overlap", "update_cosine")
if len(views) == 2:
    path_a, path_b = list(views)
    st.subheader("Did the two runs change the same weights?")
    chosen_params = tuple(sorted(set(explore.filter_layers(
        frames[path_a], *filters)["param"])))
    try:
        found = _agreement(path_a, sigs[path_a], path_b, sigs[path_b], chosen_params)
    except common.UserError as err:
        found = None
        st.warning(f"The two runs' updates cannot be compared: {err}")
    if found is None:
        st.info("The two runs share no checkpoint step, so their updates Δ = θ − θ0 cannot "
                "be compared weight by weight.")
    elif found[1].empty:
        st.info(f"At step {found[0]} the two checkpoints kept no tensor in common among the "
                "chosen components and modules (a run may keep only some, --save-tensors).")
    else:
        at, agreement = found
        st.caption(
            f"From the two checkpoints of step {at}: each layer's update Δ = θ − θ0 in both "
            f"runs, over the tensors both kept ({int(agreement['numel'].sum()):,} weights in "
            f"{len(agreement)} layer(s)). "
            + " ".join(statistics.get(v).description for v in _AGREEMENT))
        titles = []
        for value in _AGREEMENT:
            text = statistics.label(value)
            titles.append(text[:1].upper() + text[1:]
                          + f"<br><sup>{label_of[path_a]} vs {label_of[path_b]}</sup>")
        presentation.show_figure(fig.layer_bars(
            agreement.assign(run=f"{label_of[path_a]} vs {label_of[path_b]}"),
            list(_AGREEMENT), titles=titles,
            yrange={v: statistics.value_range(v) for v in _AGREEMENT}),
            key="layers_agreement")

for path, column in _row().items():
    with column:
        st.download_button(
            "Layer table (CSV)", views[path][0].to_csv(index=False),
            f"layers-{label_of[path].replace('/', '-')}-step{steps_at[path]}.csv", "text/csv",
            key=f"layers_csv_{path}", on_click="ignore")
