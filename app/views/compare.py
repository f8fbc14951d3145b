"""Compare: runs side by side — how much each kept (upstream) and learned (downstream).

Hundreds of runs stay usable (issue 24): filters by method, status, data and name narrow
the chooser and the runs table, and the table is paged. Every view setting is in the page
address (``bind="query-params"``), so a reload or a shared link shows the same view.

Thin page: the runs table comes from ``app.common.list_all_runs`` (no tensors read), the
curves and cells from ``analysis.explore``, the figures from ``analysis.figures`` (the same
functions the HTML report draws with).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import explore
from analysis import figures as fig
from app import common, presentation

# First visit: these sample runs are chosen (SPIDER against the baselines that tell most);
# the others are a click away in the table and the chooser.
_FIRST_CHOICE = ("spider", "full", "hybrid", "magnitude_mask", "lora", "wise_ft")
# scores right after the run's name and status, so that they are in view on a laptop screen
_TABLE_COLUMNS = {
    "id": "run", "method": "method", "status": "status", "U": "U", "D": "D", "H": "H",
    "evaluated_on": "D measured on", "E": "E", "F": "F", "O": "O", "steps": "steps",
    "options": "options", "data": "data",
}
# the score columns' headers: the letter (as the captions, the report and the CSV name it)
# and its word, so that the table reads without the legend
_SCORE_WORDS = {
    "U": ("U upstream", "upstream score: pre-training ability kept, 0–1"),
    "D": ("D downstream", "downstream score: the new task, 0–1"),
    "H": ("H balance", "H = 2UD/(U+D): high only when both U and D are"),
    "E": ("E task gained", "E = D − D at step 0: the task gained"),
    "F": ("F upstream change", "F = U − U at step 0: negative = forgotten"),
    "O": ("O overall", "O = E + F: the task gained plus the upstream change"),
}
# methods that change the weights once, after the last training step (Method.finalize)
_POST_HOC = ("wise_ft", "dare", "tailor")
# rows of the runs table at a time: with hundreds of runs the table is paged (issue 24), so
# a page stays quick to send and to read
TABLE_PAGE_ROWS = 50


def filter_runs(runs: pd.DataFrame, methods=(), statuses=(), data=(), text: str = ""
                ) -> pd.DataFrame:
    """The rows of ``runs`` with one of ``methods``, ``statuses`` and ``data`` (an empty
    choice keeps all) whose id or name holds every word of ``text`` (case ignored)."""
    keep = pd.Series(True, index=runs.index)
    for column, wanted in (("method", methods), ("status", statuses), ("data", data)):
        if wanted:
            keep &= runs[column].astype(str).isin([str(w) for w in wanted])
    names = (runs["id"] + " " + runs["name"]).str.lower()
    for word in text.lower().split():
        keep &= names.str.contains(word, regex=False)
    return runs[keep]


def _text_width(values, title: str) -> int:
    """Pixels a text column needs to show its longest entry whole (about 7.5 px a character
    in the table's font), within 60–360."""
    longest = max([len(title), *(len(str(v)) for v in values)], default=len(title))
    return int(min(360, max(60, 7.5 * longest + 24)))

st.title("Compare runs")
st.caption(
    "Each run fine-tuned the same small model on a new task (downstream) and was scored "
    "along the way on what it knew before (upstream). Good methods learn the task without "
    "forgetting: **U stays high while D rises**."
)

runs = common.list_all_runs()
if runs.empty:
    st.info(f"No runs found. Bundled samples live in `{common.bundled_runs_root()}`; your "
            f"own go to `{common.user_runs_root()}` (Train page, or `python -m spider.train`).")
    st.stop()

label_of = dict(zip(runs["path"], runs["id"]))
method_of = dict(zip(runs["path"], runs["method"]))
# Colours in a fixed order of all runs (the first-choice samples, the other samples, then the
# user's runs by name), so that a run keeps its colour whatever is chosen.
_rank = {name: i for i, name in enumerate(_FIRST_CHOICE)}
colors = fig.run_colors(sorted(
    runs["id"], key=lambda rid: (not rid.startswith(common.SAMPLES_PREFIX),
                                 _rank.get(rid.removeprefix(common.SAMPLES_PREFIX), 99), rid)))


def _default_selection() -> list[str]:
    """First visit: the sample runs of :data:`_FIRST_CHOICE` that are results."""
    samples = common.result_runs(runs[runs["root"] == "samples"])
    by_name = dict(zip(samples["name"], samples["path"]))
    return [by_name[n] for n in _FIRST_CHOICE if n in by_name]


selected = common.selected_runs(runs, default=_default_selection())

# ----------------------------------------------------------------------------- find runs
# Filters narrow the chooser and the table (hundreds of runs, issue 24); they sit in the
# page address like every view setting here (bind="query-params"), so a link shows the same.
_STATUS_ORDER = [*common.STATUS_COLORS, *sorted(set(runs["status"]) - set(common.STATUS_COLORS))]
# (a secondary control: presentation mode hides it, the filters in the address still apply)
_filters = st.container(key=presentation.secondary_key("compare_filters"))
f1, f2, f3, f4 = _filters.columns([2, 2, 2, 3])
want_methods = f1.multiselect("Method", sorted(runs["method"].unique()), key="compare_method",
                              bind="query-params", placeholder="any method")
want_status = f2.multiselect("Status", [s for s in _STATUS_ORDER if s in set(runs["status"])],
                             key="compare_status", bind="query-params",
                             placeholder="any status")
want_data = f3.multiselect("Data", sorted(runs["data"].dropna().astype(str).unique()),
                           key="compare_data", bind="query-params", placeholder="any data")
want_text = f4.text_input("Name contains", key="compare_search", bind="query-params",
                          placeholder="words of the run's name",
                          help="Every word must occur in the run's name (case ignored).")
matching = filter_runs(runs, want_methods, want_status, want_data, want_text)

# ----------------------------------------------------------------------------- choose runs
_PICK_KEY = "compare_pick"
if _PICK_KEY not in st.session_state or st.session_state[_PICK_KEY] != selected:
    # the widget's state is dropped when another page is shown: start from the selection
    st.session_state[_PICK_KEY] = selected


def _on_pick() -> None:
    common.set_selected_runs(st.session_state[_PICK_KEY], runs)


# the chosen runs stay options whatever the filters say (else the widget would drop them)
pick_options = selected + [p for p in matching["path"] if p not in set(selected)]
if len(matching) < len(runs):
    st.caption(f"{len(matching)} of {len(runs)} runs match the filters: the chooser offers "
               "those, and the runs already chosen.")
# matched as typed text, not fuzzily, and no "Select all matches": "full" + Enter adds the
# first run whose name or method holds "full", one run, not every run whose letters f-u-l-l
# appear in order
st.multiselect(
    "Runs to compare", options=pick_options, key=_PICK_KEY, on_change=_on_pick,
    format_func=lambda p: f"{label_of[p]} ({method_of[p]})",
    filter_mode="contains", select_all=False,
    help="The choice carries to the other pages and sits in the page address, so a link "
         "or a reload keeps it.",
)
include_bad = st.checkbox(
    "Also chart failed, cancelled, damaged and stopped runs", value=False,
    key="compare_include_bad", bind="query-params",
    help="They are listed in the table either way; by default their partial results stay "
         "out of the charts.",
)
chosen = runs[runs["path"].isin(st.session_state[_PICK_KEY])]
chosen = chosen.set_index("path").loc[st.session_state[_PICK_KEY]].reset_index()
charted = common.result_runs(chosen, include_bad)
charted = charted[charted["status"] != "damaged"]  # unreadable either way
left_out = chosen[~chosen["path"].isin(charted["path"])]

# ----------------------------------------------------------------------------- the table
st.subheader("Runs")
only_chosen = st.toggle("Only the chosen runs", key="compare_only_chosen", bind="query-params",
                        help="Off: the chosen runs first (ticked), then every run the "
                             "filters above let through.")
order = {path: i for i, path in enumerate(chosen["path"])}  # chosen first, as chosen
listed = chosen if only_chosen else pd.concat(
    [chosen, matching[~matching["path"].isin(order)]], ignore_index=True)
listed = listed.assign(chosen=listed["path"].isin(order))
n_pages = max(1, -(-len(listed) // TABLE_PAGE_ROWS))
if n_pages > 1:
    # a page number that a link or an old address carries past the end shows the last page
    table_page = st.number_input(
        f"Table page (of {n_pages})", min_value=1, value=1, step=1, key="compare_table_page",
        bind="query-params",
        help=f"{TABLE_PAGE_ROWS} runs a page; the filters above narrow the list.")
    table_page = min(int(table_page), n_pages)
else:
    table_page = 1
first = (table_page - 1) * TABLE_PAGE_ROWS
page_rows = listed.iloc[first:first + TABLE_PAGE_ROWS]
shown_table = page_rows[["chosen", *_TABLE_COLUMNS]].rename(columns=_TABLE_COLUMNS)
st.dataframe(
    shown_table.style.map(common.status_style, subset=["status"]),
    hide_index=True, width="stretch",
    column_config={
        "chosen": st.column_config.CheckboxColumn(
            "chosen", width=60, help="Chosen in 'Runs to compare' above: charted below."),
        **{name: st.column_config.TextColumn(width=_text_width(shown_table[name], name))
           for name in ("run", "method", "status", "options", "data")},
        "D measured on": st.column_config.TextColumn(
            width=_text_width(shown_table["D measured on"], "D measured on"),
            help="the downstream evaluation data (the task's test split, a separate "
                 "--eval-data file, or records held out of the training file) and how many "
                 "of its examples were scored: \"100 of 300\" = 100 scored (--eval-limit) of "
                 "the 300 it holds"),
        "steps": st.column_config.NumberColumn(help="training steps done", width="small"),
        **{k: st.column_config.NumberColumn(word, help=why, format="%.3f",
                                            width=int(7.5 * len(word) + 24))
           for k, (word, why) in _SCORE_WORDS.items()},
    },
)
shown_from = f"runs {first + 1}–{first + len(page_rows)} of {len(listed)}" if n_pages > 1 \
    else f"{len(listed)} runs"
st.caption(
    f"{shown_from}; {len(chosen)} chosen, ticked and listed first. "
    "**U** upstream score (pre-training ability kept, 0–1) · **D** downstream score (the "
    "task, 0–1) · **H** = 2UD/(U+D), high only when both are · **E** = D − D at step 0 "
    "(task gained) · **F** = U − U at step 0 (negative = forgotten) · **O** = E + F. "
    "Scores at each run's last evaluation."
)
problems = runs[(runs["status"] == "damaged") & (runs["problem"] != "")]
for _, row in problems.iterrows():
    st.warning(f"{row['id']} cannot be read: {row['problem']}")
if not left_out.empty:
    st.info("Not charted (" + ", ".join(f"{r.id}: {r.status}" for r in left_out.itertuples())
            + "). Tick the box above to chart them.")
if charted.empty:
    st.info("Choose at least one finished or running run above to see charts.")
    st.stop()

scored = charted.dropna(subset=["eval_examples"])
if scored["eval_examples"].nunique() > 1:
    st.warning(
        "The charted runs' downstream scores D were measured on different numbers of "
        "examples (" + ", ".join(f"{r.id}: {int(r.eval_examples)}"
                                 for r in scored.itertuples())
        + "): a score from fewer examples is noisier, so small differences between them "
        "may be chance.")

paths = charted["path"].tolist()
labels = [label_of[p] for p in paths]
# what the charts depend on: each run's files (signature), its label and colour
key = tuple((p, common.run_signature(p), label_of[p], colors[label_of[p]]) for p in paths)


def _frames(key: tuple, what: str):
    return common.runs_frame([k[0] for k in key], what, [k[2] for k in key])


# Figures are cached whole (building a plotly figure costs a tenth of a second or more):
# a rerun that changes nothing they show reuses them.
@st.cache_resource(show_spinner=False, max_entries=64)
def _curves_figure(key: tuple, x: str, smoothing: float, log_y: bool):
    metrics, train = _frames(key, "metrics"), _frames(key, "train")
    if metrics.empty:
        return None
    curves = explore.smooth_frame(explore.score_curves_frame(metrics, train), "score",
                                  smoothing, by=("run", "split"))
    return fig.compare_score_curves(curves, {k[2]: k[3] for k in key}, x=x, log_y=log_y)


@st.cache_resource(show_spinner=False, max_entries=64)
def _loss_figure(key: tuple, x: str, smoothing: float, log_y: bool):
    train = _frames(key, "train")
    if train.empty:
        return None
    loss = explore.smooth_frame(explore.loss_curves_frame(train), "loss", smoothing,
                                by=("run",))
    return fig.compare_loss_curves(loss, {k[2]: k[3] for k in key}, x=x, log_y=log_y)


@st.cache_resource(show_spinner=False, max_entries=32)
def _tradeoff_figure(key: tuple, methods: tuple):
    metrics = _frames(key, "metrics")
    if metrics.empty:
        return None
    symbols = {k[2]: fig.method_symbol(m) for k, m in zip(key, methods)}
    return fig.tradeoff_plane(metrics, colors={k[2]: k[3] for k in key}, symbols=symbols)


@st.cache_resource(show_spinner=False, max_entries=32)
def _cells(key: tuple):
    """(cells table, {"score": figure, "change": figure}) or (empty table, None)."""
    metrics = _frames(key, "metrics")
    cells = explore.cells_long(metrics) if not metrics.empty else pd.DataFrame()
    if cells.empty:
        return cells, None
    return cells, {v: fig.cells_heatmap(cells, v) for v in ("score", "change")}


# ----------------------------------------------------------------------------- curves
st.subheader("Over training")
c1, c2, c3 = st.columns([1.2, 2, 1])
x_axis = c1.radio("x axis", ["step", "training time"], horizontal=True,
                  key="compare_x", bind="query-params",
                  help="Training time adds up the steps' own times (evaluations excluded).")
smoothing = c2.slider("Smoothing", 0.0, 0.95, 0.0, 0.05, key="compare_smoothing",
                      bind="query-params",
                      help="Exponential moving average: 0 = raw values, 0.9 ≈ the last 10 "
                           "points.")
log_y = c3.toggle("Log scale (y)", value=False, key="compare_log_y", bind="query-params")
x = "step" if x_axis == "step" else "time_s"

figure = _curves_figure(key, x, smoothing, log_y)
if figure is None:
    st.info("The chosen runs have no evaluation scores yet.")
else:
    presentation.show_figure(figure)
loss_figure = _loss_figure(key, x, smoothing, log_y)
if loss_figure is not None:
    with st.expander("Training loss", expanded=False):
        presentation.show_figure(loss_figure)
post_hoc = [f"{label_of[p]} ({method_of[p]})" for p in paths if method_of[p] in _POST_HOC]
if post_hoc:
    st.caption(
        "WiSE-FT, DARE and Tailor act after training: they fine-tune like full fine-tuning, "
        "then change the weights once at the end (WiSE-FT blends them back toward the base "
        "model, DARE drops most of the update, Tailor keeps its most salient part). The "
        "jump at the last step of " + ", ".join(post_hoc) + " is that change.")

# ----------------------------------------------------------------------------- trade-off
tradeoff = _tradeoff_figure(key, tuple(method_of[p] for p in paths))
if tradeoff is not None:
    st.subheader("Trade-off: kept vs learned")
    st.caption("Each run's path from the base model (step 0) to its last evaluation. Up and "
               "to the right is better; crossing the dotted lines of equal H is a real gain, "
               "moving along one is a trade.")
    presentation.show_figure(tradeoff)


# ----------------------------------------------------------------------------- output drift
@st.cache_resource(show_spinner=False, max_entries=32)
def _drift_figures(key: tuple):
    """(drift curves, F against kl_to_base) or None when no charted run logged drift."""
    from analysis.figures import attribution as drift_fig

    metrics = _frames(key, "metrics")
    if metrics.empty or not metrics["metric"].isin(drift_fig.DRIFT_METRICS).any():
        return None
    run_colors = {k[2]: k[3] for k in key}
    return (drift_fig.drift_curves(metrics, run_colors),
            drift_fig.forgetting_vs_drift(drift_fig.forgetting_drift_table(metrics),
                                          run_colors))


st.subheader("Output drift: how the old answers changed")
drift = _drift_figures(key)
if drift is None:
    st.info("The charted runs have no drift metrics (kl_to_base, format and content errors, "
            "answer-type drift): runs made before these were logged lack them, and a new "
            "run logs them at every evaluation.")
else:
    st.caption("On the upstream questions: kl_to_base is how far the answer distribution "
               "moved from the base model's; format errors are answers in the wrong form, "
               "content errors answers of the right form but wrong; answer-type drift is the "
               "share answered in the downstream task's form. The Learn page explains them.")
    presentation.show_figure(drift[0])
    presentation.show_figure(drift[1])

# ----------------------------------------------------------------------------- 2x2 cells
st.subheader("2×2 generalisation cells")
cells, cell_figures = _cells(key)
if cell_figures is None:
    st.info("None of the charted runs scored the 2×2 cells.")
else:
    st.markdown("\n".join(
        f"- **{name}** (`{cell}`): {meaning}"
        for cell, (name, meaning) in explore.CELL_MEANINGS.items()))
    if (cells["source"] == "downstream").any():
        st.caption("`idimg-idq` is the downstream test split itself, so its score is the "
                   "run's downstream score D (not evaluated twice).")
    shown = st.radio("Show", ["score", "change since the base model"], horizontal=True,
                     key="compare_cells_value", bind="query-params")
    presentation.show_figure(cell_figures["score" if shown == "score" else "change"])

# ----------------------------------------------------------------------------- downloads
st.subheader("Download")
runs_csv = chosen[["id", "method", "options", "data", "evaluated_on", "eval_examples",
                   "status", "steps", "U", "D", "H", "E", "F", "O", "path"]].rename(
    columns={"id": "run", "evaluated_on": "D measured on", "eval_examples": "D examples"})
# Scores are sums of 0.01s: 0.92, not 0.9199999999999999 (15 significant digits keep every
# float a run can log, without the last binary digit's noise).
_FLOATS = "%.15g"
d1, d2, d3 = st.columns(3)
# on_click="ignore": a download needs no rerun, and a rerun would re-register the other
# buttons' files while the browser may still be fetching one (a 404 for the HTML report)
d1.download_button("Runs table (CSV)", runs_csv.to_csv(index=False, float_format=_FLOATS),
                   "runs.csv", "text/csv", on_click="ignore")
if not cells.empty:
    d2.download_button("2×2 cells (CSV)", cells.to_csv(index=False, float_format=_FLOATS),
                       "cells.csv", "text/csv", on_click="ignore")


@st.cache_data(show_spinner=False, max_entries=4)
def _report_bytes(key: tuple, title: str) -> bytes:
    from analysis import report  # only when asked for: plotly.js and the report's code

    # the runs named and coloured as on this page
    return report.render_report([k[0] for k in key], title=title, labels=[k[2] for k in key],
                                colors={k[2]: k[3] for k in key}).encode("utf-8")


def _report_html() -> bytes:
    return _report_bytes(key, "Spiderscope: " + ", ".join(labels))


d3.download_button("HTML report (opens offline)", _report_html, "spiderscope-report.html",
                   "text/html", on_click="ignore",
                   help="Tables, score curves, trade-off plane and mask heatmaps of the "
                   "charted runs in one self-contained file (about 5 MB).")
