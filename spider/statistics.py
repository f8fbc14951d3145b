"""The statistics vocabulary: every per-tensor and per-layer statistic, named once.

One :class:`Statistic` per quantity the project logs or derives: its column name, the plain
label a person reads, how to format it, how it pools from tensors to a layer, which colour
scale shows it and which methods report it. The methods (which values they fill), the run
directory (the columns of ``layers.jsonl``), the analysis (the layer tables and matrices),
the pages, the HTML report and the live Train view all read this module; no other file
spells a statistic's label or format (ARCHITECTURE.md, *Adding a statistic*).

API::

    from spider import statistics as S

    S.STATISTICS                   # name -> Statistic, in display order
    S.get("mask_density")          # the Statistic (KeyError naming the known ones)
    S.label("mask_density")        # "share of weights free to move (w > 0)"
    S.format_value("mask_density", 0.4321)   # "43.2%"
    S.get("mask_density").fmt      # ".1%": a d3/plotly format, also for Python's format()
    S.METHOD_COLUMNS               # what Method.statistics() reports per tensor (the old
                                   # STAT_COLUMNS), NaN where a method has no such notion
    S.RUNNER_COLUMNS               # what the runner adds per tensor (update norms)
    S.LAYERS_FILE_COLUMNS          # the statistics columns of a layers.jsonl row
    S.heatmap_values()             # the statistics a layer x step heatmap can show
    S.reported_by("importance_pre_mean", "full")   # False
    S.is_percent(name), S.colorscale(name), S.value_range(name)
    S.value_range("importance_pre_mean", "dowser")   # None: Dowser's score is no 0–1 rank
    S.format_value("importance_pre_mean", 3e-7, "dowser")   # "3e-07", not "0.0000"

Fields of :class:`Statistic`:

* ``source``: ``"method"`` (``Method.statistics()`` fills it per tensor), ``"runner"`` (the
  run recorder computes it per tensor from the weights) or ``"layer"`` (derived by
  ``analysis.stats`` when pooling a group of tensors; never in ``layers.jsonl``).
* ``pooling``: how the per-tensor values of a layer (or any group) combine exactly:
  ``"mean"`` (numel-weighted mean), ``"sum"``, ``"max"``, or ``"derived"`` (a dedicated
  function of ``analysis.stats`` combines other columns: norms, correlation, ratios).
* ``colorscale``: ``"sequential"``, or ``"diverging"`` around 0 for signed values.
* ``methods``: ``"all"`` (every method), ``"masked"`` (every method with a per-weight mask,
  ``MethodBase.has_masks``) or a tuple of method names.
* ``range``: the absolute range of the value, where it has one (shares: 0–1), for a fixed
  colour scale or axis.
* ``method_ranges`` / ``method_formats``: ``((method, range-or-None), ...)`` and
  ``((method, fmt), ...)``, where a method fills the column with a quantity of another scale
  (Dowser's score as the pre-training importance: unbounded, often tiny). Ask through
  :func:`value_range`, :func:`fmt` and :func:`format_value` with the run's method.
* ``heatmap``: offered as a layer x step heatmap (Layers page, live Train view).

Adding a statistic: one entry here; a method fills it in ``statistics()`` (``source ==
"method"``) and the run directory, tables and heatmaps pick it up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Pooling = Literal["mean", "sum", "max", "derived"]
ColorScale = Literal["sequential", "diverging"]
Source = Literal["method", "runner", "layer"]


@dataclasses.dataclass(frozen=True)
class Statistic:
    """One statistic (see the module docstring for the fields)."""

    name: str
    label: str
    fmt: str  # d3 format (plotly hover/ticks), valid for Python's format() as well
    unit: str  # "share", "rank", "norm", "ratio", "correlation", "" ...
    pooling: Pooling
    colorscale: ColorScale
    methods: str | tuple[str, ...]
    source: Source = "method"
    description: str = ""
    range: tuple[float, float] | None = None
    heatmap: bool = False
    method_ranges: tuple[tuple[str, tuple[float, float] | None], ...] = ()
    method_formats: tuple[tuple[str, str], ...] = ()

    @property
    def percent(self) -> bool:
        return self.fmt.endswith("%")

    def range_for(self, method: str | None = None) -> tuple[float, float] | None:
        """The absolute range of the value ``method`` fills in (None: it has none)."""
        return dict(self.method_ranges).get(method, self.range) if method else self.range

    def fmt_for(self, method: str | None = None) -> str:
        """The format of the value ``method`` fills in."""
        return dict(self.method_formats).get(method, self.fmt) if method else self.fmt

    def format(self, value: float | None, method: str | None = None) -> str:
        """``value`` as a person reads it ("43.2%", "0.0123"); "–" for NaN or None."""
        if value is None:
            return "–"
        try:
            value = float(value)
        except (TypeError, ValueError):
            return str(value)
        if math.isnan(value):
            return "–"
        return format(value, self.fmt_for(method))


_SHARE = (0.0, 1.0)
# Dowser fills the pre-training importance with its own score (psi·|W|·a): no 0–1 rank but
# an unbounded, often tiny, non-negative number
_DOWSER_SCORE = {"method_ranges": (("dowser", None),), "method_formats": (("dowser", ".4g"),)}

_ALL = (
    Statistic("mask_mean", "mean keep-weight w", ".4f", "weight", "mean", "sequential",
              "masked", range=_SHARE, heatmap=True,
              description="Mean keep-weight w (1 = free to move, 0 = pinned to theta0)."),
    Statistic("mask_density", "share of weights free to move (w > 0)", ".1%", "share",
              "mean", "sequential", "masked", range=_SHARE, heatmap=True,
              description="Fraction of the tensor's entries whose keep-weight w is above 0."),
    Statistic("importance_pre_mean", "mean pre-training importance I", ".4f", "rank",
              "mean", "sequential", ("spider", "dowser"), range=_SHARE, **_DOWSER_SCORE,
              description="Mean of I = rank(theta0) (Dowser: its own score at theta0, "
                          "not a 0–1 rank)."),
    Statistic("importance_ft_mean", "mean fine-tuning importance G", ".4f", "rank",
              "mean", "sequential", ("spider",), range=_SHARE,
              description="Mean of G = rank(S), S the accumulated gradient."),
    Statistic("frac_ft_gt_pre", "share of weights with G > I", ".1%", "share", "mean",
              "sequential", ("spider",), range=_SHARE, heatmap=True,
              description="Fraction of entries the task values more than pre-training did."),
    # second moments, so that the correlation of I and G pools exactly over any group:
    # corr = (IG - I*G) / sqrt((II - I^2)(GG - G^2))
    Statistic("importance_pre_sq_mean", "mean of I²", ".4f", "rank²", "mean", "sequential",
              ("spider", "dowser"), range=_SHARE, **_DOWSER_SCORE),
    Statistic("importance_ft_sq_mean", "mean of G²", ".4f", "rank²", "mean", "sequential",
              ("spider",), range=_SHARE),
    Statistic("importance_cross_mean", "mean of I·G", ".4f", "rank²", "mean", "sequential",
              ("spider",), range=_SHARE),
    Statistic("mask_churn", "share of weights whose mask side changed", ".2%", "share",
              "mean", "sequential", "masked", range=_SHARE, heatmap=True,
              description="Fraction of entries whose side of the mask (w > 0 or not) changed "
                          "since the previous logged step; NaN at the first logged step."),
    Statistic("update_norm", "update norm ‖Δ‖", ".4g", "norm", "derived", "sequential",
              "all", source="runner", description="‖theta − theta0‖₂ of the tensor."),
    Statistic("update_rel_norm", "update size ‖Δ‖/‖θ0‖", ".4f", "ratio", "derived",
              "sequential", "all", source="runner", heatmap=True,
              description="How far the weights moved, relative to their size before "
                          "fine-tuning."),
    Statistic("theta0_norm", "norm before fine-tuning ‖θ0‖", ".4g", "norm", "derived",
              "sequential", "all", source="runner"),
    Statistic("discrepancy_mean", "mean G − I", ".4f", "rank", "derived", "diverging",
              ("spider",), source="layer", heatmap=True,
              description="> 0: the task values the weights more than pre-training did."),
    Statistic("correlation", "correlation of I and G", ".3f", "correlation", "derived",
              "diverging", ("spider",), source="layer", range=(-1.0, 1.0),
              description="Near 0: the task wants other weights than pre-training relied on."),
    # two runs compared (analysis.tensors.update_agreement, from their checkpoints' Δ)
    Statistic("moved_overlap", "same weights moved (Jaccard |A ∩ B| / |A ∪ B|)", ".1%",
              "share", "derived", "sequential", "all", source="layer", range=_SHARE,
              description="Of the weights either run moved, the share both moved: 1 = the "
                          "same weights, 0 = disjoint."),
    Statistic("update_cosine", "same direction (cosine of the two updates)", ".3f",
              "correlation", "derived", "diverging", "all", source="layer",
              range=(-1.0, 1.0),
              description="1 = the two runs moved the weights the same way, 0 = unrelated, "
                          "−1 = opposite."),
)

STATISTICS: dict[str, Statistic] = {s.name: s for s in _ALL}
"""Every statistic by name, in display order."""

METHOD_COLUMNS: tuple[str, ...] = tuple(s.name for s in _ALL if s.source == "method")
"""Per-tensor statistics ``Method.statistics()`` reports (NaN where it has no such notion)."""

RUNNER_COLUMNS: tuple[str, ...] = ("update_norm", "update_rel_norm", "theta0_norm")
"""Per-tensor statistics the run recorder adds from the weights, in ``layers.jsonl`` order."""

LAYERS_FILE_COLUMNS: tuple[str, ...] = (*METHOD_COLUMNS, *RUNNER_COLUMNS)
"""The statistics columns of a ``layers.jsonl`` row (after step, param, numel)."""

assert set(RUNNER_COLUMNS) == {s.name for s in _ALL if s.source == "runner"}


def get(name: str) -> Statistic:
    """The statistic ``name``; a KeyError naming the known ones otherwise."""
    try:
        return STATISTICS[name]
    except KeyError:
        raise KeyError(f"unknown statistic {name!r}; known: {', '.join(STATISTICS)}") from None


def label(name: str) -> str:
    """The plain label of ``name``; ``name`` itself for a column that is no statistic."""
    stat = STATISTICS.get(name)
    return stat.label if stat else name


def format_value(name: str, value: float | None, method: str | None = None) -> str:
    """``value`` of statistic ``name`` (as ``method`` fills it, where given) formatted for a
    person; ``.4g`` for unknown names."""
    stat = STATISTICS.get(name)
    if stat is None:
        return "–" if value is None or value != value else format(float(value), ".4g")
    return stat.format(value, method)


def fmt(name: str, method: str | None = None) -> str:
    """The d3 format of ``name`` as ``method`` fills it (``.4g`` for a column that is no
    statistic)."""
    stat = STATISTICS.get(name)
    return stat.fmt_for(method) if stat else ".4g"


def is_percent(name: str, method: str | None = None) -> bool:
    stat = STATISTICS.get(name)
    return bool(stat and stat.fmt_for(method).endswith("%"))


def colorscale(name: str) -> ColorScale:
    stat = STATISTICS.get(name)
    return stat.colorscale if stat else "sequential"


def value_range(name: str, method: str | None = None) -> tuple[float, float] | None:
    """The absolute range of ``name`` where it has one (shares: (0, 1)); with ``method``,
    the range of the value that method fills in (Dowser's importance: None)."""
    stat = STATISTICS.get(name)
    return stat.range_for(method) if stat else None


_HEATMAP_FIRST = ("mask_density", "mask_mean")


def heatmap_values() -> dict[str, str]:
    """``{name: label}`` of the statistics a layer x step heatmap offers; the mask's share
    free to move first (the default view)."""
    names = [*_HEATMAP_FIRST, *(s.name for s in _ALL if s.name not in _HEATMAP_FIRST)]
    return {n: STATISTICS[n].label for n in names if STATISTICS[n].heatmap}


def reported_by(name: str, method: str, has_masks: bool | None = None) -> bool:
    """Whether method ``method`` reports statistic ``name``. ``has_masks`` (the method's
    ``MethodBase.has_masks``) is looked up in the method registry when not given."""
    stat = get(name)
    if stat.methods == "all":
        return True
    if stat.methods == "masked":
        if has_masks is None:
            from spider.methods.base import method_class  # only when asked: no import cycle

            has_masks = method_class(method).has_masks
        return bool(has_masks)
    return method in stat.methods


__all__ = ["LAYERS_FILE_COLUMNS", "METHOD_COLUMNS", "RUNNER_COLUMNS", "STATISTICS", "Statistic",
           "colorscale", "fmt", "format_value", "get", "heatmap_values", "is_percent", "label",
           "reported_by", "value_range"]
