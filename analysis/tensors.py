"""One parameter tensor of one checkpoint, for the Parameters page.

* :func:`kept_tensors` — which trainable tensors a checkpoint kept (a run may keep only some,
  ``--save-tensors``), from ``layers.jsonl`` and the checkpoint's file header: no tensor is
  read.
* :func:`find_params` — search parameter names by words or a regular expression.
* :func:`available_kinds` — what :meth:`analysis.Run.tensor` can show for a run's method
  (SPIDER: I, G, the mask, Δ and the weight; a method with no importances: mask, Δ, weight;
  LoRA: Δ and weight).
* :func:`tensor_views` / :func:`tensor_statistics` — the tensors and one row of numbers each.
* :func:`what_if_mask` — the mask of the same checkpoint state rebuilt under other SPIDER
  options (binary mask, no normalisation), with spider's own ``keep_weight``.
* :func:`update_agreement` — per layer, whether two runs moved the same weights, and the same
  way (:func:`analysis.stats.moved_overlap`, :func:`analysis.stats.update_cosine`).
* :func:`tensors_npz` — the tensors themselves, at full resolution, as a ``.npz`` (no
  pickle); :func:`tensors_safetensors` the same as ``.safetensors``.
* :func:`mask_flips` — where the mask side (w > 0) changed between two checkpoints.
* :func:`updated_entries` — every moved entry's index, θ0, θ and Δ (for a CSV);
  :func:`region_bounds` clips a row/column range to a tensor.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from analysis import stats
from analysis.run import TENSOR_KINDS, Run, RunReadError
from spider.errors import UserError
from spider.naming import parse_param_name
from spider.rundir import WEIGHTS_GROUP, RunDir, group_file

KIND_LABELS = {
    "importance_pre": "I: pre-training importance",
    "importance_ft": "G: fine-tuning importance",
    "mask": "w: keep-weight (1 free, 0 pinned)",
    "delta": "Δ = θ − θ0: update",
    "weight": "θ: weight",
}
"""Plain names of :data:`analysis.run.TENSOR_KINDS`."""

PANEL_KINDS = ("importance_pre", "importance_ft", "mask", "delta")
"""The kinds the Parameters page draws side by side (those the run's method has)."""

KEPT_COLUMNS = ("param", "component", "layer", "module", "numel", "shape", "kept")
STAT_COLUMNS = ("kind", "numel", "mean", "std", "min", "max", "share_zero", "share_one")
WHAT_IF_OPTIONS = ("mask", "normalize")
"""SPIDER options a what-if may change: they act on the same S. ``accumulate`` cannot: a run
accumulated only one kind of S (the sum of grad, |grad| or grad²)."""


# --------------------------------------------------------------------------------------------
# What a run kept, what a method has
# --------------------------------------------------------------------------------------------


def _saved_shapes(run: Run, step: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint's weights file (its header only)."""
    file = group_file(RunDir(run.path).checkpoint_dir(step), WEIGHTS_GROUP)
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises several kinds for a damaged file
        raise RunReadError(f"checkpoint file {file} is damaged or not safetensors "
                           f"({str(err).splitlines()[0][:120]})") from None


def kept_tensors(run: Run, step: int) -> pd.DataFrame:
    """Every trainable parameter of the run, and whether checkpoint ``step`` kept its tensor.

    Columns :data:`KEPT_COLUMNS`; one row per parameter named in ``layers.jsonl`` (every
    trainable tensor; the run's statistics cover them all) or saved in the checkpoint, in
    the checkpoint's order first. ``shape`` is the saved shape ("" when not kept).
    """
    if int(step) not in run.steps:
        run.params(step)  # raises the UserError that lists the run's checkpoint steps
    shapes = _saved_shapes(run, int(step))
    layers = run.layers
    trained = list(pd.unique(layers["param"])) if "param" in layers.columns else []
    numel = (dict(zip(layers["param"], layers["numel"]))
             if {"param", "numel"} <= set(layers.columns) else {})
    names = list(shapes) + [p for p in trained if p not in shapes]
    rows = []
    for name in names:
        parsed = parse_param_name(name)
        shape = shapes.get(name)
        rows.append({
            "param": name, "component": parsed.component,
            "layer": parsed.layer if parsed.layer is not None else pd.NA,
            "module": parsed.module,
            "numel": int(math.prod(shape)) if shape is not None else int(numel.get(name, 0)),
            "shape": "×".join(map(str, shape)) if shape is not None else "",
            "kept": shape is not None,
        })
    frame = pd.DataFrame.from_records(rows, columns=list(KEPT_COLUMNS))
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def available_kinds(method: str) -> tuple[str, ...]:
    """The :data:`TENSOR_KINDS` that ``Run.tensor`` can return for a run of ``method``.

    Δ and the weight exist for every method; the mask for methods that pin weights per
    element; I and G only for methods that rank weights (SPIDER).
    """
    from spider.methods import MethodBase, method_class

    try:
        cls = method_class(method)
    except ValueError:
        return ("delta", "weight")
    kinds = []
    if cls.has_masks and cls.masks is not MethodBase.masks:
        kinds.append("mask")
    if cls.importances is not MethodBase.importances:
        # which of I ("pre") and G ("ft") it reports; Dowser: its score, pre only
        kinds[:0] = [f"importance_{k}" for k in getattr(cls, "importance_kinds", ("pre", "ft"))]
    return tuple(k for k in TENSOR_KINDS if k in kinds or k in ("delta", "weight"))


def find_params(names: Sequence[str], query: str, regex: bool = False) -> list[str]:
    """The names matching ``query``, in their order.

    Words (the default): every space-separated word must occur in the name, ignoring case
    (``"3 down"`` finds ``...layers.3.mlp.down_proj.weight``). ``regex=True``: Python's
    ``re.search``, ignoring case; a bad pattern raises ``UserError`` naming it. An empty
    query matches everything.
    """
    query = (query or "").strip()
    if not query:
        return list(names)
    if regex:
        try:
            pattern = re.compile(query, re.IGNORECASE)
        except re.error as err:
            raise UserError(f"the regular expression {query!r} is not valid: {err}") from None
        return [n for n in names if pattern.search(n)]
    words = query.lower().split()
    return [n for n in names if all(w in n.lower() for w in words)]


# --------------------------------------------------------------------------------------------
# Tensors and their numbers
# --------------------------------------------------------------------------------------------


def tensor_views(run: Run, step: int, param: str, kinds: Sequence[str] | None = None
                 ) -> dict[str, torch.Tensor]:
    """``{kind: tensor}`` of ``param`` at ``step``, for ``kinds`` (default: the page's panels
    that the method has). Raises ``UserError`` for a parameter the checkpoint did not keep."""
    if kinds is None:
        have = available_kinds(run.method)
        kinds = [k for k in PANEL_KINDS if k in have]
    return {kind: run.tensor(step, param, kind) for kind in kinds}


def tensor_statistics(views: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """One row per kind: entries, mean, standard deviation, min, max, and the shares of
    entries exactly 0 and exactly 1 (for a mask: pinned to θ0, fully free; for Δ: unchanged).
    Columns :data:`STAT_COLUMNS`."""
    rows = []
    for kind, tensor in views.items():
        x = tensor.detach().reshape(-1).double()
        n = x.numel()
        rows.append({
            "kind": kind, "numel": n,
            "mean": float(x.mean()) if n else math.nan,
            "std": float(x.std()) if n > 1 else math.nan,
            "min": float(x.min()) if n else math.nan,
            "max": float(x.max()) if n else math.nan,
            "share_zero": float((x == 0).sum()) / n if n else math.nan,
            "share_one": float((x == 1).sum()) / n if n else math.nan,
        })
    return pd.DataFrame.from_records(rows, columns=list(STAT_COLUMNS))


# --------------------------------------------------------------------------------------------
# What-if: the same state, another SPIDER option
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WhatIf:
    """The mask of one tensor as trained and as another option would have made it, from the
    same theta0 and S (what training would have done *at this step* given the same history;
    the later history would differ, since the weights would have moved differently)."""

    options: dict  # the run's SPIDER options
    alternative: dict  # the options of the what-if
    mask: torch.Tensor  # w as trained (rebuilt)
    mask_alt: torch.Tensor  # w under ``alternative``
    changed: int  # entries whose w differs
    flipped: int  # entries that switch between pinned (w = 0) and free (w > 0)
    numel: int

    def as_row(self) -> dict[str, float]:
        return {
            "entries": self.numel,
            "w changes": self.changed,
            "share changed": self.changed / self.numel,
            "pinned ↔ free switches": self.flipped,
            "mean w as trained": float(self.mask.double().mean()),
            "mean w what-if": float(self.mask_alt.double().mean()),
            "share free as trained": float((self.mask > 0).double().mean()),
            "share free what-if": float((self.mask_alt > 0).double().mean()),
        }


def what_if_mask(run: Run, step: int, param: str, **changes) -> WhatIf:
    """Rebuild ``param``'s mask at ``step`` under the run's SPIDER options with ``changes``
    (``mask="binary"``, ``normalize=False``...) and count the entries that change.

    Both masks come from spider's own ``keep_weight`` on the checkpoint's theta0 and S; the
    as-trained one is the same as ``run.tensor(step, param, "mask")``. Raises ``UserError``
    for a run that is not SPIDER or an option a what-if cannot change.
    """
    from spider.methods.spider import SpiderOptions, keep_weight

    if run.method != "spider":
        raise UserError(f"the what-if rebuilds SPIDER masks; run {run.name} used "
                        f"method {run.method!r}")
    unknown = sorted(set(changes) - set(WHAT_IF_OPTIONS))
    if unknown:
        raise UserError(f"a what-if can change only {', '.join(WHAT_IF_OPTIONS)}; "
                        f"got {unknown[0]!r} (S was accumulated one way only)")
    method = run.method_at(step, param)
    now = method.options
    try:
        alt = dataclasses.replace(now, **changes)
    except ValueError as err:
        raise UserError(str(err)) from None
    assert isinstance(alt, SpiderOptions)
    theta0, grad_sum = method.theta0[param], method.grad_sum[param]
    w_now, _ = keep_weight(theta0, grad_sum, now)
    w_alt, _ = keep_weight(theta0, grad_sum, alt)
    return WhatIf(
        options=dataclasses.asdict(now), alternative=dataclasses.asdict(alt),
        mask=w_now, mask_alt=w_alt,
        changed=int(torch.count_nonzero(w_now != w_alt)),
        flipped=int(torch.count_nonzero((w_now > 0) != (w_alt > 0))),
        numel=w_now.numel(),
    )


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def tensors_npz(views: Mapping[str, torch.Tensor], param: str, step: int) -> bytes:
    """A ``.npz`` (numpy's zip of arrays; no pickle) with every view at full resolution, one
    float32 array per kind in the tensor's own shape (``importance_pre``, ``mask``,
    ``delta``...), and ``param`` and ``step``."""
    arrays: dict[str, np.ndarray] = {"param": np.array(param), "step": np.array(int(step))}
    for kind, tensor in views.items():
        arrays[kind] = torch.as_tensor(tensor).detach().float().cpu().numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Two runs: the same weights moved?
# --------------------------------------------------------------------------------------------

AGREEMENT_COLUMNS = ("step", "component", "layer", "name", "numel", "moved_overlap",
                     "update_cosine")


def common_step(run_a: Run, run_b: Run) -> int | None:
    """The last checkpoint step both runs saved, or None."""
    both = sorted(set(run_a.steps) & set(run_b.steps))
    return int(both[-1]) if both else None


def update_agreement(run_a: Run, run_b: Run, step: int,
                     params: Sequence[str] | None = None) -> pd.DataFrame:
    """Per layer, how alike two runs' updates Δ = θ − θ0 are at checkpoint ``step``: the
    share of moved weights both moved (:func:`analysis.stats.moved_overlap`, Jaccard) and the
    cosine of the two updates (:func:`analysis.stats.update_cosine`), each over all of the
    layer's tensors at once (the layer's tensors flattened and joined).

    ``params``: the parameters to include (default: every one both checkpoints kept). Rows in
    model order, columns :data:`AGREEMENT_COLUMNS` (``name`` as the Layers page names a
    layer).
    """
    from analysis import explore

    kept_a = kept_tensors(run_a, step)
    kept_b = set(kept_tensors(run_b, step).query("kept")["param"])
    rows = kept_a[kept_a["kept"] & kept_a["param"].isin(kept_b)]
    if params is not None:
        rows = rows[rows["param"].isin(set(params))]
    out = []
    for (component, layer), part in rows.groupby(["component", "layer"], dropna=False,
                                                 sort=False):
        deltas_a, deltas_b = [], []
        for param in part["param"]:
            a, b = run_a.tensor(step, param, "delta"), run_b.tensor(step, param, "delta")
            if a.shape != b.shape:
                continue  # another architecture: not comparable weight by weight
            deltas_a.append(a.reshape(-1))
            deltas_b.append(b.reshape(-1))
        if not deltas_a:
            continue
        a, b = torch.cat(deltas_a), torch.cat(deltas_b)
        layer = None if pd.isna(layer) else int(layer)
        out.append({"step": int(step), "component": component, "layer": layer,
                    "name": explore.layer_name(component, layer), "numel": int(a.numel()),
                    "moved_overlap": stats.moved_overlap(a, b),
                    "update_cosine": stats.update_cosine(a, b)})
    frame = pd.DataFrame(out, columns=list(AGREEMENT_COLUMNS))
    if frame.empty:
        return frame
    order = explore.layer_table(run_a.layers[run_a.layers["step"] == run_a.layers["step"].max()]
                                .assign(run=run_a.name))["name"].tolist()
    rank = {name: i for i, name in enumerate(order)}
    return frame.sort_values("name", key=lambda c: c.map(lambda n: rank.get(n, len(rank))),
                             kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Mask flips, regions, more downloads
# --------------------------------------------------------------------------------------------

UPDATED_COLUMNS = ("row", "col", "theta0", "value", "delta")
"""Columns of :func:`updated_entries`: 2-D index, θ0, θ at the step, Δ = θ − θ0."""


@dataclasses.dataclass(frozen=True)
class MaskFlips:
    """Where a tensor's mask side (w > 0: free, w = 0: pinned) changed between two
    checkpoints: ``flips`` is +1 (pinned → free), −1 (free → pinned), 0 (same side)."""

    step_a: int
    step_b: int
    flips: torch.Tensor  # int8, the tensor's shape
    freed: int
    pinned: int
    numel: int


def mask_flips(run: Run, step_a: int, step_b: int, param: str) -> MaskFlips:
    """The entries of ``param`` whose mask side (``w > 0``) differs between checkpoints
    ``step_a`` and ``step_b`` (``Run.tensor(step, param, "mask")``). Raises ``UserError``
    for a method without a per-weight mask."""
    free_a = run.tensor(step_a, param, "mask") > 0
    free_b = run.tensor(step_b, param, "mask") > 0
    flips = free_b.to(torch.int8) - free_a.to(torch.int8)
    return MaskFlips(int(step_a), int(step_b), flips, int((flips > 0).sum()),
                     int((flips < 0).sum()), flips.numel())


def region_bounds(shape: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``rows`` and ``cols`` (half-open ``(start, stop)``) clipped to a tensor of 2-D
    ``shape``, each at least one index wide."""
    out = []
    for (start, stop), n in zip((rows, cols), shape):
        start = min(max(int(start), 0), max(int(n) - 1, 0))
        stop = min(max(int(stop), start + 1), int(n))
        out.append((start, stop))
    return out[0], out[1]


def updated_entries(run: Run, step: int, param: str) -> pd.DataFrame:
    """Every entry of ``param`` that checkpoint ``step`` moved (Δ ≠ 0): its 2-D index (the
    tensor viewed as rows × the rest), θ0, θ at ``step`` and Δ, all as float32 values.
    Columns :data:`UPDATED_COLUMNS`, in row-major order."""
    from analysis.heatmaps import as_2d

    delta = as_2d(run.tensor(step, param, "delta"))
    value = as_2d(run.tensor(step, param, "weight"))
    theta0 = as_2d(run.theta0(param).float())
    rows, cols = torch.nonzero(delta != 0, as_tuple=True)
    return pd.DataFrame({
        "row": rows.numpy(), "col": cols.numpy(),
        "theta0": theta0[rows, cols].numpy(), "value": value[rows, cols].numpy(),
        "delta": delta[rows, cols].numpy(),
    }, columns=list(UPDATED_COLUMNS))


def updated_entries_csv(frame: pd.DataFrame) -> bytes:
    """:func:`updated_entries` as CSV; floats with 9 significant digits, which give back
    each float32 exactly."""
    return frame.to_csv(index=False, float_format="%.9g").encode()


def tensors_safetensors(views: Mapping[str, torch.Tensor], param: str, step: int) -> bytes:
    """The same as :func:`tensors_npz`, as a ``.safetensors`` file: one float32 tensor per
    kind in the tensor's own shape; ``param`` and ``step`` in its metadata."""
    from safetensors.torch import save

    tensors = {kind: torch.as_tensor(t).detach().float().cpu().contiguous()
               for kind, t in views.items()}
    return save(tensors, metadata={"param": param, "step": str(int(step))})


# --------------------------------------------------------------------------------------------
# What a run trained and what it left frozen
# --------------------------------------------------------------------------------------------

STATUS_COLUMNS = ("param", "component", "layer", "module", "numel", "trained", "logged")
"""Columns of :func:`parameter_status`."""


def train_setting(run: Run) -> str:
    """The run's ``--train`` setting as its command line gave it ("--train attn", with
    ``--train-last-layers N`` where set): what a frozen cell's hover cites."""
    config = run.info.get("config", {}) if isinstance(run.info, dict) else {}
    text = f"--train {config.get('train') or 'llm,projector'}"
    if config.get("train_last_layers"):
        text += f" --train-last-layers {int(config['train_last_layers'])}"
    return text


def parameter_status(run: Run) -> pd.DataFrame:
    """Every parameter of the run's base model, whether the run trained it and whether its
    statistics were logged.

    The names come from the base model's file header (no tensor is read); ``trained`` applies
    the run's ``--train`` / ``--train-last-layers`` (``config.train``,
    ``config.train_last_layers`` of ``run.json``) through :func:`spider.models.is_trained`,
    the rule training used. ``logged``: the parameter has rows in ``layers.jsonl``. So a
    parameter is *frozen* (``not trained``: it never moved from theta0) or trained but not
    logged (its statistics were not written: a run stopped before its first logged step).
    Empty (columns :data:`STATUS_COLUMNS`) when the base model cannot be read.
    """
    from spider.models import is_trained

    try:
        base = run._base_index()
    except (UserError, OSError):
        return pd.DataFrame(columns=list(STATUS_COLUMNS))
    config = run.info.get("config", {}) if isinstance(run.info, dict) else {}
    parts = [p.strip() for p in str(config.get("train") or "llm,projector").split(",")
             if p.strip()]
    parsed = {key: parse_param_name(key) for key in base.file_of}
    first = None
    last = int(config.get("train_last_layers") or 0)
    if last:
        layers = [p.layer for p in parsed.values() if p.component == "llm"
                  and p.layer is not None]
        first = max(layers) + 1 - last if layers else None
    try:  # the run-time names of layers.jsonl, as the base model's file names them
        logged = {base.key(str(p)) for p in pd.unique(run.layers["param"])}
    except (UserError, KeyError):
        logged = set()
    shapes: dict[str, list[int]] = {}
    for file in sorted(set(base.file_of.values())):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({k: handle.get_slice(k).get_shape() for k in handle.keys()})
    rows = []
    for key, info in parsed.items():
        rows.append({"param": key, "component": info.component,
                     "layer": info.layer if info.layer is not None else pd.NA,
                     "module": info.module, "numel": int(math.prod(shapes[key])),
                     "trained": bool(is_trained(info, parts, first)),
                     "logged": key in logged})
    frame = pd.DataFrame.from_records(rows, columns=list(STATUS_COLUMNS))
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


FROZEN_TENSOR_COLUMNS = ("param", "base_key", "component", "layer", "module", "numel")
"""Columns of :func:`frozen_tensors`."""


def _runtime_name(key: str, renames: Mapping[str, str]) -> str:
    """``key`` of the base model's file renamed as the run names parameters, by the longest
    prefix rename seen on its trained tensors; ``key`` itself where none applies."""
    for disk in sorted(renames, key=len, reverse=True):
        if key.startswith(disk):
            return renames[disk] + key[len(disk):]
    return key


def frozen_tensors(run: Run) -> pd.DataFrame:
    """The base model's parameters the run did not train (:func:`parameter_status`), named
    as the run names parameters where its trained tensors show how (the base model's file
    may say ``language_model.model.layers.0`` for ``model.language_model.layers.0``; else
    the file's name, which :meth:`analysis.Run.theta0` reads all the same). ``base_key``:
    the name in the file. Columns :data:`FROZEN_TENSOR_COLUMNS`."""
    status = parameter_status(run)
    frozen = status[~status["trained"].astype(bool)] if len(status) else status
    if frozen.empty:
        return pd.DataFrame(columns=list(FROZEN_TENSOR_COLUMNS))
    base = run._base_index()
    renames: dict[str, str] = {}
    try:
        trained = [str(p) for p in pd.unique(run.layers["param"])]
    except (UserError, KeyError):
        trained = []
    for name in trained:  # the differing prefix of (file name, run-time name) pairs
        key = base.key(name)
        if key is None or key == name:
            continue
        a, b = key.split("."), name.split(".")
        same = 0
        while same < min(len(a), len(b)) and a[-1 - same] == b[-1 - same]:
            same += 1
        disk, runtime = ".".join(a[:len(a) - same]), ".".join(b[:len(b) - same])
        if disk:
            renames.setdefault(disk + ".", runtime + "." if runtime else "")
    out = frozen.assign(base_key=frozen["param"],
                        param=[_runtime_name(k, renames) for k in frozen["param"]])
    return out.loc[:, list(FROZEN_TENSOR_COLUMNS)].reset_index(drop=True)
