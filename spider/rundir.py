"""The run directory (ARCHITECTURE.md, "The run directory"): the one module that knows its format.

Layout::

    RUN/run.json                       schema_version, config, method, model, seed, versions,
                                       status, the process (pid, its start time, host),
                                       heartbeat, progress, summary, and once finished the
                                       listing record (LISTING_KEY) (rewritten atomically)
    RUN/metrics.jsonl                  one event per line (TrainEvent, EvalEvent), appended;
                                       a torn last line from a killed run is ignored
    RUN/layers.jsonl                   per (step, parameter) statistics (StatisticsRow)
    RUN/layers/part-FFFFFFFFF-LLLLLLLLL.parquet
                                       the same rows, columnar, for a large run while it
                                       writes: one immutable part per logged step (steps F
                                       to L), small parts merged as they pile up
    RUN/layers.parquet                 all the rows, columnar, in place of layers.jsonl and
                                       the parts once a large run has finished (compact_layers)
    RUN/drift_base.safetensors         the step-0 model's answer log-probabilities on the
                                       upstream evaluation examples (``spider.drift``)
    RUN/attribution.jsonl              scores with groups of updates reverted
                                       (AttributionRow, written by ``analysis.attribute``)
    RUN/checkpoints/step-NNNNNN/       one folder per checkpoint, made under a temporary name
        meta.json                      and renamed into place whole (CheckpointMeta)
        weights.safetensors            the trained tensors' values at that step (LoRA merged)
        method.safetensors             the method's analysis state, keys "<group>/<param>"
    RUN/resume/                        the latest saved step's full state (weights, method,
                                       optimizer) for an exact --resume; replaced whole

Every whole-file write goes to a temporary name in the same folder, is flushed, then renamed
over the target: a run killed at any moment leaves either the old file or the new one.
``train.py`` writes through this module, ``analysis/run.py`` reads through it; no other
module spells a file or group name.

**Schema versions.** 2 (this one) adds the process record and heartbeat to ``run.json``,
``finalized`` to checkpoint metadata (whether the checkpoint was written after a post-hoc
method's ``finalize``), and takes the final step's statistics after ``finalize``. Runs of
version 1 still load: their checkpoints' ``finalized`` is inferred (``step >= steps``).
A new statistics column (``spider.statistics``, e.g. ``mask_churn``) is no new version:
readers take a column a row lacks as NaN.

**Reading while a run writes.** :class:`LogTail` (``RunDir.tail_events()``,
``tail_layers()``) reads the rows appended to a log since the last read (complete lines
only); the process record and heartbeat are :mod:`spider.liveness`'s.

**At scale.** Logs are parsed in bulk (:func:`_jsonl_table`, ``pyarrow.json``), row by row
only where that cannot take the file as it is (a torn or damaged line: the row reader names
it). The statistics of a large run (a logged step of at least :data:`LAYERS_PARTS_MIN_ROWS`
rows, e.g. a 7B model's 290 tensors, or a ``layers.jsonl`` grown past
:data:`LAYERS_PARQUET_MIN_BYTES`) are written as Parquet while the run writes: each append
is one part file ``layers/part-F-L.parquet`` (rows of steps F..L), written whole under a
temporary name and renamed into place, so a kill loses only the append under way and a
reader never sees half a part. When :data:`LAYERS_PARTS_MERGE` small parts pile up at the
end they are merged into one part covering their steps, renamed in before they are removed;
readers take the parts no other part's step range contains (:func:`_current_parts`), so
they see each row once at every moment. Small runs (the bundled samples) keep
``layers.jsonl``, rows before the switch too. A finished run's rows (jsonl and parts)
become one ``layers.parquet`` (:meth:`RunDir.compact_layers`), and its ``run.json`` gets a
listing record (:meth:`RunDir.listing_record`) that lets ``list_runs`` skip reading an
unchanged run. ``--resume`` at step k (:meth:`RunDir.truncate_layers`) drops the rows after
k from every form: the log is rewritten, parts after k removed, a part straddling k
rewritten (the new one renamed in first), a compacted file turned back into a part.

**Lifecycle.** ``run.json``'s ``status`` is ``running`` while training, then ``done``,
``failed`` (with ``error``) or ``cancelled`` (SIGTERM or Ctrl-C; continue with ``--resume``).
A process killed outright cannot say so; :func:`effective_status` finds out: a run that says
``running`` is :data:`STOPPED_UNEXPECTEDLY` when, on the same host, its process is gone or the
pid now belongs to another process (the start time in ``/proc/<pid>/stat`` differs), or, seen
from another host, its ``heartbeat`` (rewritten every ``heartbeat_interval_s`` by a daemon
thread, also during evaluations and checkpoint writes) is older than
:data:`HEARTBEAT_STALE_INTERVALS` intervals. :func:`read_progress` is the cheap poll (one
small file): effective status, step, total steps, whether an evaluation is under way, and
rates measured on training time alone, so an ETA can leave evaluation pauses out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spider import liveness, statistics
from spider.errors import UserError
from spider.liveness import (  # noqa: F401  (re-exported: the run's process record)
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_STALE_INTERVALS,
    process_alive,
    process_record,
    process_start_time,
)

SCHEMA_VERSION = 2
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LAYERS_FILE = "layers.jsonl"
LAYERS_PARQUET_FILE = "layers.parquet"  # a finished run's statistics, columnar (compacted)
LAYERS_PARQUET_MIN_BYTES = 16 << 20  # layers.jsonl of at least this size is compacted
LAYERS_PARTS_DIR = "layers"  # a large run's statistics while it writes: Parquet parts
LAYERS_PARTS_MIN_ROWS = 128  # a step with this many rows (tensors) starts writing parts
LAYERS_PARTS_MERGE = 32  # this many small trailing parts are merged into one
_PARTS_MERGE_TIERS = (1 << 14, 1 << 20)  # "small": fewer rows than this (merged per tier)
DRIFT_BASE_FILE = "drift_base.safetensors"  # the step-0 answer distributions (spider.drift)
ATTRIBUTION_FILE = "attribution.jsonl"  # analysis.attribute: scores with updates reverted
CHECKPOINTS = "checkpoints"
CHECKPOINT_META = "meta.json"
STEP_PREFIX = "step-"
RESUME = "resume"
LISTING_KEY = "listing"  # run.json: the fingerprint of a finished run's files (list_runs)
_TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)

# Checkpoint groups. ``weights``: the model's trained tensors, named as in the base model's
# state_dict, holding their effective values at that step (LoRA merged in): base model + this
# group = the fine-tuned model. ``method``: the method's state, keys ``"<group>/<param>"``
# (see :func:`state_key`) plus whole-method flags without a ``/``. ``optimizer``: AdamW's
# tensors as ``"<param index>/<name>"`` (resume state only).
WEIGHTS_GROUP = "weights"
METHOD_GROUP = "method"
OPTIMIZER_GROUP = "optimizer"

# Statuses written to run.json, and the one only a reader can tell.
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
STOPPED_UNEXPECTEDLY = "stopped unexpectedly"
STATUSES = (RUNNING, DONE, FAILED, CANCELLED, STOPPED_UNEXPECTEDLY)



# ------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either old or new, never torn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any, fsync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(),
                       fsync=fsync)


def read_json(path: Path, what: str = "file") -> dict:
    """Read a JSON object; a missing, unreadable or malformed file is a ``UserError``."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} cannot be read ({err.__class__.__name__})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON (line {err.lineno}, column "
                        f"{err.colno}): {err.msg}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is not usable JSON (nested too deeply)") from None


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


# ------------------------------------------------------------------------- typed records
@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """One optimizer step, a line of ``metrics.jsonl``."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    event: str = "train"


@dataclasses.dataclass(frozen=True)
class EvalEvent:
    """One evaluated value (``metric`` ``score`` or ``task:NAME``) of one split at one step."""

    step: int
    split: str
    metric: str
    value: float
    n: int | None = None
    event: str = "eval"


def _event_json(event: TrainEvent | EvalEvent | Mapping) -> dict:
    if dataclasses.is_dataclass(event):
        row = dataclasses.asdict(event)
        if row.get("n", 0) is None:
            del row["n"]
        return {"event": row.pop("event"), **row}
    return dict(event)


@dataclasses.dataclass(frozen=True)
class AttributionRow:
    """One line of ``attribution.jsonl``: the checkpoint of ``step`` with the update of
    ``group`` (``by`` component, layer or module; ``(none)``, ``(all)``) reverted to theta0,
    scored on the run's evaluation splits (``scores``: split -> main score)."""

    step: int
    by: str
    group: str
    scores: dict[str, float]
    params: int  # how many tensors the group reverts
    limit: int  # examples per split

    @classmethod
    def from_json(cls, row: dict, file: Path) -> AttributionRow:
        try:
            return cls(int(row["step"]), str(row["by"]), str(row["group"]),
                       {str(k): float(v) for k, v in dict(row["scores"]).items()},
                       int(row.get("params", 0)), int(row.get("limit", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{file}: a row lacks or mangles {err}") from None


STATISTICS_COLUMNS = ("step", "param", "numel", *statistics.LAYERS_FILE_COLUMNS)
"""Columns of a ``layers.jsonl`` row (:class:`StatisticsRow`), in order."""


@dataclasses.dataclass(frozen=True)
class StatisticsRow:
    """Per-parameter statistics at one step: what the method reports
    (``spider.statistics.METHOD_COLUMNS``) and the update norms."""

    step: int
    param: str
    numel: int
    stats: Mapping[str, float]
    update_norm: float
    theta0_norm: float

    def to_json(self) -> dict:
        row: dict[str, Any] = {"step": self.step, "param": self.param, "numel": self.numel}
        row.update({c: float(self.stats.get(c, math.nan)) for c in statistics.METHOD_COLUMNS})
        row.update(update_norm=self.update_norm,
                   update_rel_norm=(self.update_norm / self.theta0_norm if self.theta0_norm
                                    else math.nan),
                   theta0_norm=self.theta0_norm)
        return row


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json`` of a checkpoint: what it is, so that a reader never guesses."""

    step: int
    groups: tuple[str, ...]
    finalized: bool  # written after the method's finalize() (post-hoc methods act there)
    method: dict  # the method's state meta: name, steps_done, options
    save_dtype: str = "float32"
    save_tensors: str = ""
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, data: dict, run_steps: int | None = None) -> CheckpointMeta:
        """Read ``meta.json``; a version-1 checkpoint's ``finalized`` is inferred from the
        run's length (the final checkpoint was written after ``finalize``)."""
        step = int(data["step"])
        finalized = data.get("finalized")
        if finalized is None:
            finalized = run_steps is not None and step >= run_steps
        method = data.get("method") if isinstance(data.get("method"), dict) else {}
        return cls(step=step, groups=tuple(data.get("groups", ())), finalized=bool(finalized),
                   method=method, save_dtype=str(data.get("save_dtype", "float32")),
                   save_tensors=str(data.get("save_tensors") or ""),
                   schema_version=int(data.get("schema_version", 1)))


@dataclasses.dataclass
class ResumeState:
    """Everything an exact ``--resume`` needs, for the latest saved step."""

    step: int
    weights: dict[str, torch.Tensor]  # trained parameters (empty when the method holds them)
    method: dict  # the method's ``state_dict()``: {"meta": ..., "tensors": ...}
    optimizer_tensors: dict[str, torch.Tensor]  # "<param index>/<name>" -> tensor
    optimizer_scalars: dict[str, Any]  # "<param index>/<name>" -> number
    optimizer_groups: list  # the optimizer's param_groups

    def optimizer_state(self, like=lambda index, tensor: tensor) -> dict:
        """The optimizer's ``state_dict()``; ``like(index, tensor)`` lays a tensor out like
        its parameter (device, sharding)."""
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in self.optimizer_tensors.items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = like(int(index), tensor)
        for key, value in self.optimizer_scalars.items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = value
        return {"state": state, "param_groups": self.optimizer_groups}


def optimizer_groups(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict()`` into ``"<index>/<name>"`` tensors and scalars."""
    tensors, scalars = {}, {}
    for index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{index}/{key}"] = value
    return tensors, scalars


# ------------------------------------------------------------------------- method state keys
def state_key(group: str, param: str) -> str:
    """The key of ``param``'s tensor of state group ``group`` (e.g. ``grad_sum/<param>``)."""
    return f"{group}/{param}"


def split_state_key(key: str) -> tuple[str, str | None]:
    """``(group, param)`` of a method-state key; ``(key, None)`` for a whole-method flag."""
    group, sep, param = key.partition("/")
    return (group, param) if sep else (key, None)


# ------------------------------------------------------------------------- the process
# Process liveness (pid, start time, boot id, heartbeat age) is spider.liveness; its names
# are re-exported here for the readers that know run directories only.


def effective_status(run_dir_or_info: str | os.PathLike | RunDir | Mapping,
                     now: float | None = None) -> str:
    """The run's status as a person should read it: ``running``, ``done``, ``failed``,
    ``cancelled`` or :data:`STOPPED_UNEXPECTEDLY` (see the module docstring).

    Takes a run directory or its ``run.json`` as a dict. An unreadable run.json is a
    ``UserError``; a run.json without a status reads as ``running`` checked the same way.
    """
    info = run_dir_or_info
    if not isinstance(info, Mapping):
        info = RunDir(info if not isinstance(info, RunDir) else info.path).read_run()
    status = str(info.get("status", RUNNING))
    if status != RUNNING:
        return status
    if liveness.on_this_host(info):
        if "pid" not in info:
            return RUNNING  # nothing to check against
        return RUNNING if liveness.record_alive(info) else STOPPED_UNEXPECTEDLY
    # another host: only the heartbeat's age tells (none: nothing to tell it by)
    return STOPPED_UNEXPECTEDLY if liveness.heartbeat_stale(info, now) else RUNNING


@dataclasses.dataclass(frozen=True)
class Progress:
    """A run's progress as :func:`read_progress` polls it."""

    status: str  # effective status (see effective_status)
    step: int  # optimizer steps done (a failed run: the last step reached)
    steps: int | None  # steps the run was asked for
    evaluating: bool  # an evaluation is under way right now
    eval_step: int | None  # the step being evaluated, when evaluating
    saved_step: int | None  # the last step with a checkpoint
    it_per_s: float | None  # optimizer steps per second of training time (evaluations out)
    eta_s: float | None  # seconds of training left at that rate (evaluations not included)
    eval_seconds: float | None  # mean seconds per evaluation so far
    evals_left: int | None  # evaluations still to come (step 0 and the end included)
    loss: float | None
    heartbeat_age_s: float | None
    error: str | None


def read_progress(run_dir: str | os.PathLike | RunDir, now: float | None = None) -> Progress:
    """Poll a run: reads its ``run.json`` only (one small file, rewritten atomically)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    info = run.read_run()
    progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
    beat = info.get("heartbeat")
    now = time.time() if now is None else now

    def number(key, kind=float):
        value = progress.get(key)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None

    return Progress(
        status=effective_status(info, now), step=number("step", int) or 0,
        steps=number("steps", int), evaluating=bool(progress.get("evaluating", False)),
        eval_step=number("eval_step", int), saved_step=number("saved_step", int),
        it_per_s=number("it_per_s"), eta_s=number("eta_s"), eval_seconds=number("eval_seconds"),
        evals_left=number("evals_left", int), loss=number("loss"),
        heartbeat_age_s=(now - beat) if isinstance(beat, (int, float)) else None,
        error=info.get("error"))


class RunInfoWriter:
    """The one writer of a run's ``run.json``: changes go through :meth:`update`, and a daemon
    thread rewrites the ``heartbeat`` every ``interval`` seconds while :meth:`heartbeat` is
    entered. A lock keeps the two from writing over each other. ``enabled=False`` (processes
    other than 0) keeps the record in memory only."""

    def __init__(self, run: RunDir, info: dict, enabled: bool = True,
                 interval: float = HEARTBEAT_INTERVAL_S):
        self.run, self.info, self.enabled, self.interval = run, dict(info), enabled, interval
        self._lock = threading.Lock()
        self._heart: liveness.Heartbeat | None = None

    def update(self, **changes: Any) -> dict:
        with self._lock:
            self.info.update(changes, updated=time.time())
            self._write()
            return self.info

    def update_progress(self, **changes: Any) -> dict:
        """Change some fields of ``progress``, keeping the others."""
        with self._lock:
            progress = dict(self.info.get("progress") or {})
            progress.update(changes)
            self.info.update(progress=progress, updated=time.time())
            self._write()
            return self.info

    def _write(self) -> None:
        if self.enabled:
            self.info["heartbeat"] = time.time()
            self.info["heartbeat_interval_s"] = self.interval
            self.run.write_run(self.info)

    def _beat(self) -> None:
        with self._lock:
            self._write()

    @property
    def _thread(self):
        """The heartbeat thread while one runs (None otherwise)."""
        return self._heart._thread if self._heart is not None else None

    def heartbeat(self) -> liveness.Heartbeat:
        """Context manager: keep the heartbeat going while inside (a daemon thread,
        :class:`spider.liveness.Heartbeat`, rewrites run.json every ``interval`` s)."""
        if self._heart is None:
            self._heart = liveness.Heartbeat(self._beat, self.interval)
        return self._heart


# ------------------------------------------------------------------------- the run folder
class RunDir:
    """Paths and whole-file reads/writes of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def layers_file(self) -> Path:
        return self.path / LAYERS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_name(step)

    @property
    def resume_dir(self) -> Path:
        return self.path / RESUME

    # -- run.json
    def read_run(self) -> dict:
        info = read_json(self.run_file, "run file")
        if not isinstance(info, dict):
            raise UserError(f"run file {self.run_file} holds a JSON {type(info).__name__}, "
                            "not an object")
        return info

    def write_run(self, info: dict) -> None:
        body = {k: v for k, v in info.items() if k != "schema_version"}
        atomic_write_json(self.run_file, {"schema_version": SCHEMA_VERSION, **body})

    # -- whether a folder may become (or stay) this run
    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def never_trained(self) -> bool:
        """A run that ended (or stopped) before its first step: nothing in it is worth
        keeping, so it may be started again in place."""
        try:
            info = self.read_run()
        except UserError:
            # killed while writing its first run.json: only that write's temporary remains
            return (not self.run_file.exists() and self.path.is_dir()
                    and all(p.name.startswith(_TMP_PREFIX) for p in self.path.iterdir()))
        progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
        known = {RUN_FILE, METRICS_FILE, LAYERS_FILE, LAYERS_PARQUET_FILE, LAYERS_PARTS_DIR,
                 DRIFT_BASE_FILE, CHECKPOINTS, RESUME}
        return (effective_status(info) in (FAILED, CANCELLED, STOPPED_UNEXPECTEDLY)
                and not progress.get("step") and not self.checkpoint_steps()
                and not (self.resume_dir / CHECKPOINT_META).exists()
                and not any(e.get("event") == "train" for e in self.read_events())
                and all(p.name in known or p.name.startswith(_TMP_PREFIX)
                        for p in self.path.iterdir()))

    def clear(self) -> None:
        """Remove what a run wrote (only the files of the format; used for a run that never
        trained, before it starts again in place)."""
        for name in (METRICS_FILE, LAYERS_FILE, LAYERS_PARQUET_FILE, DRIFT_BASE_FILE,
                     ATTRIBUTION_FILE, RUN_FILE):
            (self.path / name).unlink(missing_ok=True)
        for name in (CHECKPOINTS, RESUME, LAYERS_PARTS_DIR):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for stale in self.path.glob(_TMP_PREFIX + "*"):
            (shutil.rmtree if stale.is_dir() else os.unlink)(stale)

    def remove_temporaries(self) -> None:
        """Remove what interrupted writes left behind (``.tmp-*`` files and folders in the run
        folder and in ``checkpoints/``: a checkpoint or resume state cut short by a kill).
        Only while no process writes this run: a resume does it before writing."""
        for folder in (self.path, self.checkpoints_dir, self.layers_parts_dir):
            if folder.is_dir():
                for stale in folder.glob(_TMP_PREFIX + "*"):
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)

    # -- metrics.jsonl (events) and layers.jsonl (per step and parameter statistics)
    def append_events(self, events: Iterable[TrainEvent | EvalEvent | dict]) -> None:
        """Append events, one JSON line each, flushed to disk before returning."""
        _append_jsonl(self.metrics_file, (_event_json(e) for e in events))

    def read_events(self) -> list[dict]:
        """Every complete event; a torn last line (a killed run) is skipped."""
        return _read_jsonl(self.metrics_file)

    def truncate_events(self, keep_through_step: int) -> None:
        """Keep only events up to ``keep_through_step`` (a resumed run rewrites the rest)."""
        _truncate_jsonl(self.metrics_file, keep_through_step)

    def append_layers(self, rows: Iterable[StatisticsRow | dict]) -> None:
        """Append one logged step's statistics rows, on disk before returning: to
        ``layers.jsonl``, or for a large run (see "At scale" above) as a new Parquet part,
        merging the small parts at the end when enough have piled up."""
        rows = [r.to_json() if isinstance(r, StatisticsRow) else dict(r) for r in rows]
        if not rows:
            return
        if not self._writes_parts(len(rows)):
            _append_jsonl(self.layers_file, rows)
            return
        steps = [int(r.get("step", 0)) for r in rows]
        _write_part(self.layers_parts_dir, min(steps), max(steps), _rows_table(rows))
        self._merge_parts()

    def _writes_parts(self, rows: int) -> bool:
        """Whether an append of ``rows`` rows goes to a Parquet part: once the run has parts
        (a resumed run goes on as it wrote), for a step of many tensors, or once the log
        is large. Rows before the switch stay in ``layers.jsonl``."""
        if rows >= LAYERS_PARTS_MIN_ROWS or _list_parts(self.layers_parts_dir):
            return True
        try:
            return self.layers_file.stat().st_size >= LAYERS_PARQUET_MIN_BYTES
        except OSError:
            return False

    def _merge_parts(self) -> None:
        """Merge the small parts at the end (fewer rows than a tier's limit) into one once
        :data:`LAYERS_PARTS_MERGE` of them have piled up, so a long run has few files. The
        merged part is renamed into place before the parts it covers are removed (readers
        take the covering part meanwhile, :func:`_current_parts`); parts left covered by a
        kill are removed here too."""
        import pyarrow as pa

        for part in _covered_parts(self.layers_parts_dir):
            part.path.unlink(missing_ok=True)
        for limit in _PARTS_MERGE_TIERS:
            tail: list[_Part] = []
            for part in reversed(_current_parts(self.layers_parts_dir)):
                if part.rows() >= limit:
                    break
                tail.insert(0, part)
            if len(tail) < LAYERS_PARTS_MERGE:
                continue
            table = pa.concat_tables([_read_part(p) for p in tail], promote_options="permissive")
            _write_part(self.layers_parts_dir, tail[0].first, tail[-1].last, table)
            for part in tail:
                part.path.unlink(missing_ok=True)

    def read_layers(self) -> list[dict]:
        """Every statistics row, as a dict (see :meth:`read_layers_frame` for the frame)."""
        if self.layers_parquet_file.exists() or _list_parts(self.layers_parts_dir):
            return self.read_layers_frame().to_dict("records")
        return _read_jsonl(self.layers_file)

    @property
    def layers_parquet_file(self) -> Path:
        return self.path / LAYERS_PARQUET_FILE

    @property
    def layers_parts_dir(self) -> Path:
        return self.path / LAYERS_PARTS_DIR

    def read_layers_frame(self):
        """The statistics rows as a ``pandas.DataFrame`` (one column per logged field, in
        the order they first appear; NaN where a row lacks one): from ``layers.parquet``
        when the run's rows were compacted (:meth:`compact_layers`), else ``layers.jsonl``
        (parsed in bulk, :func:`_read_jsonl_frame`, with the errors of :meth:`read_layers`)
        followed by the current Parquet parts. Empty when the run logged none. Safe while
        the run writes: a part merged away between the listing and the read makes it look
        again."""
        import pandas as pd
        import pyarrow as pa

        for attempt in range(8):
            if self.layers_parquet_file.exists():
                return _read_parquet_frame(self.layers_parquet_file)
            parts = _current_parts(self.layers_parts_dir)
            try:
                tables = [_read_part(p) for p in parts]
            except FileNotFoundError:  # merged (or compacted) meanwhile: look again
                if attempt == 7:
                    raise UserError(f"{self.layers_parts_dir} changed under every read of "
                                    "it; try again") from None
                continue
            log = _read_jsonl_table_or_frame(self.layers_file)
            if log is None and self.layers_parquet_file.exists():
                continue  # compacted since the first look: the log is gone, the file has all
            if log is None and not tables:
                return pd.DataFrame()
            if log is None or isinstance(log, pa.Table):
                if log is not None:
                    tables.insert(0, log)
                return pa.concat_tables(tables, promote_options="permissive").to_pandas()
            return pd.concat([log, *(t.to_pandas() for t in tables)], ignore_index=True)
        return pd.DataFrame()

    def layers_files(self) -> list[Path]:
        """The files holding the run's statistics rows (none when it logged none): the
        compacted file alone, else the log and the current parts."""
        if self.layers_parquet_file.is_file():
            return [self.layers_parquet_file]
        log = [self.layers_file] if self.layers_file.is_file() else []
        return log + [p.path for p in _current_parts(self.layers_parts_dir)]

    def compact_layers(self, min_bytes: int | None = None) -> bool:
        """Rewrite a finished run's statistics (``layers.jsonl`` and the Parquet parts) as
        one ``layers.parquet`` (columnar, zstd: about a sixth of the log's size, read in
        bulk) when the run wrote parts or its log holds at least ``min_bytes`` (None:
        :data:`LAYERS_PARQUET_MIN_BYTES`); the run recorder calls it once the run's last row
        is written. The file is written whole under a temporary name and renamed into place
        before the log and parts are removed, so a kill leaves the old files, or both
        (readers take ``layers.parquet``), never neither. A log the bulk parser cannot take
        as it is (damaged, mixed types) is left as it is, and so are the parts. True when
        compacted."""
        import pyarrow as pa

        if self.layers_parquet_file.exists():
            self._remove_compacted()  # what a kill after the rename left
            return False
        parts = _current_parts(self.layers_parts_dir)
        try:
            size = self.layers_file.stat().st_size
        except OSError:
            size = None
        if not parts and (size is None or size < (LAYERS_PARQUET_MIN_BYTES
                                                  if min_bytes is None else min_bytes)):
            return False
        try:
            tables = [_read_part(p) for p in parts]
        except (UserError, FileNotFoundError):  # damaged: kept as it is, the readers name it
            return False
        if size is not None:
            table = _jsonl_table(self.layers_file)
            if table is None:
                return False
            tables.insert(0, table)
        table = pa.concat_tables(tables, promote_options="permissive")
        atomic_write_bytes(self.layers_parquet_file, _parquet_bytes(table))
        self._remove_compacted()
        return True

    def _remove_compacted(self) -> None:
        """Remove the log and parts ``layers.parquet`` holds (readers take that file)."""
        self.layers_file.unlink(missing_ok=True)
        shutil.rmtree(self.layers_parts_dir, ignore_errors=True)

    def tail_events(self) -> LogTail:
        """An incremental reader of ``metrics.jsonl`` (:class:`LogTail`)."""
        return LogTail(self.metrics_file)

    # -- drift_base.safetensors (the base model's answer distributions) and attribution.jsonl
    @property
    def drift_base_file(self) -> Path:
        return self.path / DRIFT_BASE_FILE

    def write_drift_base(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """The step-0 model's answer log-probabilities (``spider.drift``), written whole."""
        tmp = self.path / f"{_TMP_PREFIX}{DRIFT_BASE_FILE}"
        try:
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=meta)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, self.drift_base_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_drift_base(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """What :meth:`write_drift_base` wrote (None when absent)."""
        file = self.drift_base_file
        if not file.exists():
            return None
        try:
            with safe_open(str(file), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except Exception as err:
            raise UserError(f"{file} is damaged or not safetensors "
                            f"({str(err).splitlines()[0][:120]})") from None

    @property
    def attribution_file(self) -> Path:
        return self.path / ATTRIBUTION_FILE

    def append_attribution(self, rows: Iterable[AttributionRow]) -> None:
        """Append rows of ``analysis.attribute``, flushed to disk before returning."""
        _append_jsonl(self.attribution_file, (dataclasses.asdict(r) for r in rows))

    def read_attribution(self) -> list[AttributionRow]:
        """Every complete row of ``attribution.jsonl`` (none when absent)."""
        return [AttributionRow.from_json(r, self.attribution_file)
                for r in _read_jsonl(self.attribution_file)]

    def tail_layers(self) -> LogTail:
        """An incremental reader of the statistics (:class:`LogTail` of ``layers.jsonl``,
        then the Parquet parts as they appear); once the run's rows are compacted
        (:meth:`compact_layers`), they are read from ``layers.parquet``."""
        return _LayersTail(self.layers_file, self.layers_parquet_file, self.layers_parts_dir)

    def truncate_layers(self, keep_through_step: int) -> None:
        """Keep only the statistics rows up to ``keep_through_step`` (a resumed run writes
        the rest again), in every form they are in; only while no process writes the run.
        Each rewrite is renamed into place before what it replaces is removed: a kill here
        loses no kept row, and the resume after it does the rest."""
        k = keep_through_step
        if self.layers_parquet_file.exists():
            # compacted, and yet resumed (killed after the compaction, before the run's end
            # was recorded): its rows become a part again, so that new rows follow them
            self._remove_compacted()
            table = _read_part(_Part(self.layers_parquet_file, 0, 0))
            self._write_kept(table, k)
            self.layers_parquet_file.unlink()
        _truncate_jsonl(self.layers_file, k)
        for part in _covered_parts(self.layers_parts_dir):
            part.path.unlink(missing_ok=True)
        for part in _current_parts(self.layers_parts_dir):
            if part.first > k:
                part.path.unlink()
            elif part.last > k:
                self._write_kept(_read_part(part), k)
                part.path.unlink()

    def _write_kept(self, table, keep_through_step: int) -> None:
        """``table``'s rows up to ``keep_through_step`` as a part (none when none is)."""
        import pyarrow.compute as pc

        kept = table.filter(pc.less_equal(table["step"], keep_through_step))
        if len(kept):
            steps = kept["step"].to_pylist()
            _write_part(self.layers_parts_dir, min(steps), max(steps), kept)

    # -- the listing record: what ``list_runs`` may take from run.json without the logs
    def files_fingerprint(self) -> dict[str, list[int]]:
        """``[size, mtime_ns]`` of every file the listing checks (the logs and each complete
        checkpoint's files), by path relative to the run folder. Only ``stat`` calls."""
        found: dict[str, list[int]] = {}
        for name in (METRICS_FILE, LAYERS_FILE, LAYERS_PARQUET_FILE):
            try:
                st = os.stat(self.path / name)
            except OSError:
                continue
            found[name] = [st.st_size, st.st_mtime_ns]
        for part in _list_parts(self.layers_parts_dir):
            try:
                st = part.path.stat()
            except OSError:
                continue
            found[f"{LAYERS_PARTS_DIR}/{part.path.name}"] = [st.st_size, st.st_mtime_ns]
        for folder in _scandir(self.checkpoints_dir):
            if not folder.name.startswith(STEP_PREFIX) or not folder.is_dir():
                continue
            for entry in _scandir(Path(folder.path)):
                if entry.name.startswith(_TMP_PREFIX):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                found[f"{CHECKPOINTS}/{folder.name}/{entry.name}"] = [st.st_size,
                                                                      st.st_mtime_ns]
        return found

    def listing_record(self) -> dict:
        """What the writer of a finished run puts under ``run.json``'s :data:`LISTING_KEY`:
        the fingerprint of the files it wrote (:meth:`files_fingerprint`). A reader that finds
        the files unchanged since (:meth:`listing_current`) may list the run from run.json
        alone: the files are as the writer left them, whole."""
        return {"files": self.files_fingerprint()}

    def listing_current(self, info: Mapping) -> bool:
        """Whether ``info`` (this run's run.json) holds a listing record and no file it
        fingerprints has changed, appeared or gone since (a damaged, truncated or rewritten
        file has another size or mtime). False for runs written before the record existed,
        runs still writing and runs that stopped before the end: read their logs."""
        record = info.get(LISTING_KEY)
        return (isinstance(record, dict) and isinstance(record.get("files"), dict)
                and record["files"] == self.files_fingerprint())

    # -- checkpoints
    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (temporary folders are ignored)."""
        if not self.checkpoints_dir.is_dir():
            return []
        steps = []
        for child in self.checkpoints_dir.iterdir():
            if child.name.startswith(STEP_PREFIX) and (child / CHECKPOINT_META).exists():
                try:
                    steps.append(int(child.name[len(STEP_PREFIX):]))
                except ValueError:
                    continue
        return sorted(steps)

    def write_checkpoint(self, step: int, groups: dict[str, dict[str, torch.Tensor]],
                         meta: dict) -> Path:
        """Write ``groups`` (name -> tensors) as ``NAME.safetensors`` plus ``meta.json``.

        Built in a temporary folder and renamed into place; an existing checkpoint of the
        same step is replaced only once the new one is complete.
        """
        return _write_folder(self.checkpoint_dir(step), groups,
                             {"step": step, "schema_version": SCHEMA_VERSION, **meta})

    def write_analysis_checkpoint(self, step: int, weights: dict[str, torch.Tensor],
                                  method_state: dict[str, torch.Tensor], *, finalized: bool,
                                  method_meta: dict, save_dtype: str = "float32",
                                  save_tensors: str = "") -> Path:
        """The checkpoint analysis reads: trained weights and the method's analysis state."""
        return self.write_checkpoint(step, {WEIGHTS_GROUP: weights, METHOD_GROUP: method_state},
                                     {"finalized": finalized, "method": method_meta,
                                      "save_dtype": save_dtype, "save_tensors": save_tensors})

    def checkpoint_meta(self, step: int) -> CheckpointMeta:
        """The typed metadata of the checkpoint of ``step``; a damaged one is a UserError."""
        path = self.checkpoint_dir(step) / CHECKPOINT_META
        data = read_json(path, "checkpoint metadata")
        if not isinstance(data, dict):
            raise UserError(f"checkpoint metadata {path} is not a JSON object")
        steps = None
        try:
            steps = int(self.read_run().get("config", {}).get("steps"))
        except (UserError, TypeError, ValueError):
            pass
        try:
            return CheckpointMeta.from_json(data, steps)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"checkpoint metadata {path} is malformed ({err})") from None

    def remove_checkpoints_after(self, step: int) -> None:
        """Remove the checkpoints after ``step`` (what ``--resume`` at ``step`` rewrites), and
        the ``attribution.jsonl`` rows that scored them: the checkpoints the new steps write
        are other weights. The rows go first, so a kill in between leaves no row without its
        checkpoint."""
        _truncate_jsonl(self.attribution_file, step)
        for s in self.checkpoint_steps():
            if s > step:
                # renamed away first, so a reader sees the whole folder or none of it
                folder = self.checkpoint_dir(s)
                doomed = folder.with_name(f"{_TMP_PREFIX}{folder.name}.removed")
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(folder, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # -- resume state: everything an exact resume needs, for the latest saved step only
    def write_resume(self, step: int, groups: dict[str, dict[str, torch.Tensor]],
                     meta: dict) -> None:
        _write_folder(self.resume_dir, groups, {"step": step, **meta})

    def write_resume_state(self, state: ResumeState) -> None:
        self.write_resume(state.step, {WEIGHTS_GROUP: state.weights,
                                       METHOD_GROUP: state.method["tensors"],
                                       OPTIMIZER_GROUP: state.optimizer_tensors},
                          {"method": state.method["meta"],
                           "optimizer_groups": state.optimizer_groups,
                           "optimizer_scalars": state.optimizer_scalars})

    def remove_resume(self) -> None:
        """Remove the resume state (a finished run is never resumed). Renamed away first,
        so that a kill during the removal leaves no half state, only a ``.tmp-`` folder."""
        if not self.resume_dir.exists():
            return
        doomed = self.path / f"{_TMP_PREFIX}{RESUME}-removed-{os.getpid()}"
        try:
            os.replace(self.resume_dir, doomed)
        except OSError:
            doomed = self.resume_dir
        shutil.rmtree(doomed, ignore_errors=True)

    def read_resume(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
        """``(meta, groups)`` of the resume state, or None when the run never saved one.
        Called on ``--resume``, when no process writes the run."""
        recover_interrupted_swap(self.resume_dir)
        if not (self.resume_dir / CHECKPOINT_META).exists():
            return None
        meta = read_json(self.resume_dir / CHECKPOINT_META, "resume metadata")
        return meta, {g: read_group(self.resume_dir, g) for g in meta.get("groups", [])}

    def read_resume_state(self) -> ResumeState | None:
        found = self.read_resume()
        if found is None:
            return None
        meta, groups = found
        try:
            return ResumeState(step=int(meta["step"]), weights=groups.get(WEIGHTS_GROUP, {}),
                               method={"meta": meta["method"],
                                       "tensors": groups.get(METHOD_GROUP, {})},
                               optimizer_tensors=groups.get(OPTIMIZER_GROUP, {}),
                               optimizer_scalars=meta.get("optimizer_scalars", {}),
                               optimizer_groups=meta["optimizer_groups"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"resume metadata {self.resume_dir / CHECKPOINT_META} is "
                            f"malformed (no {err})") from None


def _previous_version(final: Path) -> Path:
    return final.with_name(_TMP_PREFIX + final.name + ".old")


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing any folder there only once
    the new one is complete (a kill between the two renames is undone by
    :func:`recover_interrupted_swap`)."""
    if final.exists():
        old = _previous_version(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def recover_interrupted_swap(final: Path) -> None:
    """A kill between the two renames of :func:`swap_into_place` leaves ``final`` missing and
    its previous, complete version under a temporary name: put that version back. Only while
    no process writes the run (a reader of a live run would race the writer's rename)."""
    old = _previous_version(final)
    if not final.exists() and (old / CHECKPOINT_META).exists():
        os.replace(old, final)


def _write_folder(final: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Write a folder of safetensors groups + meta.json under a temporary name, then rename
    it over ``final``: readers see the old folder or the new one, never a mix."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        for group, tensors in groups.items():
            contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(contiguous, str(tmp / f"{group}.safetensors"))
            # mkdtemp and safetensors make owner-only modes: give what mkdir/open would,
            # so others sharing the storage can read checkpoints as they read run.json
            os.chmod(tmp / f"{group}.safetensors", 0o666 & ~_UMASK)
        atomic_write_json(tmp / CHECKPOINT_META, {**meta, "groups": sorted(groups)})
        os.chmod(tmp, 0o777 & ~_UMASK)
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------- JSON-lines logs
def _append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(lines)
        fh.flush()
        os.fsync(fh.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    """Every complete line; a torn or malformed last line (a killed run) is skipped."""
    if not path.exists():
        return []
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:  # we write ASCII only: these bytes are damage
        raise UserError(f"{path} is not a JSON-lines log (bytes that are not text at "
                        f"offset {err.start})") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.__class__.__name__})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly nested
            if number == len(lines):
                break  # the last line of a killed run
            raise UserError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def _scandir(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``; none when it is missing or unreadable."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


# json.dumps writes a float NaN as a bare NaN (not JSON): the bulk parser reads it as null
_NAN_VALUE, _NULL_VALUE = b": NaN", b": null"


def _jsonl_table(path: Path, data: bytes | None = None):
    """A JSON-lines log as a ``pyarrow.Table`` parsed in bulk, when the file is plainly what
    the writer writes: complete lines of flat objects, NaN the only non-JSON value, one type
    per field. None otherwise (a torn last line, a damaged line, mixed types, an infinity,
    a quote inside a string): read those row by row (:func:`_read_jsonl`). A field that is
    NaN in every row is float64."""
    import pyarrow as pa
    from pyarrow import json as pa_json

    if data is None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
    if not (data and data.endswith(b"\n") and b"Infinity" not in data
            and b'\\"' not in data and data.lstrip()[:1] == b"{"):
        return None
    try:
        table = pa_json.read_json(pa.BufferReader(data.replace(_NAN_VALUE, _NULL_VALUE)),
                                  read_options=pa_json.ReadOptions(block_size=1 << 24))
    except (pa.ArrowException, ValueError):
        return None
    if any(pa.types.is_nested(f.type) or pa.types.is_binary(f.type) for f in table.schema):
        return None
    for index, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(index, field.name,
                                     pa.nulls(len(table), pa.float64()))
    return table


def _read_jsonl_frame(path: Path):
    """A JSON-lines log as a ``pandas.DataFrame``: in bulk (:func:`_jsonl_table`) when it
    can be, else row by row through :func:`_read_jsonl`, so that damage is reported exactly
    as there. Both give the same frame. None when the file does not exist."""
    read = _read_jsonl_table_or_frame(path)
    return read.to_pandas() if hasattr(read, "to_pandas") else read  # a pyarrow.Table


def _read_jsonl_table_or_frame(path: Path):
    """``layers.jsonl`` as a ``pyarrow.Table`` when the bulk parser takes it, else as the
    row reader's ``pandas.DataFrame`` (naming damage as :func:`_read_jsonl` does); None when
    the file does not exist."""
    import pandas as pd

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.__class__.__name__})") from None
    table = _jsonl_table(path, data)
    return table if table is not None else pd.DataFrame.from_records(_read_jsonl(path))


def _read_parquet_table(path: Path):
    """A Parquet file as a ``pyarrow.Table``; a damaged or unreadable one is a ``UserError``
    naming it. ``FileNotFoundError`` passes (a part merged away: the reader looks again)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # pyarrow raises several kinds for a damaged file
        raise UserError(f"{path} is damaged or not Parquet "
                        f"({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})"
                        ) from None


def _read_parquet_frame(path: Path):
    """A Parquet file as a ``pandas.DataFrame``; a damaged or unreadable one is a
    ``UserError`` naming it."""
    try:
        return _read_parquet_table(path).to_pandas()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None


# ------------------------------------------------------------------------- statistics parts
_PART_PREFIX, _PART_SUFFIX = "part-", ".parquet"
_part_rows_cache: dict[tuple[str, int, int], int] = {}


@dataclasses.dataclass(frozen=True)
class _Part:
    """One Parquet part of a run's statistics: the rows of steps ``first`` to ``last``."""

    path: Path
    first: int
    last: int

    def rows(self) -> int:
        """How many rows it holds (its footer, read once per file version)."""
        import pyarrow.parquet as pq

        st = self.path.stat()
        key = (str(self.path), st.st_ino, st.st_mtime_ns)
        if key not in _part_rows_cache:
            try:
                _part_rows_cache[key] = pq.read_metadata(self.path).num_rows
            except Exception:  # damaged: never merged, the readers name it
                _part_rows_cache[key] = 1 << 62
        return _part_rows_cache[key]


def part_name(first: int, last: int) -> str:
    return f"{_PART_PREFIX}{first:09d}-{last:09d}{_PART_SUFFIX}"


def _list_parts(folder: Path) -> list[_Part]:
    """Every complete part in ``folder`` (temporary names and other files are not parts),
    by first step, the widest first."""
    parts = []
    for entry in _scandir(folder):
        name = entry.name
        if not (name.startswith(_PART_PREFIX) and name.endswith(_PART_SUFFIX)):
            continue
        first, sep, last = name[len(_PART_PREFIX):-len(_PART_SUFFIX)].partition("-")
        if sep and first.isdigit() and last.isdigit() and int(first) <= int(last):
            parts.append(_Part(Path(entry.path), int(first), int(last)))
    return sorted(parts, key=lambda p: (p.first, -p.last))


def _split_parts(folder: Path) -> tuple[list[_Part], list[_Part]]:
    """``(current, covered)``: the parts whose steps no other part's range contains, and
    the others (merged into a part that covers them, and not yet removed)."""
    current: list[_Part] = []
    covered: list[_Part] = []
    for part in _list_parts(folder):  # a covering part sorts before the parts it covers
        if current and current[-1].first <= part.first and part.last <= current[-1].last:
            covered.append(part)
        else:
            current.append(part)
    return current, covered


def _current_parts(folder: Path) -> list[_Part]:
    return _split_parts(folder)[0]


def _covered_parts(folder: Path) -> list[_Part]:
    return _split_parts(folder)[1]


def _read_part(part: _Part):
    return _read_parquet_table(part.path)


def _rows_table(rows: list[dict]):
    """Statistics rows (dicts) as a ``pyarrow.Table``: one column per field, in the order
    they first appear (null where a row lacks one)."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: [r.get(k) for r in rows] for k in names})


def _parquet_bytes(table) -> bytes:
    """``table`` as a Parquet file: zstd, floats split by byte before compression (a quarter
    smaller, and faster to read), dictionaries for the rest (parameter names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 16,
                   use_byte_stream_split=floats or False,
                   use_dictionary=[f.name for f in table.schema if f.name not in floats])
    return sink.getvalue().to_pybytes()


def _write_part(folder: Path, first: int, last: int, table) -> Path:
    """Write ``table`` as the part of steps ``first`` to ``last``, whole or not at all."""
    path = folder / part_name(first, last)
    atomic_write_bytes(path, _parquet_bytes(table))
    return path


def read_since(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """The rows of the complete lines of a JSON-lines log from byte ``offset`` on, and the
    offset after the last complete line (where the next read starts). A line still being
    written (no newline yet) waits for the next read; a damaged complete line is skipped (a
    full read, :meth:`RunDir.read_events`, names it). A missing file reads as nothing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    rows = []
    for line in chunk[:end].splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end


class LogTail:
    """Incremental reader of one JSON-lines log (``metrics.jsonl``, ``layers.jsonl``): each
    :meth:`read` adds the complete rows appended since the last one to :attr:`rows`, from a
    remembered byte offset (:func:`read_since`). A log rewritten shorter or replaced (as
    ``--resume`` does when it drops the steps after its checkpoint) is read again whole."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None
        self.rows: list[dict] = []

    def read(self) -> bool:
        """Read what was appended; True when :attr:`rows` changed."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        restarted = st.st_ino != self.inode or st.st_size < self.offset
        if restarted:
            self.offset, self.rows, self.inode = 0, [], st.st_ino
        if st.st_size == self.offset:
            return restarted
        rows, offset = read_since(self.path, self.offset)
        moved = offset != self.offset
        self.rows.extend(rows)
        self.offset = offset
        return moved or restarted


class _LayersTail(LogTail):
    """Incremental reader of a run's statistics: :class:`LogTail` of ``layers.jsonl``, then
    the rows of the Parquet parts as they appear (rows of steps after the last one read: a
    merged part adds only what the parts it covers did not); once the rows are compacted
    to ``layers.parquet``, that file's rows, once. A part read before that vanished without
    a part covering it (a resume dropped its steps) makes it read everything again.
    :attr:`rows` holds the log's rows, then the parts'; ``(inode, offset)`` changes
    whenever they do."""

    def __init__(self, path: Path, parquet: Path, parts_dir: Path):
        super().__init__(path)
        self.parquet, self.parts_dir = parquet, parts_dir
        self.log = LogTail(path)
        self.compacted = False
        self.part_rows: list[dict] = []
        self.ranges: list[tuple[int, int]] = []  # of the current parts at the last read
        self.last_step: int | None = None
        self.generation = 0

    def _restart(self) -> None:
        self.log = LogTail(self.path)
        self.part_rows, self.ranges, self.last_step = [], [], None
        self.compacted = False
        self.generation += 1

    def read(self) -> bool:
        if self.parquet.exists():
            if self.compacted:
                return False
            try:
                rows = _read_parquet_frame(self.parquet).to_dict("records")
            except UserError:  # damaged: the analysis pages name it
                return False
            self._restart()
            self.compacted, self.part_rows = True, rows
            return self._publish(True)
        if self.compacted:  # a resume turned the compacted file back into a log and parts
            self._restart()
        changed = self.log.read()
        try:
            changed = self._read_parts() or changed
        except UserError:  # a damaged part: the analysis pages name it
            pass
        return self._publish(changed)

    def _read_parts(self) -> bool:
        for _ in range(8):
            current = _current_parts(self.parts_dir)
            ranges = [(p.first, p.last) for p in current]
            if ranges == self.ranges:
                return False
            restarted = any(not any(f <= a and b <= g for f, g in ranges)
                            for a, b in self.ranges)
            if restarted:
                self.part_rows, self.ranges, self.last_step = [], [], None
                self.generation += 1
            last = self.last_step
            try:
                tables = [(p, _read_part(p)) for p in current if last is None or p.last > last]
            except FileNotFoundError:  # merged meanwhile: look again
                continue
            before = len(self.part_rows)
            for _part, table in tables:
                rows = table.to_pylist()
                self.part_rows.extend(r for r in rows if last is None or r["step"] > last)
            if tables:
                self.last_step = max(p.last for p, _ in tables)
            self.ranges = ranges
            return restarted or len(self.part_rows) != before  # a merge alone adds nothing
        return False

    def _publish(self, changed: bool) -> bool:
        if changed:
            self.rows = self.log.rows + self.part_rows
        self.inode = (self.log.inode, self.generation)
        self.offset = self.log.offset + len(self.part_rows)
        return changed


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    if path.exists():
        kept = [r for r in _read_jsonl(path) if int(r.get("step", 0)) <= keep_through_step]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


# ------------------------------------------------------------------------- checkpoint reads
def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CHECKPOINT_META).exists() and path.parent.name == CHECKPOINTS


def checkpoint_meta(path: str | Path) -> dict:
    return read_json(Path(path) / CHECKPOINT_META, "checkpoint metadata")


def checkpoint_run(path: str | Path) -> RunDir:
    """The run a checkpoint folder belongs to (``RUN/checkpoints/step-N`` -> ``RUN``)."""
    return RunDir(Path(path).resolve().parent.parent)


def group_file(path: str | Path, group: str) -> Path:
    return Path(path) / f"{group}.safetensors"


def tensor_names(file: str | Path, what: str = "checkpoint file") -> list[str]:
    """Names of the tensors in a safetensors file (its header only); ``what`` names the file
    in the error for a missing or damaged one."""
    file = Path(file)
    if not file.exists():
        raise UserError(f"{what} {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as fh:
            return list(fh.keys())
    except Exception as err:  # safetensors raises several kinds for a damaged file
        raise UserError(f"{what} {file} is damaged or not safetensors "
                        f"({str(err).splitlines()[0][:120]})") from None


def group_keys(path: str | Path, group: str) -> list[str]:
    """Names of the tensors of one group of a checkpoint (reads the file's header only)."""
    return tensor_names(group_file(path, group))


def group_shape(path: str | Path, group: str, name: str) -> tuple[int, ...]:
    """The shape of one tensor of a checkpoint group, without reading it."""
    file = group_file(path, group)
    try:
        with safe_open(str(file), framework="pt") as fh:
            return tuple(fh.get_slice(name).get_shape())
    except Exception as err:
        raise UserError(f"checkpoint file {file} is damaged or not safetensors "
                        f"({str(err).splitlines()[0][:120]})") from None


def read_group(path: str | Path, group: str) -> dict[str, torch.Tensor]:
    """All tensors of one group of a checkpoint; a missing or corrupt file is a UserError."""
    return dict(iter_group(path, group))


def iter_group(path: str | Path, group: str, names: Iterable[str] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a checkpoint group one at a time (memory-mapped), optionally by name."""
    file = group_file(path, group)
    if not file.exists():
        raise UserError(f"checkpoint file {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as fh:
            wanted = list(fh.keys()) if names is None else list(names)
            for name in wanted:
                yield name, fh.get_tensor(name)
    except UserError:
        raise
    except Exception as err:  # safetensors raises several kinds for a damaged file
        raise UserError(f"checkpoint file {file} is damaged or not safetensors "
                        f"({str(err).splitlines()[0][:120]})") from None


# ------------------------------------------------------------------------- model references
REPO_ROOT = Path(__file__).resolve().parents[1]
"""The project's folder: a base model inside it (the bundled one) is named relative to it."""


def model_reference(model_dir: str | Path, run_dir: str | Path) -> dict:
    """How run.json names its base model: absolute (``path``), relative to the run folder
    (``relative``: a run copied together with its base model still finds it) and, for a model
    inside the project, relative to the project (``repo``: a fresh clone or a moved checkout
    finds it, wherever the run is). Readers try them in that order (:func:`model_candidates`)."""
    model_dir = Path(model_dir).resolve()
    ref = {"path": str(model_dir),
           "relative": os.path.relpath(model_dir, Path(run_dir).resolve())}
    if model_dir.is_relative_to(REPO_ROOT):
        ref["repo"] = model_dir.relative_to(REPO_ROOT).as_posix()
    return ref


def model_candidates(ref: Mapping, run_dir: str | Path) -> list[Path]:
    """Where run.json's model reference ``ref`` may be, in the order to try: relative to the
    run, relative to the project, the absolute path (runs made before ``repo`` existed, or on
    another machine, have only some of them)."""
    candidates = []
    if isinstance(ref.get("relative"), str) and ref["relative"]:
        candidates.append((Path(run_dir) / ref["relative"]).resolve())
    if isinstance(ref.get("repo"), str) and ref["repo"]:
        candidates.append((REPO_ROOT / ref["repo"]).resolve())
    if isinstance(ref.get("path"), str) and ref["path"]:
        candidates.append(Path(ref["path"]))
    return list(dict.fromkeys(candidates))


def resolve_model_reference(ref: object, run_dir: str | Path) -> Path | None:
    """The base model folder run.json's ``model`` entry names (the first candidate holding a
    ``config.json``), or None when it is nowhere to be found or the entry is not one."""
    if not isinstance(ref, Mapping):
        return None
    for candidate in model_candidates(ref, run_dir):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def base_model_dir(run: RunDir) -> Path:
    """The base model directory a run was trained from (see :func:`model_reference`)."""
    info = run.read_run()
    ref = info.get("model")
    if not isinstance(ref, dict) or not ("path" in ref or "relative" in ref or "repo" in ref):
        raise UserError(f"{run.run_file} does not name the run's base model ('model' entry)")
    candidates = model_candidates(ref, run.path)
    found = resolve_model_reference(ref, run.path)
    if found is not None:
        return found
    raise UserError(f"the base model of run {run.path} is not at "
                    f"{' or '.join(str(c) for c in candidates)}; restore it there to load "
                    "this run's checkpoints")
