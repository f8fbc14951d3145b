"""The run directory (DESIGN.md §4): the only module that knows its layout.

::

    RUN/run.json                       schema_version, config, method, model, seed, versions,
                                       status, pid, timestamps (rewritten atomically)
    RUN/metrics.jsonl                  one JSON event per line, appended (a torn last line from a
                                       killed run is ignored by readers)
    RUN/checkpoints/step-NNNNNN/       one folder per checkpoint, made under a temporary name
        meta.json                      and renamed into place whole, so a reader never sees a
        weights.safetensors            half-written checkpoint; safetensors only, never pickle
        method.safetensors ...
    RUN/resume/                        the latest saved step's full state (weights, method,
                                       optimizer) for an exact --resume; replaced whole
    RUN/layers.jsonl                   per (step, parameter) statistics, appended

Every whole-file write goes to a temporary name in the same folder, is flushed to disk, then
renamed over the target: a run killed at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spider.errors import UserError

SCHEMA_VERSION = 1
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
# Checkpoint group with the model's trained tensors, named as in the base model's state_dict
# and holding their effective values at that step (LoRA merged in): base model + this group
# = the fine-tuned model.
WEIGHTS_GROUP = "weights"


# ------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either old or new, never torn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


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
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_name(step)

    # -- run.json
    def read_run(self) -> dict:
        return read_json(self.run_file, "run file")

    def write_run(self, info: dict) -> None:
        atomic_write_json(self.run_file, {"schema_version": SCHEMA_VERSION, **info})

    # -- metrics.jsonl (events) and layers.jsonl (per step and parameter statistics)
    @property
    def layers_file(self) -> Path:
        return self.path / LAYERS_FILE

    def append_events(self, events: Iterable[dict]) -> None:
        """Append events, one JSON line each, flushed to disk before returning."""
        _append_jsonl(self.metrics_file, events)

    def read_events(self) -> list[dict]:
        """Every complete event; a torn last line (a killed run) is skipped."""
        return _read_jsonl(self.metrics_file)

    def truncate_events(self, keep_through_step: int) -> None:
        """Keep only events up to ``keep_through_step`` (a resumed run rewrites the rest)."""
        _truncate_jsonl(self.metrics_file, keep_through_step)

    def append_layers(self, rows: Iterable[dict]) -> None:
        _append_jsonl(self.layers_file, rows)

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
        return _write_folder(self.checkpoint_dir(step), groups, {"step": step, **meta})

    # -- resume state: everything an exact resume needs, for the latest saved step only
    @property
    def resume_dir(self) -> Path:
        return self.path / RESUME

    def write_resume(self, step: int, groups: dict[str, dict[str, torch.Tensor]],
                     meta: dict) -> None:
        _write_folder(self.resume_dir, groups, {"step": step, **meta})

    def remove_resume(self) -> None:
        shutil.rmtree(self.resume_dir, ignore_errors=True)

    def read_resume(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
        """``(meta, groups)`` of the resume state, or None when the run never saved one."""
        if not (self.resume_dir / CHECKPOINT_META).exists():
            return None
        meta = read_json(self.resume_dir / CHECKPOINT_META, "resume metadata")
        return meta, {g: read_group(self.resume_dir, g) for g in meta.get("groups", [])}

    def remove_checkpoints_after(self, step: int) -> None:
        for s in self.checkpoint_steps():
            if s > step:
                shutil.rmtree(self.checkpoint_dir(s), ignore_errors=True)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing any folder there only once
    the new one is complete."""
    if final.exists():
        old = final.with_name(_TMP_PREFIX + final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_folder(final: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Write a folder of safetensors groups + meta.json under a temporary name, then rename
    it over ``final``: readers see the old folder or the new one, never a mix."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        for group, tensors in groups.items():
            contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(contiguous, str(tmp / f"{group}.safetensors"))
        atomic_write_json(tmp / CHECKPOINT_META, {**meta, "groups": sorted(groups)})
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
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line of a killed run
            raise UserError(f"{path} line {number} is not valid JSON") from None
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
