"""Reading run directories: ``load_run(path) -> Run`` and ``list_runs(root) -> DataFrame``.

A :class:`Run` is a lazy view of one run directory (ARCHITECTURE.md, "The run directory").
Every file is read
through :mod:`spider.rundir`, the one module that knows the layout, and only when the view
that needs it is first asked for:

* ``Run.info`` / ``config`` / ``method`` / ``status`` — ``run.json`` (read by ``load_run``,
  re-read by :meth:`Run.refresh`);
* ``Run.metrics`` / ``train`` / ``summary`` — ``metrics.jsonl``, as tidy frames with the
  columns of :mod:`analysis.stats` (read once, then cached);
* ``Run.layers`` — ``layers.jsonl`` and, for a large run while it writes, its Parquet parts
  ``layers/part-*.parquet`` (or, once a large run has finished, the one columnar
  ``layers.parquet``; all read in bulk, ``RunDir.read_layers_frame``) with parameter names
  parsed by
  :func:`spider.naming.parse_param_name` once per name (read once, then cached);
* ``Run.tensor(step, param, kind)`` — one tensor of one checkpoint, memory-mapped.

Masks and importances are not stored: they are rebuilt from what the checkpoint keeps (for
SPIDER the gradient sum S) and the base model's theta0, *by the method's own code*: the
method is rebuilt on a one-tensor model from the checkpoint's options and state, and asked
for ``masks()`` / ``importances()``, exactly as the trainer's method was. Where a run saved
its tensors in bfloat16 (``save_dtype``), S is rounded to 3 significant digits before the
rebuild, so a few entries whose G and I differ by less than that rounding may fall on the
other side of G > I than during training (on the sample SPIDER run the rebuilt mask density
differs from the logged one by under 0.01 % of entries); with ``float32`` saves the rebuilt
mask equals the trained one bit for bit. Likewise ``delta`` of a bf16 checkpoint is exact
only to bf16 rounding (see :data:`TENSOR_KINDS`).

An error reading a file is a :class:`RunReadError` that names the file and what is wrong with
it; the rest of the run stays usable (another checkpoint of the same run still loads).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from torch import nn

from analysis import stats
from spider import rundir
from spider.errors import UserError
from spider.naming import parse_param_name
from spider.rundir import WEIGHTS_GROUP, RunDir, base_model_dir, checkpoint_meta, group_file

TENSOR_KINDS = ("mask", "importance_pre", "importance_ft", "delta", "weight")
"""What :meth:`Run.tensor` can return for a parameter at a checkpoint step:

* ``weight`` — the trained tensor theta at that step (the checkpoint's ``weights`` group);
* ``delta`` — theta − theta0 (theta0 from the base model; where the checkpoint saved theta
  in a narrower dtype such as bf16, theta0 is rounded to that dtype first, so a weight held
  at theta0 shows exactly 0 instead of the rounding error of the save);
* ``mask`` — the keep-weight w in [0, 1] the method applied (1 free, 0 pinned to theta0);
* ``importance_pre`` — I = rank(theta0), SPIDER's pre-training importance;
* ``importance_ft`` — G = rank(S), SPIDER's fine-tuning importance.
"""

METHOD_GROUP = rundir.METHOD_GROUP
"""Checkpoint group holding the method's analysis state (``Method.analysis_state``)."""

LIST_COLUMNS = (
    "path", "name", "method", "model", "data", "status", "steps", "checkpoints",
    "U", "D", "H", "ok", "problem",
)
"""Columns of :func:`list_runs`: one row per run found."""


def layers_frame(rows: list[dict] | pd.DataFrame, run: str, method: str) -> pd.DataFrame:
    """``layers.jsonl`` rows (dicts, or a frame of them as ``RunDir.read_layers_frame``
    reads it) as the frame of :attr:`Run.layers` (also what the live Train view draws,
    ``app.watch``): :data:`analysis.stats.LAYERS_COLUMNS` first, NaN where a row lacks a
    statistic, then any further logged columns. A row lacking step, param or numel is a
    ``ValueError``."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(rows)
    required = ["step", "param", "numel"]
    if frame.empty:
        frame = pd.DataFrame(columns=required)
    for column in required:
        if column not in frame.columns or frame[column].isna().any():
            raise ValueError(f"a row lacks {column!r}")
    # parse each distinct name once, then spread by the rows' codes (no per-row Python)
    codes, names = pd.factorize(frame["param"])
    parsed = [parse_param_name(str(p)) for p in names]
    frame = frame.assign(run=run, method=method)
    frame["component"] = np.array([p.component for p in parsed], dtype=object)[codes]
    frame["layer"] = pd.array([p.layer for p in parsed], dtype="Int64").take(codes)
    frame["module"] = np.array([p.module for p in parsed], dtype=object)[codes]
    for column in stats.LAYERS_COLUMNS:
        if column not in frame.columns:
            frame[column] = np.nan
    extra = [c for c in frame.columns if c not in stats.LAYERS_COLUMNS]
    frame = frame.loc[:, [*stats.LAYERS_COLUMNS, *extra]]
    frame["step"] = frame["step"].astype("int64")
    frame["numel"] = frame["numel"].astype("int64")
    for column in frame.columns[8:]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame.reset_index(drop=True)


class RunReadError(UserError):
    """A run file that is missing, truncated or damaged; the message names the file."""


def _read(what):
    """Call ``what()``; a ``UserError`` from :mod:`spider.rundir` (which names the file)
    becomes a :class:`RunReadError`."""
    try:
        return what()
    except RunReadError:
        raise
    except UserError as err:
        raise RunReadError(str(err)) from None


# --------------------------------------------------------------------------------------------
# Safetensors files: keys and single tensors (memory-mapped)
# --------------------------------------------------------------------------------------------


def _file_keys(file: Path, what: str) -> list[str]:
    """Tensor names in a safetensors file (its header only), errors as RunReadError."""
    return _read(lambda: rundir.tensor_names(file, what))


def _group_keys(checkpoint: Path, group: str) -> list[str]:
    return _read(lambda: rundir.group_keys(checkpoint, group))


def _group_tensor(checkpoint: Path, group: str, key: str) -> torch.Tensor:
    """One tensor of a checkpoint group, through :func:`spider.rundir.iter_group`."""
    return _read(lambda: next(rundir.iter_group(checkpoint, group, [key]))[1])


def _base_tensor(file: Path, key: str) -> torch.Tensor:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key)
    except Exception as err:
        raise RunReadError(f"base model file {file} is damaged or not safetensors "
                           f"({str(err).splitlines()[0][:120]})") from None


# --------------------------------------------------------------------------------------------
# Base model names: runtime parameter names -> keys on disk
# --------------------------------------------------------------------------------------------

# Wrapper tokens that ``transformers`` adds or moves between the names on disk and
# ``model.state_dict()`` names (e.g. LLaVA: ``language_model.model.layers.0...`` on disk,
# ``model.language_model.layers.0...`` at run time).
_WRAPPER_TOKENS = {"model", "base_model"}


def _canonical(name: str) -> str:
    return ".".join(t for t in name.split(".") if t not in _WRAPPER_TOKENS)


class _BaseIndex:
    """Where each tensor of a base model directory lives, and how run-time names map to it.

    A checkpoint names tensors as ``model.state_dict()`` does; the base model's files may
    use the older on-disk names that ``transformers`` renames while loading. A name maps to
    the disk key that is equal to it, or equal once wrapper tokens (``model``) are dropped,
    or (last) the only key whose canonical form ends with its canonical form
    (``lm_head.weight`` -> ``language_model.lm_head.weight``).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise RunReadError(f"base model directory {directory} has no *.safetensors files")
        self.file_of: dict[str, Path] = {}
        for file in files:
            for key in _file_keys(file, "base model file"):
                self.file_of[key] = file
        self.by_canonical: dict[str, list[str]] = {}
        for key in self.file_of:
            self.by_canonical.setdefault(_canonical(key), []).append(key)

    def key(self, name: str) -> str | None:
        if name in self.file_of:
            return name
        canonical = _canonical(name)
        exact = self.by_canonical.get(canonical, [])
        if len(exact) == 1:
            return exact[0]
        suffix = [k for c, keys in self.by_canonical.items() if c.endswith("." + canonical)
                  for k in keys]
        if len(suffix) == 1:
            return suffix[0]
        if len(exact) + len(suffix) > 1:
            raise RunReadError(f"parameter {name} matches several tensors of the base model in "
                               f"{self.directory}: {sorted(exact + suffix)[:4]}")
        return None

    def tensor(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key is None:
            raise RunReadError(f"the base model in {self.directory} has no tensor for "
                               f"parameter {name}")
        return _base_tensor(self.file_of[key], key)


# --------------------------------------------------------------------------------------------
# Rebuilding a method on one tensor
# --------------------------------------------------------------------------------------------


def _one_parameter_model(name: str, tensor: torch.Tensor) -> nn.Module:
    """A module whose only parameter is ``tensor`` under the dotted ``name``, so that a
    method built on it sees the same name (and the same per-name seeds) as in training."""
    root = nn.Module()
    module = root
    *path, leaf = name.split(".")
    for part in path:
        child = nn.Module()
        module.add_module(part, child)
        module = child
    module.register_parameter(leaf, nn.Parameter(tensor.detach().clone(), requires_grad=True))
    return root


def _overrides(cls: type, attribute: str) -> bool:
    from spider.methods.base import MethodBase

    return getattr(cls, attribute) is not getattr(MethodBase, attribute)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Run:
    """A lazy view of one run directory; see the module docstring for what reads what.

    Frames are cached after their first read (the same object is returned each time: copy
    before changing it in place); :meth:`refresh` drops the caches (for a run that is still
    writing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._dir = RunDir(self.path)
        self._reset()

    def _reset(self) -> None:
        self._info: dict | None = None
        self._frames: dict[str, pd.DataFrame] = {}
        self._event_rows: list[dict] | None = None
        self._base: _BaseIndex | None = None
        self._keys: dict[tuple[int, str], list[str]] = {}
        self._metas: dict[int, dict] = {}
        self._rebuilt: tuple[tuple[int, str], Any] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ run.json
    @property
    def name(self) -> str:
        """The run's folder name (what tables and figures call it)."""
        return self.path.resolve().name

    @property
    def info(self) -> dict:
        """``run.json`` as a dict."""
        if self._info is None:
            info = _read(self._dir.read_run)
            if not isinstance(info, dict):
                raise RunReadError(f"run file {self._dir.run_file} holds a JSON "
                                   f"{type(info).__name__}, not an object")
            if not isinstance(info.get("config"), dict):
                raise RunReadError(f"run file {self._dir.run_file} has no 'config' object")
            self._info = info
        return self._info

    @property
    def config(self) -> dict:
        """The run's full configuration, with ``method``."""
        config = dict(self.info["config"])
        config.setdefault("method", self.method)
        return config

    @property
    def method(self) -> str:
        method = self.info.get("method") or self.info["config"].get("method")
        if not isinstance(method, str) or not method:
            raise RunReadError(f"run file {self._dir.run_file} does not name the method")
        return method

    @property
    def options(self) -> dict:
        """The method's options as the run used them (defaults filled in)."""
        options = self.info.get("options", self.info["config"].get("options", {}))
        return dict(options) if isinstance(options, dict) else {}

    @property
    def status(self) -> str:
        """``running`` | ``done`` | ``failed`` | ``cancelled`` | ``stopped unexpectedly``: what
        run.json says, except that a run which says ``running`` but whose process is gone
        (or whose heartbeat is stale) is ``stopped unexpectedly``
        (:func:`spider.rundir.effective_status`). Checked on every call."""
        return rundir.effective_status(self.info)

    @property
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return self._dir.checkpoint_steps()

    @property
    def base_model_dir(self) -> Path:
        """The base model the run was trained from (theta0)."""
        return _read(lambda: base_model_dir(self._dir))

    def refresh(self) -> Run:
        """Forget everything read so far (a running run has written more since)."""
        self._reset()
        return self

    # ------------------------------------------------------------------ frames
    def _events(self) -> list[dict]:
        """metrics.jsonl's events, read once for ``metrics``, ``train`` and ``summary``."""
        if self._event_rows is None:
            self._event_rows = _read(self._dir.read_events)
        return self._event_rows

    @property
    def metrics(self) -> pd.DataFrame:
        """Evaluation values: :data:`analysis.stats.METRICS_COLUMNS`, one row per value."""
        if "metrics" not in self._frames:
            with _malformed(self._dir.metrics_file):
                self._frames["metrics"] = self._metrics_frame()
        return self._frames["metrics"]

    def _metrics_frame(self) -> pd.DataFrame:
        rows = [
            (self.name, self.method, int(e["step"]), str(e["split"]), str(e["metric"]),
             float(e["value"]) if e.get("value") is not None else math.nan)
            for e in self._events()
            if e.get("event", "eval" if "split" in e else None) == "eval"
        ]
        frame = pd.DataFrame(rows, columns=list(stats.METRICS_COLUMNS))
        frame["step"] = frame["step"].astype("int64")
        frame["value"] = frame["value"].astype(float)
        return frame

    @property
    def train(self) -> pd.DataFrame:
        """Training steps: :data:`analysis.stats.TRAIN_COLUMNS` then ``seconds`` (the step's
        own time, evaluation excluded), one row per step."""
        if "train" not in self._frames:
            with _malformed(self._dir.metrics_file):
                self._frames["train"] = self._train_frame()
        return self._frames["train"]

    def _train_frame(self) -> pd.DataFrame:
        rows = [
            (self.name, self.method, int(e["step"]), _float(e.get("loss")), _float(e.get("lr")),
             _float(e.get("seconds")))
            for e in self._events()
            if e.get("event", "train" if "loss" in e else None) == "train"
        ]
        # then ``seconds``: the step's own time (evaluation pauses not included), for a
        # training-time axis
        frame = pd.DataFrame(rows, columns=[*stats.TRAIN_COLUMNS, "seconds"])
        frame["step"] = frame["step"].astype("int64")
        return frame

    @property
    def layers(self) -> pd.DataFrame:
        """Per (step, parameter) statistics: :data:`analysis.stats.LAYERS_COLUMNS` first
        (NaN where the method has no such notion), then any further logged columns
        (``theta0_norm``)."""
        if "layers" not in self._frames:
            rows = _read(self._dir.read_layers_frame)
            with _malformed(next(iter(self._dir.layers_files()), self._dir.layers_file)):
                self._frames["layers"] = self._layers_frame(rows)
        return self._frames["layers"]

    def _layers_frame(self, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
        return layers_frame(rows, self.name, self.method)

    @property
    def attribution(self) -> pd.DataFrame:
        """``attribution.jsonl`` (``python -m analysis.attribute``): per step, grouping and
        group, U, D, H with that group's update reverted and their differences to the
        unreverted checkpoint (columns :data:`analysis.attribute.ATTRIBUTION_COLUMNS`);
        empty when none was computed."""
        if "attribution" not in self._frames:
            from analysis.attribute import attribution_frame

            self._frames["attribution"] = attribution_frame(
                _read(lambda: self._dir.read_attribution()), self.name, self.method)
        return self._frames["attribution"]

    @property
    def summary(self) -> pd.DataFrame:
        """One row: U, D, H, E, F, O at the last step scored on both up- and downstream,
        measured from the run's own step-0 scores (:func:`analysis.stats.summary_table`;
        columns :data:`analysis.stats.SUMMARY_TABLE_COLUMNS`). NaN before any complete
        evaluation."""
        if "summary" not in self._frames:
            metrics = self.metrics
            if metrics.empty:
                row = {"run": self.name, "method": self.method,
                       **dict.fromkeys(("U", "D", "H", "E", "F", "O"), math.nan),
                       "step": pd.NA, "U_base": math.nan, "D_base": math.nan}
                frame = pd.DataFrame([row], columns=list(stats.SUMMARY_TABLE_COLUMNS))
                frame["step"] = frame["step"].astype("Int64")
            else:
                frame = stats.summary_table(metrics)
            self._frames["summary"] = frame
        return self._frames["summary"]

    # ------------------------------------------------------------------ tensors
    def _base_index(self) -> _BaseIndex:
        if self._base is None:
            self._base = _BaseIndex(self.base_model_dir)
        return self._base

    def _meta(self, step: int) -> dict:
        if step not in self._metas:
            meta = _read(lambda: checkpoint_meta(self._dir.checkpoint_dir(step)))
            if not isinstance(meta, dict):
                raise RunReadError(f"checkpoint metadata "
                                   f"{self._dir.checkpoint_dir(step) / rundir.CHECKPOINT_META} "
                                   "is not a JSON object")
            self._metas[step] = meta
        return self._metas[step]

    def _keys_of(self, step: int, group: str) -> list[str]:
        if (step, group) not in self._keys:
            self._keys[(step, group)] = _group_keys(self._dir.checkpoint_dir(step), group)
        return self._keys[(step, group)]

    def params(self, step: int) -> list[str]:
        """Names of the parameters whose tensors the checkpoint of ``step`` holds."""
        self._check_step(step)
        return list(self._keys_of(step, WEIGHTS_GROUP))

    def _check_step(self, step: int) -> None:
        steps = self.steps
        if not isinstance(step, (int, np.integer)) or int(step) not in steps:
            listed = ", ".join(map(str, steps)) if steps else "none"
            raise UserError(f"run {self.name} has no checkpoint at step {step!r}; "
                            f"its checkpoints are at steps: {listed}")

    def _trained_params(self) -> list[str]:
        """Every parameter the run trained (its statistics cover all of them, whatever
        ``save_tensors`` kept); empty when ``layers.jsonl`` cannot be read."""
        try:
            return [str(p) for p in pd.unique(self.layers["param"])]
        except UserError:
            return []

    def _check_param(self, step: int, param: str) -> None:
        saved = self._keys_of(step, WEIGHTS_GROUP)
        if param in saved:
            return
        trained = self._trained_params()
        in_base = False
        try:
            in_base = self._base_index().key(param) is not None
        except UserError:
            pass
        if param not in trained and not in_base:
            names = sorted(set(trained) | set(saved))
            close = difflib.get_close_matches(param, names, n=3, cutoff=0.6)
            hint = (f"; did you mean {', '.join(close)}?" if close else
                    f"; its parameters are named like {', '.join(names[:2])}" if names else "")
            raise UserError(f"parameter {param!r} does not exist in the model of run "
                            f"{self.name}{hint}")
        if trained and param not in trained:
            raise UserError(f"parameter {param} was not trained in run {self.name} (see its "
                            f"'train' setting {self.info['config'].get('train')!r}); its "
                            "checkpoints hold only the trained parameters, and 'weight' of the "
                            "base model is theta0")
        pattern = self._meta(step).get("save_tensors", self.info["config"].get("save_tensors"))
        if pattern and not re.search(pattern, param):
            raise UserError(
                f"parameter {param} is not saved in checkpoint step {step} of run "
                f"{self.name}: the run kept only tensors matching its save_tensors "
                f"regex {pattern!r} ({len(saved)} tensors)")
        raise UserError(f"checkpoint step {step} of run {self.name} holds no tensor for "
                        f"parameter {param!r}")

    def theta0(self, param: str) -> torch.Tensor:
        """The base model's tensor of ``param`` (the pre-trained weights), as stored."""
        return self._base_index().tensor(param)

    def tensor(self, step: int, param: str, kind: str) -> torch.Tensor:
        """One tensor of ``param`` at checkpoint ``step`` as float32; ``kind`` in
        :data:`TENSOR_KINDS`. Only the files that this tensor needs are opened, and only
        this tensor (and theta0) is read from them.

        Raises ``UserError`` (a ``ValueError``) for an unknown kind, step or parameter, a
        parameter the checkpoint did not save (``save_tensors``), or a kind the run's method
        has no notion of; :class:`RunReadError` for a missing or damaged file.
        """
        if kind not in TENSOR_KINDS:
            raise UserError(f"unknown tensor kind {kind!r}; choose from {', '.join(TENSOR_KINDS)}")
        self._check_step(step)
        step = int(step)
        if kind in ("mask", "importance_pre", "importance_ft"):
            self._check_kind(kind)  # before any file: the method decides
        self._check_param(step, param)
        checkpoint = self._dir.checkpoint_dir(step)
        if kind == "weight":
            return _group_tensor(checkpoint, WEIGHTS_GROUP, param).float()
        theta0 = self._theta0_like(step, param)
        if kind == "delta":
            weight = _group_tensor(checkpoint, WEIGHTS_GROUP, param)
            if _narrower(weight.dtype, theta0.dtype):
                theta0 = theta0.to(weight.dtype)  # like with like: pinned entries give 0
            return weight.float() - theta0.float()
        method = self._rebuild(step, param, theta0)
        if kind == "mask":
            return method.masks()[param].float()
        importance = method.importances().get(param)
        if importance is None:
            raise UserError(f"method {self.method!r} reports no importances for {param} at "
                            f"step {step}")
        key = "pre" if kind == "importance_pre" else "ft"
        if key not in importance:  # Dowser scores theta0 only: no fine-tuning importance
            raise UserError(f"method {self.method!r} reports no {kind} for {param}")
        return importance[key].float()

    def method_at(self, step: int, param: str):
        """The run's method rebuilt on a one-tensor model holding ``param``, in its state at
        checkpoint ``step`` (what ``tensor`` computes masks and importances from), e.g. to
        recompute the mask of the same state under other options (the app's what-if).
        Raises ``UserError`` as :meth:`tensor` does."""
        self._check_step(step)
        step = int(step)
        self._check_param(step, param)
        return self._rebuild(step, param, self._theta0_like(step, param))

    def _theta0_like(self, step: int, param: str) -> torch.Tensor:
        """theta0 of ``param``, checked against the shape the checkpoint saved."""
        theta0 = self.theta0(param)
        file = group_file(self._dir.checkpoint_dir(step), WEIGHTS_GROUP)
        shape = _read(lambda: rundir.group_shape(self._dir.checkpoint_dir(step), WEIGHTS_GROUP,
                                                 param))
        if tuple(theta0.shape) != shape:
            raise RunReadError(f"the base model in {self._base_index().directory} has shape "
                               f"{tuple(theta0.shape)} for {param}, the checkpoint {file} has "
                               f"{shape}; was the base model replaced?")
        return theta0

    def _method_class(self):
        from spider.methods import method_class

        try:
            return method_class(self.method)
        except ValueError as err:
            raise UserError(f"run {self.name}: {err}") from None

    def _check_kind(self, kind: str) -> None:
        cls = self._method_class()
        if kind == "mask" and (not cls.has_masks or not _overrides(cls, "masks")):
            raise UserError(
                f"method {self.method!r} (run {self.name}) has no mask tensor: it never "
                "pins weights to theta0 per element (w = 1 everywhere, or no per-weight "
                "mask at all); 'delta' and 'weight' show what it changed")
        if kind.startswith("importance") and not _overrides(cls, "importances"):
            raise UserError(
                f"method {self.method!r} (run {self.name}) has no {kind} tensor: only "
                "methods that rank weights (SPIDER's I = rank(theta0), G = rank(S)) have "
                "importances; 'delta' and 'weight' show what it changed")

    def _rebuild(self, step: int, param: str, theta0: torch.Tensor):
        """The run's method on a one-tensor model, in its state at ``step`` for ``param``.

        Built from the checkpoint's options and the method's own classes, so its
        ``masks()`` and ``importances()`` are computed exactly as in training. State tensors
        the checkpoint leaves out are restored: theta0 from the base model (exact, where a
        bf16 copy may be saved), and flags that a ``save_tensors`` filter dropped
        (``finalized``, as the checkpoint's metadata records it).
        """
        if self._rebuilt is not None and self._rebuilt[0] == (step, param):
            return self._rebuilt[1]
        from spider.methods import build_method

        meta = self._meta(step)
        saved_meta = meta.get("method") if isinstance(meta.get("method"), dict) else {}
        options = saved_meta.get("options", self.options)
        try:
            method = build_method(self.method, _one_parameter_model(param, theta0), **options)
        except ValueError as err:
            raise UserError(f"cannot rebuild method {self.method!r} of run {self.name} "
                            f"with options {options}: {err}") from None
        # masks by the method's plain (eager) formulas, as its statistics rows were logged:
        # the fused update passes agree with them to float rounding, but depend on the
        # machine (a C compiler, the CPU's vector width), which an analysis must not
        if hasattr(method, "fused"):
            method.fused = False
        expected = method.extra_state()
        state: dict[str, torch.Tensor] = {}
        checkpoint = self._dir.checkpoint_dir(step)
        method_keys = (self._keys_of(step, METHOD_GROUP)
                       if group_file(checkpoint, METHOD_GROUP).exists() else [])
        for key in method_keys:  # this parameter's state, and whole-method flags
            if key in expected or key.partition("/")[2] == param:
                state[key] = _group_tensor(checkpoint, METHOD_GROUP, key)
        finalized = _read(lambda: self._dir.checkpoint_meta(step)).finalized
        for key, value in expected.items():
            if key.split("/", 1)[0] == "theta0" and key.endswith("/" + param):
                state[key] = theta0
            elif key not in state and "/" not in key:
                state[key] = torch.full_like(value, int(finalized))
        missing = sorted(k for k in expected if k not in state)
        if missing:
            raise RunReadError(f"checkpoint file {group_file(checkpoint, METHOD_GROUP)} lacks "
                               f"the {self.method} state {missing[0]!r} needed to rebuild "
                               f"the mask of {param}")
        try:
            method.load_state_dict({"meta": saved_meta, "tensors": state})
        except ValueError as err:
            raise RunReadError(f"checkpoint file {group_file(checkpoint, METHOD_GROUP)} does "
                               f"not fit method {self.method!r}: {err}") from None
        self._rebuilt = ((step, param), method)
        return method


@contextlib.contextmanager
def _malformed(file: Path):
    """Turn a log row that lacks a field or holds a wrong type into a RunReadError."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        detail = f"a row lacks {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise RunReadError(f"{file} has malformed rows ({detail[:120]})") from None


def _narrower(saved: torch.dtype, base: torch.dtype) -> bool:
    """Whether a tensor saved as ``saved`` lost precision against ``base``."""
    if not (saved.is_floating_point and base.is_floating_point):
        return False
    return torch.finfo(saved).eps > torch.finfo(base).eps


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_run(path: str | os.PathLike) -> Run:
    """Open the run directory ``path`` (reads only its ``run.json``; the rest on demand).

    Raises ``UserError`` when ``path`` is not a run directory, :class:`RunReadError` when its
    ``run.json`` is damaged. A run that is still running loads; a torn last log line is
    ignored.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a run directory")
    run = Run(path)
    if not run._dir.run_file.exists():
        raise UserError(f"{path} is not a run directory (it has no {rundir.RUN_FILE})")
    run.info  # noqa: B018 - validate run.json now, with a clear message
    return run


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def _torn_tail(file: Path) -> bool:
    """True when a JSON-lines file ends inside a line (a write cut short)."""
    try:
        with open(file, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:
        return False


def _check_run(run: Run) -> tuple[list[str], pd.DataFrame | None]:
    """Problems found in ``run`` (one sentence each, naming the file) and its summary."""
    problems: list[str] = []
    summary = None
    try:
        run.base_model_dir  # noqa: B018
    except UserError as err:
        problems.append(str(err))
    running = run.status in (rundir.RUNNING, rundir.STOPPED_UNEXPECTEDLY)
    # Build the very frames the pages use (not only parse the lines), so that a row lacking
    # a field is found here and not first on a page that then fails.
    frames = {run._dir.metrics_file: lambda: (run.metrics, run.train),
              run._dir.layers_file: lambda: run.layers}
    for file, build in frames.items():
        try:
            build()
        except UserError as err:
            problems.append(str(err))
            continue
        if not running and _torn_tail(file):
            problems.append(f"{file} ends in a cut-off line although the run is {run.status}")
    if run.status == "done" and not run._dir.metrics_file.exists():
        problems.append(f"{run._dir.metrics_file} is missing although the run is done")
    try:
        summary = run.summary
    except UserError:
        pass  # already named above: summary is built from the metrics frame
    except (KeyError, ValueError, TypeError) as err:
        problems.append(f"{run._dir.metrics_file} has malformed events ({err})")
    for step in run.steps:
        try:
            groups = run._meta(step).get("groups", [])
            for group in groups:
                run._keys_of(step, group)
        except UserError as err:
            problems.append(str(err))
    return problems, summary


def _run_row(path: Path) -> dict:
    row: dict[str, Any] = {c: None for c in LIST_COLUMNS}
    row.update(path=str(path), name=path.resolve().name, checkpoints=0,
               U=math.nan, D=math.nan, H=math.nan, ok=False, problem="")
    try:
        run = Run(path)
        info = run.info
        row.update(method=run.method, status=run.status)
    except UserError as err:
        row["problem"] = str(err)
        return row
    config = info["config"]
    model = info.get("model")
    row["model"] = (model.get("given") or model.get("path")) if isinstance(model, dict) else (
        config.get("model"))
    row["data"] = config.get("data")
    progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
    row["steps"] = progress.get("step", config.get("steps") if "summary" in info else None)
    row["checkpoints"] = len(run.steps)
    if row["status"] == rundir.DONE and run._dir.listing_current(info):
        # finished, and no file changed since its writer fingerprinted them: trust run.json
        # (its summary) instead of reading the logs and checkpoints; the base model is not
        # the run's own, so it is still looked for
        problems = []
        try:
            run.base_model_dir  # noqa: B018
        except UserError as err:
            problems.append(str(err))
        written = info.get("summary") if isinstance(info.get("summary"), dict) else {}
        row.update({k: _float(written.get(k)) for k in ("U", "D", "H")})
        row["ok"] = not problems
        row["problem"] = "; ".join(problems)
        return row
    problems, summary = _check_run(run)
    scores = {}
    if summary is not None and not summary.empty and pd.notna(summary["U"].iloc[0]):
        scores = {k: float(summary[k].iloc[0]) for k in ("U", "D", "H")}
    elif isinstance(info.get("summary"), dict):
        scores = {k: _float(info["summary"].get(k)) for k in ("U", "D", "H")}
    row.update(scores)
    row["ok"] = not problems
    row["problem"] = "; ".join(problems)
    return row


def list_runs(root: str | os.PathLike) -> pd.DataFrame:
    """Every run directory under ``root`` (``root`` itself included), one row each.

    A finished run whose files are as its writer left them (``run.json``'s listing record,
    ``RunDir.listing_current``: a few ``stat`` calls) is listed from ``run.json`` alone;
    any other run (still writing, stopped, written before the record, or with a file
    changed since) has its logs and checkpoint headers read and checked.

    Columns :data:`LIST_COLUMNS`. ``steps`` is the trained steps so far (from the run's
    progress), ``checkpoints`` how many complete checkpoints it has, U/D/H its latest
    complete scores. A damaged run (unreadable run.json, a damaged log or checkpoint file,
    a missing base model) is listed with ``ok = False`` and a ``problem`` naming the file;
    this function never raises for a bad run. A missing ``root`` is a ``UserError``.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"runs folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder of runs")
    rows = []
    skip = {rundir.CHECKPOINTS, rundir.RESUME}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        if rundir.RUN_FILE in files:
            rows.append(_run_row(Path(folder)))
            subfolders[:] = [d for d in subfolders if d not in skip]
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    frame = pd.DataFrame.from_records(rows, columns=list(LIST_COLUMNS))
    frame["steps"] = pd.array(frame["steps"].map(_int_or_na), dtype="Int64")
    frame["checkpoints"] = frame["checkpoints"].astype("int64")
    frame["ok"] = frame["ok"].astype(bool)
    for column in ("U", "D", "H"):
        frame[column] = frame[column].astype(float)
    return frame


def _int_or_na(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return pd.NA
