"""Tables behind the app's Compare and Layers pages (tidy DataFrames in and out, no drawing).

Compare: score curves over steps or training time (:func:`score_curves_frame`,
:func:`loss_curves_frame`, smoothed by :func:`smooth`), and the 2x2 generalisation cells with
their change since the base model (:func:`cells_long`, meanings in :data:`CELL_MEANINGS`).

Layers: plain names for components, layers and modules (:func:`layer_name`,
:func:`module_name`), filters (:func:`filter_layers`), one row per layer at a step with its
importance discrepancy, mask density and update size (:func:`layer_table`), a layer x step
matrix for heatmaps (:func:`layer_step_matrix`) and a colour range fitted to the data
(:func:`fitted_range`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis import stats
from spider import statistics
from spider.naming import COMPONENTS, component_rank

# --------------------------------------------------------------------------------------------
# Compare: curves
# --------------------------------------------------------------------------------------------

CURVE_COLUMNS = ("run", "method", "split", "step", "time_s", "score")
LOSS_COLUMNS = ("run", "method", "step", "time_s", "loss")
SPLIT_NAMES = {
    "upstream": "Upstream: pre-training ability kept",
    "downstream": "Downstream: the fine-tuning task",
}


def training_time(train_df: pd.DataFrame) -> pd.DataFrame:
    """Seconds of training through each step, per run: columns run, step, time_s.

    The sum of the steps' own times (``seconds`` of :attr:`analysis.Run.train`), so evaluation
    pauses are not counted; step 0 (before training) is at 0 s. NaN for runs that did not log
    step times.
    """
    stats.require_columns(train_df, ("run", "step"), "train DataFrame")
    rows = [pd.DataFrame({"run": pd.unique(train_df["run"]), "step": 0, "time_s": 0.0})]
    if len(train_df):
        seconds = (pd.to_numeric(train_df["seconds"], errors="coerce").astype(float)
                   if "seconds" in train_df.columns else pd.Series(np.nan, index=train_df.index))
        part = pd.DataFrame({"run": train_df["run"], "step": train_df["step"].astype("int64"),
                             "seconds": seconds})
        # a resumed run may log a step twice: keep the last
        part = part.drop_duplicates(["run", "step"], keep="last").sort_values(["run", "step"])
        part["time_s"] = part.groupby("run", sort=False)["seconds"].cumsum(skipna=False)
        rows.append(part[["run", "step", "time_s"]])
    out = pd.concat(rows, ignore_index=True).drop_duplicates(["run", "step"], keep="last")
    return out.reset_index(drop=True)


def _with_time(frame: pd.DataFrame, train_df: pd.DataFrame | None) -> pd.DataFrame:
    if train_df is None or train_df.empty:
        return frame.assign(time_s=np.nan)
    times = training_time(train_df)
    out = frame.merge(times, on=["run", "step"], how="left")
    # an evaluation logged at a step with no train event (step 0 of a run without training)
    return out


def score_curves_frame(metrics_df: pd.DataFrame, train_df: pd.DataFrame | None = None,
                       splits: Sequence[str] = ("upstream", "downstream")) -> pd.DataFrame:
    """Main score per (run, split, evaluated step), with the training time at that step.

    Columns :data:`CURVE_COLUMNS`; a step evaluated twice (resumed run) keeps its last value;
    sorted by run (first-seen order), split, step.
    """
    stats.require_columns(metrics_df, stats.METRICS_COLUMNS, "metrics DataFrame")
    rows = metrics_df[(metrics_df["metric"] == "score") & metrics_df["split"].isin(splits)]
    rows = rows.drop_duplicates(subset=["run", "step", "split"], keep="last")
    frame = pd.DataFrame({"run": rows["run"], "method": rows["method"], "split": rows["split"],
                          "step": rows["step"].astype("int64"),
                          "score": rows["value"].astype(float)})
    frame = _with_time(frame, train_df)
    order = {run: i for i, run in enumerate(pd.unique(metrics_df["run"]))}
    split_order = {s: i for i, s in enumerate(splits)}
    frame = frame.assign(_r=frame["run"].map(order), _s=frame["split"].map(split_order))
    frame = frame.sort_values(["_r", "_s", "step"]).drop(columns=["_r", "_s"])
    return frame.loc[:, list(CURVE_COLUMNS)].reset_index(drop=True)


def loss_curves_frame(train_df: pd.DataFrame) -> pd.DataFrame:
    """Training loss per (run, step) with the training time: columns :data:`LOSS_COLUMNS`."""
    stats.require_columns(train_df, ("run", "method", "step", "loss"), "train DataFrame")
    frame = train_df.drop_duplicates(["run", "step"], keep="last")
    frame = pd.DataFrame({"run": frame["run"], "method": frame["method"],
                          "step": frame["step"].astype("int64"),
                          "loss": pd.to_numeric(frame["loss"], errors="coerce").astype(float)})
    frame = _with_time(frame, train_df)
    return frame.loc[:, list(LOSS_COLUMNS)].reset_index(drop=True)


def smooth(values: Iterable[float], weight: float) -> np.ndarray:
    """Exponential moving average with bias correction: ``weight`` 0 returns the values,
    0.9 averages over about the last 10 points. The first point is the first value (not
    pulled towards 0); NaN values are skipped and stay NaN."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    out = np.full_like(x, np.nan)
    avg, norm = 0.0, 0.0
    for i, value in enumerate(x):
        if math.isnan(value):
            continue
        avg = weight * avg + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out[i] = avg / norm
    return out


def smooth_frame(frame: pd.DataFrame, value: str, weight: float,
                 by: Sequence[str] = ("run", "split")) -> pd.DataFrame:
    """``frame`` with column ``value`` smoothed (:func:`smooth`) along ``step`` within each
    group of ``by`` (those of ``by`` present in the frame)."""
    if weight == 0 or frame.empty:
        return frame
    keys = [k for k in by if k in frame.columns]
    out = frame.sort_values([*keys, "step"]).copy()
    out[value] = out.groupby(keys, sort=False)[value].transform(
        lambda s: pd.Series(smooth(s.to_numpy(float), weight), index=s.index))
    return out.loc[frame.index]


# --------------------------------------------------------------------------------------------
# Compare: the 2x2 cells
# --------------------------------------------------------------------------------------------

CELL_MEANINGS = {
    "idimg-idq": ("Task images, task questions",
                  "the downstream test itself: what fine-tuning taught."),
    "idimg-oodq": ("Task images, pre-training questions",
                   "old questions about the new images: is the old skill kept on new inputs?"),
    "oodimg-idq": ("Other-looking images, task questions",
                   "the task on images unlike the training ones: does the new skill generalise?"),
    "oodimg-oodq": ("Pre-training images and questions",
                    "old skill on old data: forgetting shows here."),
}
"""Cell -> (short name, one line on what its score means)."""

CELLS_LONG_COLUMNS = ("run", "method", "step", "cell", "score", "base", "change", "source")


def cells_long(metrics_df: pd.DataFrame) -> pd.DataFrame:
    """The 2x2 cells at each run's last step that scored a cell, with the base model's score
    (the run's step 0) and the change since. One row per (run, cell): columns
    :data:`CELLS_LONG_COLUMNS`.

    ``idimg-idq`` is the downstream test split itself (task images and questions), so the
    runner does not evaluate it twice: where it is missing it is the run's downstream score
    at the same step (``source`` = ``downstream``; else ``cell``). Runs with no cell scores
    are left out.
    """
    stats.require_columns(metrics_df, stats.METRICS_COLUMNS, "metrics DataFrame")
    rows = metrics_df[(metrics_df["metric"] == "score")
                      & metrics_df["split"].isin((*stats.CELLS, "downstream"))]
    rows = rows.drop_duplicates(subset=["run", "step", "split"], keep="last")
    records = []
    for run in pd.unique(metrics_df["run"]):
        mine = rows[rows["run"] == run]
        cells = mine[mine["split"].isin(stats.CELLS)]
        if cells.empty:
            continue
        method = str(mine["method"].iloc[0])
        last = int(cells["step"].max())
        first = int(mine["step"].min())

        for cell in stats.CELLS:
            score, source = _cell_score(mine, last, cell)
            base = _cell_score(mine, 0, cell)[0] if first == 0 else math.nan
            records.append({"run": run, "method": method, "step": last, "cell": cell,
                            "score": score, "base": base, "change": score - base,
                            "source": source})
    out = pd.DataFrame.from_records(records, columns=list(CELLS_LONG_COLUMNS))
    out["step"] = out["step"].astype("int64")
    for column in ("score", "base", "change"):
        out[column] = out[column].astype(float)
    return out


def _cell_score(rows: pd.DataFrame, step: int, cell: str) -> tuple[float, str]:
    """(score, source) of ``cell`` at ``step`` among one run's score rows: the cell's own
    evaluation, else for ``idimg-idq`` the downstream score, else NaN."""
    hit = rows[(rows["step"] == step) & (rows["split"] == cell)]
    if len(hit):
        return float(hit["value"].iloc[-1]), "cell"
    if cell == "idimg-idq":
        hit = rows[(rows["step"] == step) & (rows["split"] == "downstream")]
        if len(hit):
            return float(hit["value"].iloc[-1]), "downstream"
    return math.nan, "missing"


def cells_wide(cells: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """:func:`cells_long` as one row per run (run, method, step, then one column per cell)."""
    if value not in ("score", "base", "change"):
        raise ValueError(f"value must be score, base or change, got {value!r}")
    if cells.empty:
        return pd.DataFrame(columns=["run", "method", "step", *stats.CELLS])
    wide = cells.pivot(index=["run", "method", "step"], columns="cell", values=value)
    wide = wide.reindex(columns=list(stats.CELLS)).reset_index()
    order = {run: i for i, run in enumerate(pd.unique(cells["run"]))}
    wide = wide.sort_values("run", key=lambda c: c.map(order)).reset_index(drop=True)
    wide.columns.name = None
    return wide


# --------------------------------------------------------------------------------------------
# Layers: plain names and filters
# --------------------------------------------------------------------------------------------

COMPONENT_NAMES = {"vision": "vision encoder", "projector": "projector",
                   "llm": "language model", "other": "other"}
MODULE_NAMES = {
    "q_proj": "attention: query", "k_proj": "attention: key", "v_proj": "attention: value",
    "o_proj": "attention: output", "gate_proj": "MLP: gate", "up_proj": "MLP: up",
    "down_proj": "MLP: down", "fc1": "MLP: first layer", "fc2": "MLP: second layer",
    "embeddings": "embeddings", "norm": "normalisation", "lm_head": "output head",
    "linear_1": "projector: first layer", "linear_2": "projector: second layer",
    "other": "other",
}
_COMPONENT_ORDER = COMPONENTS  # model order: spider.naming, the one place


def component_name(component: str) -> str:
    return COMPONENT_NAMES.get(str(component), str(component))


def module_name(module: str) -> str:
    """A module's plain name (``down_proj`` -> ``MLP: down``); unknown names unchanged."""
    return MODULE_NAMES.get(str(module), str(module))


def layer_name(component: str, layer) -> str:
    """``language model · block 3``; parameters outside blocks: ``language model · outside
    blocks`` (embeddings, final norm, output head); the projector has no blocks."""
    name = component_name(component)
    if layer is None or pd.isna(layer):
        return name if component == "projector" else f"{name} · outside blocks"
    return f"{name} · block {int(layer)}"


def _layer_sort_key(component: str, layer) -> tuple:
    return (component_rank(component), -1 if layer is None or pd.isna(layer) else int(layer))


def filter_layers(layers_df: pd.DataFrame, components: Iterable[str] | None = None,
                  modules: Iterable[str] | None = None) -> pd.DataFrame:
    """Rows of a layers frame whose component and module are among those given (None: all)."""
    stats.require_columns(layers_df, ("component", "module"), "layers DataFrame")
    keep = pd.Series(True, index=layers_df.index)
    if components is not None:
        keep &= layers_df["component"].isin(list(components))
    if modules is not None:
        keep &= layers_df["module"].isin(list(modules))
    return layers_df[keep]


def nearest_step(steps: Iterable[int], step: int) -> int:
    """The logged step closest to ``step`` (the earlier one on a tie)."""
    steps = sorted(int(s) for s in steps)
    if not steps:
        raise ValueError("no logged steps")
    return min(steps, key=lambda s: (abs(s - step), s))


# --------------------------------------------------------------------------------------------
# Layers: tables
# --------------------------------------------------------------------------------------------

# statistics the layer tables pool with their own function (the rest: stats.pooled)
_POOLED_BY = {
    "update_rel_norm": lambda df, by: stats.update_size(df, by=by),
    "discrepancy_mean": lambda df, by: stats.layer_discrepancy(df, by=by),
    "correlation": lambda df, by: stats.layer_discrepancy(df, by=by),
}
# the per-tensor statistics of the vocabulary a heatmap offers, pooled by stats.pooled: the
# layer table has a column for each (mask density, mean keep-weight, mask churn ...)
_TABLE_POOLED = tuple(name for name in statistics.heatmap_values()
                      if name not in _POOLED_BY and name not in stats.LAYER_DISCREPANCY_VALUES)

LAYER_TABLE_COLUMNS = (
    "run", "method", "step", "component", "layer", "name", "numel",
    "discrepancy_mean", "frac_ft_gt_pre", "correlation", *_TABLE_POOLED, "update_rel_norm",
)


def layer_table(layers_df: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """One row per (run, component, layer) at ``step`` (each run's nearest logged step; None:
    each run's last): mean G − I, share with G > I, correlation of I and G
    (:func:`analysis.stats.layer_discrepancy`), the mask's statistics of the vocabulary
    (mask density, mean keep-weight, mask churn: :func:`analysis.stats.pooled`) and ‖Δ‖/‖θ0‖ (:func:`analysis.stats.update_size`),
    all pooled exactly over the layer's tensors that ``layers_df`` holds (filter it first to
    look at some modules only). Rows in model order: vision, projector, language model; within
    a component, parameters outside blocks first. Columns :data:`LAYER_TABLE_COLUMNS`.
    """
    stats.require_columns(layers_df, ("run", "step"), "layers DataFrame")
    if layers_df.empty:
        return pd.DataFrame(columns=list(LAYER_TABLE_COLUMNS))
    parts = []
    for _run, mine in layers_df.groupby("run", sort=False):
        at = int(mine["step"].max()) if step is None else nearest_step(mine["step"].unique(), step)
        parts.append(mine[mine["step"] == at])
    return layer_table_all_steps(pd.concat(parts, ignore_index=True))


def layer_table_all_steps(layers_df: pd.DataFrame) -> pd.DataFrame:
    """:func:`layer_table` at every logged step at once (rows by run, layer, then step): one
    pass over the log, from which a step slider can pick rows without recomputing."""
    stats.require_columns(layers_df, ("run", "step"), "layers DataFrame")
    if layers_df.empty:
        return pd.DataFrame(columns=list(LAYER_TABLE_COLUMNS))
    by = ("component", "layer")
    keys = ["run", "method", "step", *by]
    disc = stats.layer_discrepancy(layers_df, by=by)
    dens = stats.pooled(layers_df, _TABLE_POOLED, by=by).drop(columns=["numel"])
    size = stats.update_size(layers_df, by=by)[[*keys, "update_rel_norm"]]
    out = disc.merge(dens, on=keys, how="outer").merge(size, on=keys, how="outer")
    out["name"] = [layer_name(c, layer) for c, layer in zip(out["component"], out["layer"])]
    run_order = {run: i for i, run in enumerate(pd.unique(layers_df["run"]))}
    out["_key"] = [(run_order[r], *_layer_sort_key(c, layer), int(s))
                   for r, c, layer, s in zip(out["run"], out["component"], out["layer"],
                                             out["step"])]
    out = out.sort_values("_key").drop(columns="_key")
    return out.loc[:, list(LAYER_TABLE_COLUMNS)].reset_index(drop=True)


def table_at_step(all_steps: pd.DataFrame, step: int) -> pd.DataFrame:
    """Rows of :func:`layer_table_all_steps` at each run's logged step nearest ``step``."""
    if all_steps.empty:
        return all_steps
    parts = [mine[mine["step"] == nearest_step(mine["step"].unique(), step)]
             for _run, mine in all_steps.groupby("run", sort=False)]
    return pd.concat(parts, ignore_index=True)


MATRIX_VALUES = statistics.heatmap_values()
"""``{value: label}`` a layer x step matrix offers (``spider.statistics.heatmap_values``)."""

FROZEN_COLUMNS = ("component", "layer", "name", "frozen_modules", "all_frozen")
"""Columns of :func:`frozen_layers`."""


def frozen_layers(status: pd.DataFrame, components: Iterable[str] | None = None,
                  modules: Iterable[str] | None = None) -> pd.DataFrame:
    """Per layer (component, block) of the base model, the modules the run left frozen.

    Input: :func:`analysis.tensors.parameter_status` (every parameter of the base model and
    whether the run trained it), filtered like :func:`filter_layers`. One row per layer that
    has a frozen tensor among those kept: ``frozen_modules`` (their module names, model
    order, comma-separated) and ``all_frozen`` (no tensor of the layer among those kept
    trained: the layer has no statistics at all, it never moved from theta0). Rows in model
    order. Columns :data:`FROZEN_COLUMNS`.
    """
    if status is None or status.empty:
        return pd.DataFrame(columns=list(FROZEN_COLUMNS))
    stats.require_columns(status, ("component", "layer", "module", "trained"), "status")
    kept = filter_layers(status, components, modules)
    rows = []
    for (component, layer), part in kept.groupby(
            ["component", kept["layer"].astype("float")], sort=False, dropna=False):
        frozen = part[~part["trained"].astype(bool)]
        if frozen.empty:
            continue
        layer = None if pd.isna(layer) else int(layer)
        rows.append({"component": component, "layer": layer,
                     "name": layer_name(component, layer),
                     "frozen_modules": ", ".join(dict.fromkeys(frozen["module"])),
                     "all_frozen": len(frozen) == len(part),
                     "_key": _layer_sort_key(component, layer)})
    if not rows:
        return pd.DataFrame(columns=list(FROZEN_COLUMNS))
    out = pd.DataFrame.from_records(rows).sort_values("_key")
    out["layer"] = out["layer"].astype("Int64")
    return out.loc[:, list(FROZEN_COLUMNS)].reset_index(drop=True)


def layer_step_matrix(layers_df: pd.DataFrame, value: str = "mask_density",
                      frozen: pd.DataFrame | None = None,
                      steps: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy layer x step values for a heatmap: columns run, method, name, order, step,
    ``value`` (one of :data:`MATRIX_VALUES`), pooled exactly over each layer's tensors.
    ``order`` sorts rows in model order (as :func:`layer_table`).

    ``frozen`` (:func:`frozen_layers`): its layers with no trained tensor get rows too, at
    each logged step, ``value`` NaN and a ``frozen`` column True (False on the others; the
    column is there only when ``frozen`` is given), so that a heatmap shows them as frozen
    rather than leaving them out. ``steps``: the (run, method, step) rows those get (default:
    those of ``layers_df``; give the unfiltered run's where a filter may leave none)."""
    if value not in MATRIX_VALUES:
        raise ValueError(f"value must be one of {', '.join(MATRIX_VALUES)}, got {value!r}")
    stats.require_columns(layers_df, ("run", "step"), "layers DataFrame")
    by = ("component", "layer")
    columns = ["run", "method", "name", "order", "step", value]
    if frozen is not None:
        columns.append("frozen")
    if steps is None:
        steps = layers_df
    if layers_df.empty and (frozen is None or not len(frozen) or steps.empty):
        return pd.DataFrame(columns=columns)
    if layers_df.empty:
        frame = pd.DataFrame({"run": [], "method": [], "step": [], "component": [],
                              "layer": [], value: []})
    elif value in _POOLED_BY:
        frame = _POOLED_BY[value](layers_df, by)
    else:
        frame = stats.pooled(layers_df, (value,), by=by)
    comps, layers = list(frame["component"]), list(frame["layer"])
    flags = [False] * len(frame)
    frame = frame.loc[:, ["run", "method", "step", value]]
    if frozen is not None and len(frozen):
        whole = frozen[frozen["all_frozen"].astype(bool)]
        seen = {_layer_sort_key(c, la) for c, la in zip(comps, layers)}
        extra = [(c, la) for c, la in zip(whole["component"], whole["layer"])
                 if _layer_sort_key(c, la) not in seen]
        if extra:
            runs = steps.drop_duplicates(["run", "step"])[["run", "method", "step"]]
            for c, la in extra:
                add = runs.assign(**{value: np.nan})
                frame = pd.concat([frame, add], ignore_index=True)
                comps += [c] * len(add)
                layers += [la] * len(add)
                flags += [True] * len(add)
    names = [layer_name(c, layer) for c, layer in zip(comps, layers)]
    keys = [_layer_sort_key(c, layer) for c, layer in zip(comps, layers)]
    ranks = {k: i for i, k in enumerate(sorted(set(keys)))}
    out = pd.DataFrame({"run": frame["run"].to_numpy(), "method": frame["method"].to_numpy(),
                        "name": names, "order": [ranks[k] for k in keys],
                        "step": frame["step"].astype("int64").to_numpy(),
                        value: frame[value].astype(float).to_numpy()})
    if frozen is not None:
        out["frozen"] = flags
    return out.sort_values(["run", "order", "step"]).reset_index(drop=True)


def fitted_range(values: Iterable[float], absolute: tuple[float, float] | None = None
                 ) -> tuple[float, float]:
    """A colour range for ``values``: ``absolute`` if given, else the finite values' min and
    max (so that values all near 0.5 still span the colour scale), widened to a width of at
    least 1e-3 around a single value; (0, 1) when nothing is finite."""
    if absolute is not None:
        return float(absolute[0]), float(absolute[1])
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0, 1.0
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-3:
        mid = (lo + hi) / 2
        lo, hi = mid - 5e-4, mid + 5e-4
    return lo, hi
