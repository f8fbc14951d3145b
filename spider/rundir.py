"""The run directory (ARCHITECTURE.md, "The run directory"): the one module that knows its format.

Layout::

    RUN/run.json                       schema_version, config, method, model, seed, versions,
                                       status, the process (pid, its start time, host),
                                       heartbeat, progress, summary (rewritten atomically)
    RUN/metrics.jsonl                  one event per line (TrainEvent, EvalEvent), appended;
                                       a torn last line from a killed run is ignored
    RUN/layers.jsonl                   per (step, parameter) statistics (StatisticsRow)
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
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spider.errors import UserError

SCHEMA_VERSION = 2
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LAYERS_FILE = "layers.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_META = "meta.json"
STEP_PREFIX = "step-"
RESUME = "resume"
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

HEARTBEAT_INTERVAL_S = 10.0
HEARTBEAT_STALE_INTERVALS = 6  # a heartbeat older than this many intervals is stale


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


def _stat_columns() -> tuple[str, ...]:
    from spider.methods.base import STAT_COLUMNS  # the methods define what they report

    return STAT_COLUMNS


STATISTICS_COLUMNS = ("step", "param", "numel", *_stat_columns(), "update_norm",
                      "update_rel_norm", "theta0_norm")
"""Columns of a ``layers.jsonl`` row (:class:`StatisticsRow`), in order."""


@dataclasses.dataclass(frozen=True)
class StatisticsRow:
    """Per-parameter statistics at one step: the method's ``STAT_COLUMNS`` and update norms."""

    step: int
    param: str
    numel: int
    stats: Mapping[str, float]
    update_norm: float
    theta0_norm: float

    def to_json(self) -> dict:
        row: dict[str, Any] = {"step": self.step, "param": self.param, "numel": self.numel}
        row.update({c: float(self.stats.get(c, math.nan)) for c in _stat_columns()})
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
def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``
    field 22), or None where there is no such process, it has exited (a zombie not yet
    reaped by its parent), or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs on this machine and, when ``start_time`` is given, is still the
    same process (a reused pid has another start time)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    now = process_start_time(pid)
    if now is not None:
        return start_time is None or now == start_time
    if Path("/proc/self/stat").exists():
        return False  # /proc works here and has no such (living) process
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_record(pid: int | None = None) -> dict:
    """What run.json records about the process that trains: pid, its start time, host."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "pid_start_time": process_start_time(pid),
            "hostname": socket.gethostname(), "boot_id": _boot_id()}


def _process_alive(info: Mapping) -> bool:
    """Whether the process run.json names still runs (asked on the host it ran on)."""
    boot = info.get("boot_id")
    if boot and _boot_id() and boot != _boot_id():
        return False  # the machine rebooted since
    return process_alive(info.get("pid"), info.get("pid_start_time"))


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
    host = info.get("hostname")
    if host is None or host == socket.gethostname():
        if "pid" not in info:
            return RUNNING  # nothing to check against
        return RUNNING if _process_alive(info) else STOPPED_UNEXPECTEDLY
    beat = info.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return RUNNING  # another host, no heartbeat: nothing to tell it by
    interval = float(info.get("heartbeat_interval_s") or HEARTBEAT_INTERVAL_S)
    age = (time.time() if now is None else now) - beat
    return STOPPED_UNEXPECTEDLY if age > HEARTBEAT_STALE_INTERVALS * interval else RUNNING


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    self._write()
            except OSError:
                pass  # a full disk: the main thread finds out at its next write

    def heartbeat(self) -> _Heartbeat:
        """Context manager: keep the heartbeat going while inside."""
        return _Heartbeat(self)


class _Heartbeat:
    def __init__(self, writer: RunInfoWriter):
        self.writer = writer

    def __enter__(self) -> RunInfoWriter:
        w = self.writer
        if w.enabled and w._thread is None:
            w._stop.clear()
            w._thread = threading.Thread(target=w._beat, name="run-heartbeat", daemon=True)
            w._thread.start()
        return w

    def __exit__(self, *exc) -> None:
        w = self.writer
        if w._thread is not None:
            w._stop.set()
            w._thread.join()
            w._thread = None


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
        known = {RUN_FILE, METRICS_FILE, LAYERS_FILE, CHECKPOINTS, RESUME}
        return (effective_status(info) in (FAILED, CANCELLED, STOPPED_UNEXPECTEDLY)
                and not progress.get("step") and not self.checkpoint_steps()
                and not (self.resume_dir / CHECKPOINT_META).exists()
                and not any(e.get("event") == "train" for e in self.read_events())
                and all(p.name in known or p.name.startswith(_TMP_PREFIX)
                        for p in self.path.iterdir()))

    def clear(self) -> None:
        """Remove what a run wrote (only the files of the format; used for a run that never
        trained, before it starts again in place)."""
        for name in (METRICS_FILE, LAYERS_FILE, RUN_FILE):
            (self.path / name).unlink(missing_ok=True)
        for name in (CHECKPOINTS, RESUME):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for stale in self.path.glob(_TMP_PREFIX + "*"):
            (shutil.rmtree if stale.is_dir() else os.unlink)(stale)

    def remove_temporaries(self) -> None:
        """Remove what interrupted writes left behind (``.tmp-*`` files and folders in the run
        folder and in ``checkpoints/``: a checkpoint or resume state cut short by a kill).
        Only while no process writes this run: a resume does it before writing."""
        for folder in (self.path, self.checkpoints_dir):
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
        _append_jsonl(self.layers_file,
                      (r.to_json() if isinstance(r, StatisticsRow) else r for r in rows))

    def read_layers(self) -> list[dict]:
        return _read_jsonl(self.layers_file)

    def truncate_layers(self, keep_through_step: int) -> None:
        _truncate_jsonl(self.layers_file, keep_through_step)

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
def model_reference(model_dir: str | Path, run_dir: str | Path) -> dict:
    """How run.json names its base model: absolute, and relative to the run folder so a run
    copied together with its base model (the bundled samples) still finds it."""
    model_dir = Path(model_dir).resolve()
    return {"path": str(model_dir),
            "relative": os.path.relpath(model_dir, Path(run_dir).resolve())}


def base_model_dir(run: RunDir) -> Path:
    """The base model directory a run was trained from (see :func:`model_reference`)."""
    info = run.read_run()
    ref = info.get("model")
    if not isinstance(ref, dict) or not ("path" in ref or "relative" in ref):
        raise UserError(f"{run.run_file} does not name the run's base model ('model' entry)")
    candidates = []
    if ref.get("relative"):
        candidates.append((run.path / ref["relative"]).resolve())
    if ref.get("path"):
        candidates.append(Path(ref["path"]))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"the base model of run {run.path} is not at "
                    f"{' or '.join(str(c) for c in candidates)}; restore it there to load "
                    "this run's checkpoints")
