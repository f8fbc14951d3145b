"""Statistics of fine-tuning runs: tidy DataFrames in, tidy DataFrames out.

Compute only; no plotting and no run-directory reading (``analysis.load_run`` produces the
input frames, ``analysis.figures`` draws the outputs). Every function validates the columns
it needs and returns a frame with fixed, documented columns, one row per group, so that the
app and notebooks can rely on them.

Input contracts (module-level tuples below):

* :data:`METRICS_COLUMNS` — one row per evaluation value. ``split`` is ``upstream``,
  ``downstream`` or a 2x2 cell (:data:`CELLS`); ``metric == "score"`` is the split's main
  metric in [0, 1], ``task:NAME`` a task's; on ``upstream`` also the output drift
  (``kl_to_base``, ``format_errors``, ``content_errors``, ``answer_type_drift``:
  ``spider.hooks.Evaluator``, drawn by ``analysis.figures.attribution.drift_curves``).
* :data:`TRAIN_COLUMNS` — one row per training step.
* :data:`LAYERS_COLUMNS` — one row per (run, step, parameter tensor), NaN where a method
  has no such notion (e.g. importances of full fine-tuning). ``layer`` is the block index
  from :func:`spider.naming.parse_param_name`, missing (None/NaN) outside blocks.
* :data:`SUMMARY_COLUMNS` — one row per run.

Per-element comparisons (:func:`tensor_discrepancy`, :func:`moved_overlap`,
:func:`update_cosine`) take tensors, accumulate in float64 over chunks (so a 45M-entry
tensor needs no float64 copy) and return plain floats.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spider import statistics
from spider.data.builtin import CELLS as _CELLS
from spider.metrics import harmonic_mean
from spider.metrics import summary as _summary
from spider.naming import parse_param_name
from spider.rundir import atomic_write_bytes
from spider.statistics import METHOD_COLUMNS

# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------

CELLS = _CELLS
"""The 2x2 evaluation cells: in/out-of-distribution images x in/out-of-distribution questions
(defined by the built-in data, ``spider.data.builtin.CELLS``)."""

METRICS_COLUMNS = ("run", "method", "step", "split", "metric", "value")
TRAIN_COLUMNS = ("run", "method", "step", "loss", "lr")
LAYERS_COLUMNS = (
    "run", "method", "step", "param", "component", "layer", "module", "numel",
    # the methods' per-tensor statistics (spider.statistics.METHOD_COLUMNS: mask_mean,
    # mask_density, importance means and second moments, frac_ft_gt_pre, mask_churn; NaN
    # where a method has no such notion or a run was logged before a column was added), then
    # the update
    *METHOD_COLUMNS,
    "update_norm",  # ||theta - theta0||_2 of the tensor
    "update_rel_norm",  # ||theta - theta0|| / ||theta0||
)
SUMMARY_COLUMNS = ("run", "method", "U", "D", "H", "E", "F", "O")

#: Outputs. ``by`` columns (default component, layer) sit between ``step`` and the values.
LAYER_DISCREPANCY_VALUES = (
    "numel", "importance_pre_mean", "importance_ft_mean", "discrepancy_mean", "frac_ft_gt_pre",
    "correlation",
)
_MOMENTS = ("importance_pre_sq_mean", "importance_ft_sq_mean", "importance_cross_mean")
MASK_DENSITY_VALUES = ("numel", "mask_mean", "mask_density")
UPDATE_SIZE_VALUES = ("numel", "update_norm", "theta0_norm", "update_rel_norm")
UPDATE_SHARE_VALUES = ("numel", "update_sq", "share")
SUMMARY_TABLE_COLUMNS = SUMMARY_COLUMNS + ("step", "U_base", "D_base")
CELLS_COLUMNS = ("run", "method", "step") + CELLS
STREAM_STATS_COLUMNS = (
    "file", "param", "component", "layer", "module", "dtype", "shape", "numel",
    "mean", "std", "norm", "frac_nonzero",
)

_LAYER_KEYS = ("component", "layer")
_GROUPABLE = ("param", "component", "layer", "module")


def require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming every column of ``columns`` that ``df`` lacks."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} is missing column(s) {missing}; it has {list(df.columns)}"
        )


def _check_by(by: Sequence[str]) -> list[str]:
    by = [by] if isinstance(by, str) else list(by)
    bad = [c for c in by if c not in _GROUPABLE]
    if bad:
        raise ValueError(f"cannot group by {bad}; choose from {list(_GROUPABLE)}")
    return by


def _finish(out: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Fixed column order, fresh index, ``layer`` as nullable integer (NA outside blocks)."""
    out = out.reset_index()
    if "layer" in out.columns:
        out["layer"] = pd.to_numeric(out["layer"], errors="coerce").astype("Int64")
    return out.loc[:, list(columns)].reset_index(drop=True)


def _weighted_means(
    df: pd.DataFrame, keys: list[str], values: Sequence[str], weight: str = "numel"
) -> pd.DataFrame:
    """Per group of ``keys``: sum of ``weight`` and the ``weight``-weighted mean of each value.

    Rows whose value is NaN are left out of that value's mean (a group with no finite value
    gets NaN), so one tensor without a notion does not blank out its layer.
    """
    parts = {k: df[k] for k in keys}
    parts[weight] = pd.to_numeric(df[weight], errors="coerce")  # integer sums stay integers
    w = parts[weight].astype(float)
    for col in values:
        v = pd.to_numeric(df[col], errors="coerce").astype(float)
        ok = v.notna() & w.notna()
        parts[f"{col}\0num"] = (v * w).where(ok, 0.0)
        parts[f"{col}\0den"] = w.where(ok, 0.0)
    sums = pd.DataFrame(parts).groupby(keys, dropna=False, sort=True).sum()
    out = pd.DataFrame({weight: sums[weight]}, index=sums.index)
    for col in values:
        den = sums[f"{col}\0den"]
        out[col] = (sums[f"{col}\0num"] / den).where(den > 0)
    return out


# --------------------------------------------------------------------------------------------
# Importance discrepancy: G - I
# --------------------------------------------------------------------------------------------


def layer_discrepancy(
    layers_df: pd.DataFrame, by: Sequence[str] = _LAYER_KEYS
) -> pd.DataFrame:
    """How much more the fine-tuning task values a layer's weights than pre-training did.

    Per (run, step, component, layer): the numel-weighted means of I (``importance_pre``),
    G (``importance_ft``) and of G − I (``discrepancy_mean``; SPIDER frees a weight only
    where G > I, ARCHITECTURE.md, *The SPIDER rule*), ``frac_ft_gt_pre``, the fraction of
    the layer's weights with G > I (numel-weighted mean of the per-tensor fractions, i.e. the exact fraction), and
    ``correlation``, Pearson's r of I and G over all the layer's weights, pooled exactly from
    the per-tensor first and second moments (NaN where a run did not log the moments).
    Columns: run, method, step, *by, :data:`LAYER_DISCREPANCY_VALUES`.
    """
    by = _check_by(by)
    require_columns(
        layers_df,
        ("run", "method", "step", *by, "numel", "importance_pre_mean", "importance_ft_mean",
         "frac_ft_gt_pre"),
        "layers DataFrame",
    )
    df = layers_df.assign(
        discrepancy_mean=pd.to_numeric(layers_df["importance_ft_mean"], errors="coerce")
        - pd.to_numeric(layers_df["importance_pre_mean"], errors="coerce")
    )
    for column in _MOMENTS:  # frames from older runs lack them
        if column not in df.columns:
            df[column] = np.nan
    keys = ["run", "method", "step", *by]
    out = _weighted_means(
        df, keys,
        ("importance_pre_mean", "importance_ft_mean", "discrepancy_mean", "frac_ft_gt_pre",
         *_MOMENTS),
    )
    mean_i, mean_g = out["importance_pre_mean"], out["importance_ft_mean"]
    var_i = out["importance_pre_sq_mean"] - mean_i**2
    var_g = out["importance_ft_sq_mean"] - mean_g**2
    cov = out["importance_cross_mean"] - mean_i * mean_g
    # ranks lie in [0, 1]: a variance below 1e-12 is rounding, not spread
    defined = (var_i > 1e-12) & (var_g > 1e-12)
    out["correlation"] = (cov / np.sqrt(var_i.where(defined) * var_g.where(defined))).clip(-1, 1)
    return _finish(out, (*keys, *LAYER_DISCREPANCY_VALUES))


def _flat_chunks(*tensors, chunk: int = 1 << 22) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching float64 chunks of equally shaped tensors (numpy arrays accepted)."""
    flats = []
    for t in tensors:
        t = torch.as_tensor(t) if not torch.is_tensor(t) else t
        flats.append(t.detach().reshape(-1).cpu())
    n = flats[0].numel()
    for start in range(0, n, chunk):
        yield tuple(f[start : start + chunk].double() for f in flats)


def _same_shape(a, b, what: str) -> None:
    sa, sb = tuple(np.shape(a)), tuple(np.shape(b))
    if sa != sb:
        raise ValueError(f"{what}: tensors differ in shape, {sa} vs {sb}")


def tensor_discrepancy(pre, ft) -> dict[str, float]:
    """Elementwise comparison of pre-training importance I and fine-tuning importance G.

    Returns ``numel``, ``importance_pre_mean``, ``importance_ft_mean``,
    ``discrepancy_mean`` = mean(G − I), ``frac_ft_gt_pre`` = fraction of entries with G > I
    (for the default SPIDER rule this is the mask density), and ``correlation``, Pearson's r
    of I and G (NaN when either is constant): near 0 means the task wants different weights
    than the ones pre-training relied on.
    """
    _same_shape(pre, ft, "tensor_discrepancy")
    n = int(np.prod(np.shape(pre)))
    if n == 0:
        raise ValueError("tensor_discrepancy got empty tensors")
    sum_i = sum_g = greater = 0.0
    for i, g in _flat_chunks(pre, ft):
        sum_i += float(i.sum())
        sum_g += float(g.sum())
        greater += float(torch.count_nonzero(g > i))
    mean_i, mean_g = sum_i / n, sum_g / n
    s_ii = s_gg = s_ig = 0.0  # second pass: centred sums, no cancellation
    for i, g in _flat_chunks(pre, ft):
        i -= mean_i
        g -= mean_g
        s_ii += float(torch.dot(i, i))
        s_gg += float(torch.dot(g, g))
        s_ig += float(torch.dot(i, g))
    correlation = s_ig / math.sqrt(s_ii * s_gg) if s_ii > 0 and s_gg > 0 else math.nan
    return {
        "numel": n,
        "importance_pre_mean": mean_i,
        "importance_ft_mean": mean_g,
        "discrepancy_mean": mean_g - mean_i,
        "frac_ft_gt_pre": greater / n,
        "correlation": correlation,
    }


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def mask_density(
    layers_df: pd.DataFrame, by: Sequence[str] = ("component", "layer", "module")
) -> pd.DataFrame:
    """Which share of the weights each group may move, step by step.

    Per (run, step, *by): ``mask_density`` = fraction of the group's weights with w > 0 and
    ``mask_mean`` = mean keep-weight, both numel-weighted over the group's tensors (so they
    are exact for the group). ``by=()`` gives one row per run and step. Columns: run, method,
    step, *by, :data:`MASK_DENSITY_VALUES`. ``mask_mean`` is NaN when the input lacks it.
    """
    by = _check_by(by)
    require_columns(
        layers_df, ("run", "method", "step", *by, "numel", "mask_density"), "layers DataFrame"
    )
    df = layers_df if "mask_mean" in layers_df.columns else layers_df.assign(mask_mean=np.nan)
    keys = ["run", "method", "step", *by]
    out = _weighted_means(df, keys, ("mask_mean", "mask_density"))
    return _finish(out, (*keys, *MASK_DENSITY_VALUES))


def pooled(layers_df: pd.DataFrame, values: Sequence[str],
           by: Sequence[str] = _LAYER_KEYS) -> pd.DataFrame:
    """Per (run, method, step, *by): ``numel`` and each of ``values`` pooled over the group's
    tensors as its statistic says (``spider.statistics``: ``pooling`` "mean" is the
    numel-weighted mean, "sum" and "max" what they say; NaN values are left out, a group
    with none gets NaN). A value absent from ``layers_df`` (a run logged before it existed)
    is NaN. Statistics pooled by a dedicated function ("derived") raise ``ValueError``."""
    by = _check_by(by)
    require_columns(layers_df, ("run", "method", "step", *by, "numel"), "layers DataFrame")
    keys = ["run", "method", "step", *by]
    values = list(values)
    df = layers_df.assign(**{v: np.nan for v in values if v not in layers_df.columns})
    pools = {v: statistics.get(v).pooling for v in values}
    derived = [v for v, how in pools.items() if how == "derived"]
    if derived:
        raise ValueError(f"{derived} pool through their own functions, not stats.pooled")
    out = _weighted_means(df, keys, [v for v, how in pools.items() if how == "mean"])
    others = [v for v, how in pools.items() if how != "mean"]
    if others:
        grouped = df.assign(**{v: pd.to_numeric(df[v], errors="coerce").astype(float)
                               for v in others}).groupby(keys, dropna=False, sort=True)
        for v in others:
            out[v] = grouped[v].sum(min_count=1) if pools[v] == "sum" else grouped[v].max()
    return _finish(out, (*keys, "numel", *values))


# --------------------------------------------------------------------------------------------
# Update size and where it goes
# --------------------------------------------------------------------------------------------


def _theta0_norms(df: pd.DataFrame) -> pd.Series:
    """‖theta0‖ per row: the ``theta0_norm`` column if given, else update_norm / rel_norm.

    theta0 is fixed during a run, so a tensor's norm found at any step where it moved is
    broadcast to all its steps (median over steps, to absorb rounding). A tensor that never
    moved has an unknown norm (NaN).
    """
    if "theta0_norm" in df.columns:
        return pd.to_numeric(df["theta0_norm"], errors="coerce").astype(float)
    norm = pd.to_numeric(df["update_norm"], errors="coerce").astype(float)
    rel = pd.to_numeric(df["update_rel_norm"], errors="coerce").astype(float)
    derived = (norm / rel).where((rel > 0) & np.isfinite(norm) & (norm > 0))
    per_tensor = derived.groupby([df["run"], df["param"]], dropna=False).transform("median")
    return per_tensor


def update_size(layers_df: pd.DataFrame, by: Sequence[str] = _LAYER_KEYS) -> pd.DataFrame:
    """How far each layer moved from theta0: ‖Δ‖ and ‖Δ‖/‖theta0‖.

    Per (run, step, *by): ``update_norm`` = sqrt(Σ ‖Δ_t‖²) over the group's tensors (the L2
    norm of the concatenated update), ``theta0_norm`` likewise from each tensor's ‖theta0_t‖
    = update_norm / update_rel_norm (or a ``theta0_norm`` input column), and
    ``update_rel_norm`` = their ratio. The ratio is 0 where nothing moved, and NaN where
    some tensor's ‖theta0‖ cannot be known (it never moved and no ``theta0_norm`` column is
    given) — a guess there would misstate the layer. Columns: run, method, step, *by,
    :data:`UPDATE_SIZE_VALUES`.
    """
    by = _check_by(by)
    need = ["run", "method", "step", "param", *by, "numel", "update_norm"]
    if "theta0_norm" not in layers_df.columns:
        need.append("update_rel_norm")
    require_columns(layers_df, need, "layers DataFrame")
    keys = ["run", "method", "step", *by]
    norm = pd.to_numeric(layers_df["update_norm"], errors="coerce").astype(float)
    frame = pd.DataFrame({k: layers_df[k] for k in keys})
    frame["numel"] = pd.to_numeric(layers_df["numel"], errors="coerce")
    frame["update_sq"] = norm**2
    frame["theta0_sq"] = _theta0_norms(layers_df) ** 2
    frame["theta0_unknown"] = frame["theta0_sq"].isna()
    grouped = frame.groupby(keys, dropna=False, sort=True)
    out = pd.DataFrame({
        "numel": grouped["numel"].sum(),
        "update_norm": np.sqrt(grouped["update_sq"].sum(min_count=1)),
        # one unknown theta0 norm makes the layer's norm unknown
        "theta0_norm": np.sqrt(grouped["theta0_sq"].sum().mask(grouped["theta0_unknown"].any())),
    })
    rel = out["update_norm"] / out["theta0_norm"]
    out["update_rel_norm"] = rel.mask(out["update_norm"] == 0, 0.0)
    return _finish(out, (*keys, *UPDATE_SIZE_VALUES))


def update_share(layers_df: pd.DataFrame, by: Sequence[str] = _LAYER_KEYS) -> pd.DataFrame:
    """Where a run's update went: each group's share of the total squared update ‖Δ‖².

    Per (run, step, *by): ``update_sq`` = Σ ‖Δ_t‖² over the group and ``share`` = update_sq /
    (Σ over the whole run at that step); shares sum to 1 per run and step (NaN when nothing
    moved). Comparing shares of two methods at equal steps shows whether they spend their
    update budget on the same layers. Columns: run, method, step, *by,
    :data:`UPDATE_SHARE_VALUES`.
    """
    by = _check_by(by)
    require_columns(
        layers_df, ("run", "method", "step", *by, "numel", "update_norm"), "layers DataFrame"
    )
    keys = ["run", "method", "step", *by]
    frame = pd.DataFrame({k: layers_df[k] for k in keys})
    frame["numel"] = pd.to_numeric(layers_df["numel"], errors="coerce")
    frame["update_sq"] = pd.to_numeric(layers_df["update_norm"], errors="coerce").astype(float) ** 2
    out = frame.groupby(keys, dropna=False, sort=True)[["numel", "update_sq"]].sum(min_count=1)
    out["numel"] = out["numel"].fillna(0)
    total = out.groupby(level=["run", "step"], dropna=False)["update_sq"].transform("sum")
    out["share"] = (out["update_sq"] / total).where(total > 0)
    return _finish(out, (*keys, *UPDATE_SHARE_VALUES))


def moved_overlap(delta_a, delta_b, tol: float = 0.0) -> float:
    """Jaccard index of the sets of weights two updates moved: |A ∩ B| / |A ∪ B|.

    A weight "moved" when ``|Δ| > tol``. Compare two methods' deltas (theta − theta0) of the
    same tensor at the same step: 1 = they moved exactly the same weights, 0 = disjoint.
    Two updates that moved nothing agree completely: 1.0.
    """
    _same_shape(delta_a, delta_b, "moved_overlap")
    both = either = 0
    for a, b in _flat_chunks(delta_a, delta_b):
        moved_a, moved_b = a.abs() > tol, b.abs() > tol
        both += int(torch.count_nonzero(moved_a & moved_b))
        either += int(torch.count_nonzero(moved_a | moved_b))
    return 1.0 if either == 0 else both / either


def update_cosine(delta_a, delta_b) -> float:
    """Cosine similarity of two updates (flattened): 1 = same direction, −1 = opposite.

    NaN when either update is zero (no direction).
    """
    _same_shape(delta_a, delta_b, "update_cosine")
    s_ab = s_aa = s_bb = 0.0
    for a, b in _flat_chunks(delta_a, delta_b):
        s_ab += float(torch.dot(a, b))
        s_aa += float(torch.dot(a, a))
        s_bb += float(torch.dot(b, b))
    if s_aa == 0 or s_bb == 0:
        return math.nan
    return s_ab / math.sqrt(s_aa * s_bb)


# --------------------------------------------------------------------------------------------
# Scores: the upstream / downstream trade-off
# --------------------------------------------------------------------------------------------


def _scores(metrics_df: pd.DataFrame, splits: Sequence[str]) -> pd.DataFrame:
    """Wide frame (run, method, step) x split of main scores; a re-evaluated step keeps its
    last value (a resumed run may log a step twice)."""
    require_columns(metrics_df, METRICS_COLUMNS, "metrics DataFrame")
    rows = metrics_df[(metrics_df["metric"] == "score") & metrics_df["split"].isin(splits)]
    rows = rows.drop_duplicates(subset=["run", "step", "split"], keep="last")
    wide = rows.pivot(index=["run", "step"], columns="split", values="value")
    wide = wide.reindex(columns=list(splits)).astype(float)
    method = rows.groupby("run", sort=False)["method"].first()
    wide = wide.reset_index()
    wide.insert(1, "method", wide["run"].map(method))
    wide.columns.name = None
    return wide


def _run_order(metrics_df: pd.DataFrame) -> list:
    return list(pd.unique(metrics_df["run"]))


def score_table(metrics_df: pd.DataFrame) -> pd.DataFrame:
    """Upstream and downstream score per (run, step), wide: run, method, step, U, D, H.

    Only steps where both were evaluated. The path a run takes across the trade-off plane.
    """
    wide = _scores(metrics_df, ("upstream", "downstream")).dropna(subset=["upstream", "downstream"])
    out = pd.DataFrame({
        "run": wide["run"], "method": wide["method"], "step": wide["step"],
        "U": wide["upstream"], "D": wide["downstream"],
    })
    out["H"] = harmonic_mean(out["U"], out["D"])
    order = {run: i for i, run in enumerate(_run_order(metrics_df))}
    out = out.sort_values(["run", "step"], key=lambda c: c.map(order) if c.name == "run" else c)
    return out.reset_index(drop=True)


def summary_table(
    metrics_df: pd.DataFrame,
    base: str | Mapping[str, float] | None = None,
    *,
    with_cells: bool = False,
) -> pd.DataFrame:
    """One row per run: U, D, H, E, F, O at its final step (:func:`spider.metrics.summary`).

    The final step is the last one at which both upstream and downstream were scored.
    ``base`` gives the base model's scores that E (downstream gain), F (upstream change) and
    O = E + F are measured from:

    * ``None``: each run's own step-0 scores (the trainer evaluates before the first step);
    * a run name: that run's first evaluated step (e.g. a run that only evaluated the base
      model), used for every run;
    * a mapping ``{"upstream": u, "downstream": d}``.

    Runs with no complete evaluation get NaN scores; with ``base=None``, a run without a
    step-0 evaluation gets NaN for E, F, O. Columns: :data:`SUMMARY_TABLE_COLUMNS` (plus the
    :data:`CELLS` at the final step with ``with_cells``).
    """
    wide = _scores(metrics_df, ("upstream", "downstream"))
    complete = wide.dropna(subset=["upstream", "downstream"])

    shared_base: tuple[float, float] | None = None
    if isinstance(base, Mapping):
        missing = [k for k in ("upstream", "downstream") if k not in base]
        if missing:
            raise ValueError(f"base scores need keys 'upstream' and 'downstream'; missing {missing}")
        shared_base = (float(base["upstream"]), float(base["downstream"]))
    elif isinstance(base, str):
        rows = complete[complete["run"] == base].sort_values("step")
        if rows.empty:
            raise ValueError(
                f"base run {base!r} has no step with both upstream and downstream scores; "
                f"runs: {sorted(map(str, pd.unique(wide['run'])))}"
            )
        shared_base = (float(rows["upstream"].iloc[0]), float(rows["downstream"].iloc[0]))
    elif base is not None:
        raise TypeError(f"base must be None, a run name or a mapping, got {type(base).__name__}")

    records = []
    for run in _run_order(metrics_df):
        mine = complete[complete["run"] == run].sort_values("step")
        method = metrics_df.loc[metrics_df["run"] == run, "method"].iloc[0]
        if shared_base is not None:
            u_base, d_base = shared_base
        else:
            at_zero = mine[mine["step"] == 0]
            u_base, d_base = (
                (float(at_zero["upstream"].iloc[-1]), float(at_zero["downstream"].iloc[-1]))
                if len(at_zero) else (math.nan, math.nan)
            )
        if mine.empty:
            values = dict.fromkeys(("U", "D", "H", "E", "F", "O"), math.nan)
            step = pd.NA
        else:
            last = mine.iloc[-1]
            values = _summary(u_base, d_base, float(last["upstream"]), float(last["downstream"]))
            step = int(last["step"])
        records.append({"run": run, "method": method, **values, "step": step,
                        "U_base": u_base, "D_base": d_base})
    out = pd.DataFrame.from_records(records, columns=list(SUMMARY_TABLE_COLUMNS))
    out["step"] = out["step"].astype("Int64")
    if with_cells:
        cells = cells_table(metrics_df).drop(columns=["method", "step"])
        out = out.merge(cells, on="run", how="left")
        for cell in CELLS:
            out[cell] = out[cell].astype(float)
    return out


def cells_table(metrics_df: pd.DataFrame) -> pd.DataFrame:
    """The 2x2 generalisation cells (image ID/OOD x question ID/OOD) at each run's last
    step that scored any cell. Runs without cell scores are left out; a cell not scored at
    that step is NaN. Columns: :data:`CELLS_COLUMNS`."""
    wide = _scores(metrics_df, CELLS)
    wide = wide[wide[list(CELLS)].notna().any(axis=1)]
    last = wide.sort_values("step").groupby("run", sort=False).tail(1)
    order = {run: i for i, run in enumerate(_run_order(metrics_df))}
    last = last.sort_values("run", key=lambda c: c.map(order))
    out = last.loc[:, list(CELLS_COLUMNS)].reset_index(drop=True)
    out["step"] = out["step"].astype("Int64")
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def to_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` (no index) to ``path`` atomically: a reader never sees half a file."""
    path = Path(path)
    atomic_write_bytes(path, df.to_csv(index=False).encode())
    return path


# Elements of a flattened tensor reduced at once: 1 MB of float32, which stays in the CPU's
# L2 cache across the four passes over it. The passes are numpy's SIMD loops, which release
# the GIL, run by a few threads: on a small shared machine this beats torch's OpenMP
# reductions, whose thread hand-off costs milliseconds per call when another process holds a
# core (and torch's float32 vector_norm of a 30M-entry tensor is off by ~0.2%).
_STREAM_CHUNK = 1 << 18
_STREAM_THREADS = min(4, os.cpu_count() or 1)
_thread_buffers = threading.local()


def _safetensors_files(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            files.extend(sorted(entry.glob("*.safetensors")))
        else:
            files.append(entry)
    return files


def _chunk_reader(tensor: torch.Tensor) -> tuple[int, Callable[[int], np.ndarray]]:
    """``(numel, read)``: ``read(start)`` is the float32/float64 numpy chunk at ``start``.

    float32/float64 chunks are views of the tensor's memory (of the memory map, for a tensor
    from ``safe_open``): nothing is copied. bfloat16 is widened by a bit shift (a bf16 is the
    top half of a float32) into a per-thread 1 MB buffer; other dtypes go through torch.
    """
    flat = tensor.detach().reshape(-1).cpu()
    if flat.dtype in (torch.float32, torch.float64):
        array = flat.numpy()
        return array.size, lambda start: array[start : start + _STREAM_CHUNK]
    if flat.dtype == torch.bfloat16:
        bits = flat.view(torch.int16).numpy().view(np.uint16)

        def widen(start: int) -> np.ndarray:
            chunk = bits[start : start + _STREAM_CHUNK]
            buffer = getattr(_thread_buffers, "uint32", None)
            if buffer is None:
                buffer = _thread_buffers.uint32 = np.empty(_STREAM_CHUNK, dtype=np.uint32)
            out = buffer[: chunk.size]
            np.left_shift(chunk, 16, out=out, dtype=np.uint32)
            return out.view(np.float32)

        return bits.size, widen
    wide = torch.float32 if flat.dtype == torch.float16 else torch.float64
    return flat.numel(), lambda start: flat[start : start + _STREAM_CHUNK].to(wide).numpy()


def _count_nonzero(chunk: np.ndarray) -> int:
    """Non-zero entries of a float chunk, counted on its bit pattern (several times faster).

    A float is zero when its bits are all 0 or, for -0.0, only the sign bit is set; that
    pattern is the smallest signed integer, so one ``min`` tells whether it occurs.
    """
    bits = chunk.view(np.int32 if chunk.dtype == np.float32 else np.int64)
    if bits.min() != np.iinfo(bits.dtype).min:
        return int(np.count_nonzero(bits))
    return int(np.count_nonzero(chunk))


Moments = tuple[int, float, float, int]  # (n, mean, M2 = Σ (x − mean)², non-zero count)


def _chunk_moments(chunk: np.ndarray) -> Moments:
    """Sum, sum of squares and non-zero count of one chunk, as :data:`Moments`.

    Where the chunk's spread is tiny against its mean (Σx² − n·mean² would cancel, e.g. a
    norm weight near 1), M2 is recomputed in float64 from centred values, which is rare.
    """
    n = chunk.size
    s = float(chunk.sum())
    ss = float(np.einsum("i,i->", chunk, chunk))  # numpy's own loop, no BLAS threads
    nonzero = _count_nonzero(chunk)
    mean = s / n
    m2 = ss - n * mean * mean
    if not m2 > 1e-3 * ss:
        wide = chunk.astype(np.float64)
        mean = float(wide.mean())
        wide -= mean
        m2 = float(np.dot(wide, wide))
    return n, mean, m2, nonzero


def _merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan, Golub & LeVeque's pairwise update of (n, mean, M2), in float64."""
    n_a, mean_a, m2_a, nz_a = a
    n_b, mean_b, m2_b, nz_b = b
    if n_a == 0:
        return b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n, nz_a + nz_b


def _moments(tensor: torch.Tensor, pool: ThreadPoolExecutor | None = None) -> Moments:
    """:data:`Moments` of a whole tensor, chunk by chunk (in ``pool`` when given).

    Chunks are merged in order, so the result does not depend on thread timing.
    """
    numel, read = _chunk_reader(tensor)
    starts = range(0, numel, _STREAM_CHUNK)
    parts = (pool.map if pool is not None and len(starts) > 1 else map)(
        lambda start: _chunk_moments(read(start)), starts
    )
    total: Moments = (0, 0.0, 0.0, 0)
    for part in parts:
        total = _merge_moments(total, part)
    return total


def stream_tensor_stats(paths) -> pd.DataFrame:
    """Per-tensor statistics of safetensors files, one tensor in memory at a time.

    ``paths``: a file, a directory (its ``*.safetensors``, sorted) or a list of either.
    Files are opened with ``safetensors.safe_open`` (memory-mapped): ``get_tensor`` returns
    a view of the map, and the bytes are read 1 MB at a time while the statistics are
    computed (by up to four threads). The process allocates no copy of a tensor (1 MB
    buffers widen bf16), and each tensor gets its own map, closed before the next, so
    resident memory peaks at about the largest tensor whatever the file and checkpoint
    sizes.

    Columns: :data:`STREAM_STATS_COLUMNS` — ``mean``, ``std`` (unbiased; NaN for one
    element), ``norm`` (L2) and ``frac_nonzero`` of each tensor, with the parameter name
    parsed by :func:`spider.naming.parse_param_name`. An unreadable file raises an error
    that names it.
    """
    from safetensors import safe_open

    records = []
    pool = ThreadPoolExecutor(_STREAM_THREADS) if _STREAM_THREADS > 1 else None
    try:
        for path in _safetensors_files(paths):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names = list(handle.keys())
                for name in names:
                    # One map per tensor: closing it drops the pages read so far from this
                    # process, so resident memory stays at one tensor however big the file.
                    with safe_open(str(path), framework="pt") as handle:
                        tensor = handle.get_tensor(name)
                        dtype, shape = str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
                        n, mean, m2, nonzero = _moments(tensor, pool)
                        del tensor
                    parsed = parse_param_name(name)
                    records.append({
                        "file": str(path),
                        "param": name,
                        "component": parsed.component,
                        "layer": parsed.layer,
                        "module": parsed.module,
                        "dtype": dtype,
                        "shape": shape,
                        "numel": n,
                        "mean": mean if n else math.nan,
                        "std": math.sqrt(max(m2, 0.0) / (n - 1)) if n > 1 else math.nan,
                        "norm": math.sqrt(max(m2 + n * mean * mean, 0.0)),
                        "frac_nonzero": nonzero / n if n else math.nan,
                    })
            except OSError as error:  # name the file; keep the original as the cause
                raise OSError(f"cannot read {path}: {error}") from error
            except MemoryError:
                raise
            except Exception as error:  # safetensors' SafetensorError, bad headers, bad dtypes
                raise ValueError(f"cannot read {path}: {error}") from error
    finally:
        if pool is not None:
            pool.shutdown()
    out = pd.DataFrame.from_records(records, columns=list(STREAM_STATS_COLUMNS))
    out["layer"] = out["layer"].astype("Int64")
    return out

