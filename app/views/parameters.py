"""Parameters: one weight tensor of one checkpoint up close — I, G, the mask w and the update
Δ side by side, histograms, statistics, a what-if under another SPIDER option, a region at
full resolution, the mask flips between two checkpoints, downloads. Every view setting (step,
search, what-if options, region, flips' first step) is in the page address
(``bind="query-params"``; the tensor as ``?param=``), so a reload or a shared link shows the same.

Thin: widgets -> cached calls into ``analysis.tensors`` -> figures -> ``st.plotly_chart``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import figures, stats
from analysis.figures.tensors import (
    REGION_FULL,
    mask_change,
    mask_flip_map,
    region_panels,
    value_histograms,
)
from analysis.overview import option_value, options_text
from analysis.tensors import (
    KIND_LABELS,
    PANEL_KINDS,
    available_kinds,
    find_params,
    kept_tensors,
    mask_flips,
    region_bounds,
    tensor_statistics,
    tensor_views,
    tensors_npz,
    tensors_safetensors,
    updated_entries,
    updated_entries_csv,
    what_if_mask,
)
from app import common, presentation
from spider import statistics
from spider.errors import UserError

PARAM_QUERY = "param"
DEFAULT_PARAM = "model.language_model.layers.3.mlp.down_proj.weight"
# the page's sections below the panels, one open at a time (tab labels, in the address)
SECTION_STATISTICS = "Statistics"
SECTION_DISTRIBUTIONS = "Distributions"
SECTION_WHAT_IF = "What if (another SPIDER option)"
SECTION_REGION = "A region at full resolution"
SECTION_FLIPS = "Mask flips between checkpoints"
_KIND_WORDS = {
    "importance_pre": "I (pre-training importance)",
    "importance_ft": "G (fine-tuning importance)",
    "mask": "the mask w",
    "delta": "the update Δ",
    "weight": "the weight θ",
}


# ------------------------------------------------------------------------------ cached reads
@st.cache_data(show_spinner=False, max_entries=64)
def _kept(path: str, signature: tuple, step: int) -> pd.DataFrame:
    del signature  # cache key only
    return kept_tensors(common.load_run_cached(path), step)


@st.cache_data(show_spinner=False, max_entries=64)
def _frozen(path: str, signature: tuple) -> tuple[pd.DataFrame, str]:
    """(the base model's parameters the run did not train, its --train setting): from
    run.json and the base model's file header, no tensor read."""
    del signature  # cache key only
    from analysis.tensors import frozen_tensors, train_setting

    run_ = common.load_run_cached(path)
    return frozen_tensors(run_), train_setting(run_)


# Shared, not copied (cache_resource): the page and the figures only read these arrays, and
# un-pickling them from cache_data on every rerun costs more the larger the tensor.
@st.cache_resource(show_spinner=False, max_entries=8)
def _views(path: str, signature: tuple, step: int, param: str) -> dict[str, np.ndarray]:
    del signature
    views = tensor_views(common.load_run_cached(path), step, param)
    return {kind: t.numpy() for kind, t in views.items()}


@st.cache_data(show_spinner=False, max_entries=32)
def _numbers(path: str, signature: tuple, step: int, param: str) -> dict[str, float]:
    """The page's shares and counts of one tensor, each a pass over every weight: computed
    once per (run files, step, tensor), not on every rerun."""
    views = _views(path, signature, step, param)
    numbers: dict[str, float] = {}
    if "mask" in views:
        w = views["mask"]
        numbers.update(free=float((w > 0).mean()), pinned=float((w == 0).mean()),
                       mean_w=float(w.mean()))
    if "delta" in views:
        numbers.update(unchanged=float((views["delta"] == 0).mean()),
                       moved=int(np.count_nonzero(views["delta"])))
    if "importance_pre" in views and "importance_ft" in views:
        numbers.update(stats.tensor_discrepancy(views["importance_pre"],
                                                views["importance_ft"]))
    return numbers


@st.cache_resource(show_spinner=False, max_entries=16)
def _region_figure(path: str, signature: tuple, step: int, param: str,
                   rows: tuple[int, int], cols: tuple[int, int]):
    views = _views(path, signature, step, param)
    return region_panels({k: views[k] for k in PANEL_KINDS if k in views}, param, rows, cols)


@st.cache_resource(show_spinner=False, max_entries=8)
def _figures(path: str, signature: tuple, step: int, param: str):
    """(heatmaps, histograms, statistics, full-resolution .npz) of one tensor; built once and shared,
    not copied (the page only reads them): un-pickling a large plotly figure from
    ``cache_data`` costs ~0.4 s per rerun."""
    import torch

    views = {k: torch.from_numpy(v) for k, v in _views(path, signature, step, param).items()}
    panels = figures.tensor_panels(
        {k: views[k] for k in PANEL_KINDS if k in views}, param)
    hist = value_histograms(views)
    table = tensor_statistics(views)
    npz = tensors_npz(views, param, step)
    return panels, hist, table, npz


@st.cache_resource(show_spinner=False, max_entries=32)  # read only: shared, not copied
def _what_if(path: str, signature: tuple, step: int, param: str, mask: str,
             normalize: bool):
    del signature
    return what_if_mask(common.load_run_cached(path), step, param, mask=mask,
                        normalize=normalize)


@st.cache_data(show_spinner=False, max_entries=32)
def _what_if_row(path: str, signature: tuple, step: int, param: str, mask: str,
                 normalize: bool) -> dict[str, float]:
    return _what_if(path, signature, step, param, mask, normalize).as_row()


@st.cache_resource(show_spinner=False, max_entries=16)
def _what_if_figure(path: str, signature: tuple, step: int, param: str, mask: str,
                    normalize: bool):
    what_if = _what_if(path, signature, step, param, mask, normalize)
    label = f"mask={mask}, normalize={option_value(normalize)}"
    return mask_change(what_if.mask, what_if.mask_alt, param, label)


@st.cache_resource(show_spinner=False, max_entries=8)
def _flips(path: str, signature: tuple, step_a: int, step_b: int, param: str):
    """(flips, figure) of the mask side between two checkpoints."""
    flips = mask_flips(common.load_run_cached(path), step_a, step_b, param)
    return flips, mask_flip_map(flips.flips, param, step_a, step_b)


@st.cache_data(show_spinner=False, max_entries=4)
def _safetensors_bytes(path: str, signature: tuple, step: int, param: str) -> bytes:
    import torch

    views = {k: torch.from_numpy(v) for k, v in _views(path, signature, step, param).items()}
    return tensors_safetensors(views, param, step)


@st.cache_data(show_spinner=False, max_entries=4)
def _updated_csv(path: str, signature: tuple, step: int, param: str) -> bytes:
    return updated_entries_csv(updated_entries(common.load_run_cached(path), step, param))


# ------------------------------------------------------------------------------ page
st.title("Parameters: one weight tensor up close")
st.caption("Pick a run, a checkpoint step and a parameter: its pre-training importance I, "
           "fine-tuning importance G, keep-weight mask w and update Δ, cell by cell.")

runs = common.list_all_runs()
usable = runs[(runs["checkpoints"] > 0) & (runs["status"] != "damaged")]
if usable.empty:
    st.info("No run with a saved checkpoint yet. Train one on the Train page, or put run "
            "folders into your runs folder (sidebar).")
    st.stop()

ids = usable["id"].tolist()
paths = usable["path"].tolist()
selected = [p for p in common.selected_runs(runs) if p in paths]
preferred = selected[0] if selected else (
    paths[ids.index("samples/spider")] if "samples/spider" in ids else paths[0])
methods = dict(zip(usable["id"], usable["method"]))
top = st.columns([3, 3, 4])
rid = top[0].selectbox("Run", ids, index=paths.index(preferred),
                       format_func=lambda i: f"{i} ({methods[i]})",
                       help="Runs with at least one saved checkpoint.")
path = paths[ids.index(rid)]
if path != preferred:
    common.set_selected_runs([path] + [p for p in selected if p != path], runs)

try:
    run = common.load_run_cached(path)
    steps = run.steps
    method = run.method
except UserError as err:
    st.error(f"Run {rid} cannot be read: {err}")
    st.stop()
signature = common.run_signature(path)

with top[1]:
    if len(steps) > 1:
        # one key for every run (in the address as ?params_step=): a step the next run
        # lacks falls back to that run's last checkpoint
        step = st.select_slider("Checkpoint step", steps, value=steps[-1], key="params_step",
                                bind="query-params",
                                help="The steps at which the run saved a checkpoint.")
    else:
        step = steps[0]
        st.markdown(f"**Checkpoint step**  \n{step} (the run's only checkpoint)")

try:
    kept = _kept(path, signature, int(step))
except UserError as err:
    st.error(f"Checkpoint step {step} of run {rid} cannot be read: {err}")
    st.stop()

with top[2]:
    q1, q2 = st.columns([3, 1])
    query = q1.text_input("Find a parameter", key="params_query", bind="query-params",
                          placeholder="e.g. 3 down_proj, or projector",
                          help="Words that must all occur in the name, or a regular "
                               "expression when 'regex' is on.")
    regex = q2.toggle("regex", key="params_regex", bind="query-params")

names = kept.sort_values("kept", ascending=False, kind="stable")["param"].tolist()
# the parts the run did not train are listed too, marked frozen (not "not saved")
frozen_params, train_words = _frozen(path, signature)
is_frozen = set(frozen_params["param"]) - set(names)
names += [n for n in frozen_params["param"] if n in is_frozen]
try:
    matches = find_params(names, query, regex=regex)
except UserError as err:
    st.error(str(err))
    matches = names
if not matches:
    st.warning(f"No parameter of run {rid} matches {query!r}; showing all {len(names)}.")
    matches = names
is_kept = dict(zip(kept["param"], kept["kept"])) | dict.fromkeys(is_frozen, False)
wanted = st.query_params.get(PARAM_QUERY) or DEFAULT_PARAM
default_param = wanted if wanted in matches else next(
    (n for n in matches if is_kept[n]), matches[0])
param = st.selectbox(
    f"Parameter ({len(matches)} of {len(names)}; {int(kept['kept'].sum())} with saved tensors)",
    matches, index=matches.index(default_param),
    format_func=lambda n: n if is_kept[n] else (
        f"{n}  — frozen (not trained in this run)" if n in is_frozen
        else f"{n}  — tensor not saved"),
)
if st.query_params.get(PARAM_QUERY) != param:
    st.query_params[PARAM_QUERY] = param

have = available_kinds(method)
shown = [k for k in PANEL_KINDS if k in have]
options = run.options
option_text = options_text(method, options, only_changed=False)
lacking = [k for k in PANEL_KINDS if k not in have]
words = [_KIND_WORDS[k] for k in have]
note = (f"Method **{method}** ({option_text}) has, per weight: "
        + ", ".join(words[:-1]) + (" and " if len(words) > 1 else "") + words[-1] + ".")
if lacking:
    why = []
    if "importance_pre" in lacking:
        why.append("only SPIDER ranks weights by importance (I, G)")
    elif "importance_ft" in lacking:  # Dowser: I is its score, computed once at theta0
        why.append(f"{method} scores each weight once, before training: no fine-tuning "
                   "importance G")
    if "mask" in lacking:
        why.append(f"{method} has no per-weight mask (it updates every weight it trains)"
                   if method != "lora" else
                   "LoRA trains low-rank adapters, not a per-weight mask; Δ is the merged "
                   "adapter update")
    note += " Not available: " + ", ".join(_KIND_WORDS[k] for k in lacking) + " — " \
        + "; ".join(why) + "."
st.markdown(note)

# ------------------------------------------------------------------------------ frozen
if param in is_frozen:
    st.info(f"**{param}** is frozen: not trained in this run (`{train_words}`). It never "
            "moved from its pre-trained value θ0 (Δ = 0 everywhere), so the run has no "
            "mask, importances or statistics for it. Pick a trained parameter to see them.")
    st.stop()

# ------------------------------------------------------------------------------ not saved
row = kept.loc[kept["param"] == param].iloc[0]
pattern = run.config.get("save_tensors") or ""
if not row["kept"]:
    st.info(
        f"Run {rid} did not save the tensor of **{param}** in its checkpoints: it kept only "
        f"tensors matching its `--save-tensors` pattern `{pattern}` "
        f"({int(kept['kept'].sum())} of {len(kept)} trainable tensors). Its statistics were "
        "logged during training all the same; they are below. Pick a parameter without "
        "'tensor not saved' to see its heatmaps."
    )
    logged = common.run_frame(path, "layers")
    logged = logged[(logged["param"] == param) & (logged["step"] <= int(step))]
    if not logged.empty:
        names = [c for c in ("mask_density", "mask_mean", "importance_pre_mean",
                             "importance_ft_mean", "frac_ft_gt_pre", "update_rel_norm")
                 if c in logged.columns and statistics.reported_by(c, method)]
        shown = logged[["step", "numel", *names]].tail(5).copy()
        for name in names:  # None (not logged at that step) reads as an empty cell
            shown[name] = pd.to_numeric(shown[name], errors="coerce")

        def _title(name: str) -> str:
            text = statistics.label(name)
            return text[:1].upper() + text[1:]

        st.dataframe(
            shown.rename(columns={"numel": "weights", **{n: _title(n) for n in names}}),
            hide_index=True, width="stretch",
            column_config={_title(n): st.column_config.NumberColumn(
                format="percent" if statistics.is_percent(n) else "%" + statistics.fmt(n))
                for n in names})

else:
    # -------------------------------------------------------------------------- the tensor
    try:
        panels_fig, hist_fig, table, npz = _figures(path, signature, int(step), param)
        views = _views(path, signature, int(step), param)
    except UserError as err:
        st.error(f"The tensors of {param} at step {step} cannot be shown: {err}")
        st.stop()

    m = st.columns(4)
    m[0].metric("Shape", row["shape"], help=f"{int(row['numel']):,} weights")
    numbers = _numbers(path, signature, int(step), param)
    if "mask" in views:
        m[1].metric("Free to move (w > 0)", f"{numbers['free']:.2%}",
                    help="Share of this tensor's weights the method lets the task update.")
        m[2].metric("Mean keep-weight w", f"{numbers['mean_w']:.3f}",
                    help="1: plain fine-tuning; 0: the pre-trained tensor unchanged.")
    if "delta" in views:
        save_dtype = str(run.config.get("save_dtype", "float32"))
        unchanged = numbers["unchanged"]
        m[3].metric("Weights unchanged (Δ = 0)", f"{unchanged:.2%}",
                    help="Exactly at their pre-trained value θ0 in this checkpoint.")
        if save_dtype != "float32":
            # Said on the page, not in a tooltip (issue 25): side by side, "free 53 %" and
            # "unchanged 57 %" read as a contradiction until the rounding is named.
            pinned = (f" while only {numbers['pinned']:.2%} were pinned "
                      "(w = 0)" if "mask" in views else "")
            # significant bits of the format: an update below half a step of it rounds away
            bits = {"bfloat16": 8, "float16": 11}.get(save_dtype)
            resolution = (f", which keeps {bits} significant bits: an update smaller than "
                          f"about 1/{2 ** bits} of the weight's own size" if bits else
                          ": an update smaller than that format's resolution")
            st.markdown(
                f"**Why Δ = 0 for {unchanged:.2%} of the weights{pinned}:** this run saved "
                f"its checkpoints in {save_dtype}{resolution} rounds back to θ0 when the "
                "checkpoint is written. So some weights that were free to move moved too "
                "little to show, and read as unchanged.")

    st.markdown("**How to read it:** " + (
        "a weight may move where G is brighter than I; there w is blue. Where w is white "
        "(0) the weight was pinned to θ0 and Δ is white too." if "importance_pre" in views
        else "red and blue in Δ are weights the method moved up and down; white ones kept "
             "their pre-trained value θ0."))
    presentation.show_figure(panels_fig, key="params_panels", width="stretch")
    shape2d = (int(views[next(iter(views))].shape[0]),
               int(np.prod(views[next(iter(views))].shape[1:], dtype=np.int64)) or 1)
    n_panels = sum(k in views for k in PANEL_KINDS)
    st.caption("**What a cell is.** " + figures.cell_words(
        figures.panel_block(shape2d, n_panels), shape2d)
        + " Axes are shared: zoom one panel and all follow; hover gives row, column and "
          "value.")

    # -------------------------------------------------------------------------- sections
    # Below the panels, one section's figures at a time, in tabs that rerun the page: drawn
    # all at once, the four figures took ~0.4 s of the browser's time on every visit
    # (bench/bench_app.py). Every section's widgets stay on the page (hidden in closed tabs),
    # so their values, and the address that holds them, survive switching tabs.
    sections = [SECTION_STATISTICS, SECTION_DISTRIBUTIONS]
    if method == "spider":
        sections.append(SECTION_WHAT_IF)
    sections.append(SECTION_REGION)
    if "mask" in views and len(steps) > 1:
        sections.append(SECTION_FLIPS)
    tabs = dict(zip(sections, st.tabs(sections, key="params_section", on_change="rerun",
                                      bind="query-params")))
    with tabs[SECTION_STATISTICS]:
        if tabs[SECTION_STATISTICS].open:
            st.subheader("Statistics")
            st.dataframe(
                table.assign(kind=table["kind"].map(lambda k: KIND_LABELS.get(k, k))),
                hide_index=True, width="stretch",
                column_config={c: st.column_config.NumberColumn(format="%.4g")
                               for c in ("mean", "std", "min", "max")}
                | {"numel": st.column_config.NumberColumn("entries"),
                   "share_zero": st.column_config.NumberColumn("exactly 0", format="percent"),
                   "share_one": st.column_config.NumberColumn("exactly 1", format="percent")})
            if "importance_pre" in views and "importance_ft" in views:
                st.caption(
                    f"G − I on average {numbers['discrepancy_mean']:+.4f}; G > I for "
                    f"{numbers['frac_ft_gt_pre']:.2%} of the weights; correlation of I and G "
                    f"{numbers['correlation']:.3f} (near 0: the task relies on other weights "
                    "than pre-training did).")
    with tabs[SECTION_DISTRIBUTIONS]:
        if tabs[SECTION_DISTRIBUTIONS].open:
            st.subheader("Distributions")
            presentation.show_figure(hist_fig, key="params_hist", width="stretch")

    if SECTION_WHAT_IF in tabs:
        with tabs[SECTION_WHAT_IF]:
            st.subheader("What if: the same checkpoint under another SPIDER option")
            st.caption("The mask rebuilt from this checkpoint's θ0 and summed gradients S with "
                       "SPIDER's own function, under other options. It answers 'what would the "
                       "mask be right now'; a whole run with that option would also have "
                       "followed a different path. S was summed one way only, so the "
                       "accumulation cannot be changed here.")
            trained_mask = options.get("mask", "weighted")
            trained_norm = bool(options.get("normalize", True))
            w1, w2 = st.columns(2)
            alt_mask = w1.radio("Mask", ("weighted", "binary"),
                                index=1 if trained_mask == "weighted" else 0, horizontal=True,
                                key="params_whatif_mask", bind="query-params",
                                help="weighted: w = G/(I+G) where G > I; binary: w = 1 there.")
            alt_norm = w2.radio("Normalisation", (True, False), index=0 if trained_norm else 1,
                                format_func=lambda v: "on (divide by mean, cap at 1)" if v
                                else "off", horizontal=True, key="params_whatif_norm",
                                bind="query-params")
            if tabs[SECTION_WHAT_IF].open:
                what_if = _what_if(path, signature, int(step), param, alt_mask, alt_norm)
                trained_label = f"mask={trained_mask}, normalize={option_value(trained_norm)}"
                if what_if.alternative == what_if.options:
                    st.info(f"That is the run's own setting ({trained_label}): nothing "
                            "changes. Pick another option above.")
                r = _what_if_row(path, signature, int(step), param, alt_mask, alt_norm)
                c = st.columns(4)
                c[0].metric(f"Weights whose w changes (of {what_if.numel:,})",
                            f"{what_if.changed:,}", f"{r['share changed']:.1%} of the tensor",
                            delta_color="off", delta_arrow="off")
                c[1].metric("Switch pinned ↔ free", f"{what_if.flipped:,}",
                            help="Weights that go from w = 0 to w > 0 or back. The options "
                                 "here change how much a free weight moves, not which weights "
                                 "are free, so this is 0 unless the tie I = G is crossed.")
                c[2].metric(f"Mean w (as trained {r['mean w as trained']:.3f})",
                            f"{r['mean w what-if']:.3f}",
                            f"{r['mean w what-if'] - r['mean w as trained']:+.3f}",
                            delta_color="off")
                c[3].metric("Free to move (w > 0)", f"{r['share free what-if']:.2%}")
                if what_if.changed:
                    presentation.show_figure(
                        _what_if_figure(path, signature, int(step), param, alt_mask, alt_norm),
                        key="params_whatif_fig", width="stretch")

    with tabs[SECTION_REGION]:
        st.subheader("A region at full resolution")
        n_rows, n_cols = shape2d
        g = st.columns(4)
        row_from = g[0].number_input("Rows from", 0, n_rows - 1, 0, key="params_r0",
                                     bind="query-params")
        row_to = g[1].number_input("to (excluded)", 1, n_rows, min(n_rows, 64),
                                   key="params_r1", bind="query-params")
        col_from = g[2].number_input("Columns from", 0, n_cols - 1, 0, key="params_c0",
                                     bind="query-params")
        col_to = g[3].number_input("to (excluded)", 1, n_cols, min(n_cols, 64),
                                   key="params_c1", bind="query-params")
        if tabs[SECTION_REGION].open:
            region_rows, region_cols = region_bounds(shape2d, (row_from, row_to),
                                                     (col_from, col_to))
            presentation.show_figure(_region_figure(path, signature, int(step), param,
                                                    tuple(region_rows), tuple(region_cols)),
                                     key="params_region", width="stretch")
            st.caption(f"Up to {REGION_FULL}×{REGION_FULL} entries each cell is one weight, "
                       "and hover gives its row, column and exact value; a larger region is "
                       "pooled. Rows and columns count from 0 in the whole tensor"
                       + (" (viewed as rows × the rest of its dimensions)."
                          if len(row["shape"].split("×")) > 2 else "."))

    if SECTION_FLIPS in tabs:
        with tabs[SECTION_FLIPS]:
            st.subheader("Mask flips between two checkpoints")
            f1, f2 = st.columns(2)
            earlier = [s for s in steps if s < int(step)] or [s for s in steps if s != int(step)]
            step_a = f1.selectbox("From step", earlier, index=0, key="params_flip_from",
                                  bind="query-params")
            f2.markdown(f"**To step**  \n{step} (the checkpoint chosen above)")
            if tabs[SECTION_FLIPS].open:
                flips, flips_fig = _flips(path, signature, int(step_a), int(step), param)
                k = st.columns(3)
                k[0].metric("Pinned → free", f"{flips.freed:,}",
                            help="Entries with w = 0 at the first step and w > 0 at the second.")
                k[1].metric("Free → pinned", f"{flips.pinned:,}",
                            help="Entries with w > 0 at the first step and w = 0 at the second.")
                k[2].metric("Share that flipped",
                            f"{(flips.freed + flips.pinned) / flips.numel:.2%}")
                presentation.show_figure(flips_fig, key="params_flips", width="stretch")

    # -------------------------------------------------------------------------- downloads
    # the two files below are made only when asked for (a CSV of a large tensor's moved
    # entries can be big); the count comes from Δ, already read
    n_moved = numbers.get("moved", 0)
    d1, d2 = st.columns(2)
    safe = param.replace("/", "_")
    d1.download_button(
        "Download the tensors (.npz, every weight)", npz,
        file_name=f"{run.name}-step{step}-{safe}.npz",
        mime="application/octet-stream", key="params_npz", on_click="ignore",
        help="Every kind shown above (I, G, w, Δ, θ as the method has them) at full "
             "resolution, one float32 array each in the tensor's shape. "
             "numpy.load(file) reads it (no pickle).")
    d2.download_button(
        "Download the statistics (.csv)", table.to_csv(index=False).encode(),
        file_name=f"{run.name}-step{step}-{safe}-stats.csv", mime="text/csv",
        key="params_csv", on_click="ignore")
    d1.download_button(
        "Download the tensors (.safetensors, every weight)",
        lambda: _safetensors_bytes(path, signature, int(step), param),
        file_name=f"{run.name}-step{step}-{safe}.safetensors",
        mime="application/octet-stream", key="params_safetensors", on_click="ignore",
        help="The same arrays as the .npz, as a safetensors file (param and step in its "
             "metadata): safetensors.torch.load_file(file) reads it.")
    d2.download_button(
        f"Download the updated entries (.csv, {n_moved:,} rows)",
        lambda: _updated_csv(path, signature, int(step), param),
        file_name=f"{run.name}-step{step}-{safe}-updated.csv", mime="text/csv",
        key="params_updated_csv", on_click="ignore",
        help="Every entry with Δ ≠ 0: row, col (the tensor viewed as rows × the rest), "
             "theta0, value (θ at this step) and delta; floats to 9 significant digits, "
             "which give back each float32 exactly.")

# ------------------------------------------------------------------------------ kept tensors
# drawn only once opened (it reruns the page): a closed expander's table is drawn all the same
with st.expander(f"Which tensors this run kept ({int(kept['kept'].sum())} of {len(kept)})",
                 key="params_kept", on_change="rerun") as kept_box:
    if kept_box.open:
        if pattern:
            st.caption(f"The run saved only tensors matching `--save-tensors {pattern}`; "
                       "statistics of every trainable tensor were logged all the same.")
        st.dataframe(kept, hide_index=True, width="stretch")
