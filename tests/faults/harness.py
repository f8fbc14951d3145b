"""Shared machinery of the fault-injection suite: start real training processes cheaply, kill
them, read back what they left, and record what was tried for RELIABILITY.md.

Starting ``python -m spider.train`` costs seconds of imports before the first step, and the
suite kills training dozens of times. So training processes are forked from a warm fork
server (``forkserver.py``, one per test process) that has imported torch, transformers and
spider once; every child is still a separate process that runs the command-line entry point
``spider.train.main`` from its start (argument parsing, model load, data, training), and a
SIGKILL to it is a real one.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "SPIDER_FAULTS_RESULTS"
"""When set, tests append one JSON line per fault tried to the file it names (see
``scripts/make_reliability_report.py``)."""

# The tiny run of the issue: 6 steps, evaluation at 0, 3, 6, checkpoints at 2, 4, 6.
TINY_STEPS = 6
TINY = ["--method", "spider", "--steps", str(TINY_STEPS), "--eval-every", "3",
        "--eval-limit", "4", "--batch-size", "4", "--train-size", "32", "--save-every", "2",
        "--log-every", "1", "--device", "cpu"]


# ------------------------------------------------------------------------- recording
def record(fault: str, category: str, tries: int, expected: str, problems: list[str],
           data_lost: int, **details) -> None:
    """Append one line about a fault tried to the results file (when one is named).

    ``expected`` says what the test checked happened; ``problems`` is what it found wrong
    instead (empty: the outcome is ``expected``). ``data_lost`` is what the test measured:
    complete checkpoints, tensors, events or rows that were gone or different afterwards.
    Written before the test asserts, so a failing test still leaves its record.
    """
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    outcome = expected if not problems else (
        f"NOT AS EXPECTED ({len(problems)} problems), e.g.: {problems[0][:300]}")
    line = json.dumps({"kind": "fault", "test": os.environ.get("PYTEST_CURRENT_TEST", "")
                       .rsplit(" ", 1)[0], "fault": fault, "category": category,
                       "tries": tries, "outcome": outcome, "ok": not problems,
                       "data_lost": data_lost, **details}, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # xdist workers append to the same file
        handle.write(line)
        fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------- training children
class _ForkServer:
    """``tests/faults/forkserver.py`` in a process of its own: it imports what training
    needs once, then forks one child per run on request (JSON lines on its stdin/stdout)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py"))], cwd=ROOT,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._read()
        if ready.get("ready") is not True:
            raise RuntimeError(f"fork server did not start: {ready}")

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server ended (exit {self.process.wait()})")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.process.stdin.close()  # the server ends at the end of its input
            self.process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


_SERVER: _ForkServer | None = None


def fork_server() -> _ForkServer:
    """This process's fork server (started on first use; ended when the process ends)."""
    global _SERVER
    if _SERVER is None or _SERVER.process.poll() is not None:
        _SERVER = _ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


def children_cpu_seconds() -> float:
    """CPU seconds spent by the training children of this process's fork server so far."""
    return float(fork_server().ask(op="cpu")["children_cpu_s"])


class Trainer:
    """One training child: ``spider.train.main(argv)`` in a process of its own."""

    def __init__(self, argv: list[str], log: Path, faults: dict | None = None):
        self.argv = argv
        self.log = Path(log)
        self.server = fork_server()
        self.started = time.monotonic()
        self.pid = self.server.ask(op="start", argv=[str(a) for a in argv], log=str(log),
                                   faults=faults or {})["pid"]
        self.exitcode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the child has ended, else None (never blocks)."""
        if self.exitcode is None:
            self.exitcode = self.server.ask(op="poll", pid=self.pid)["code"]
        return self.exitcode

    def alive(self) -> bool:
        return self.poll() is None

    def kill(self) -> bool:
        """SIGKILL; True when the process was still running and died of it."""
        if self.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.wait(60) == -signal.SIGKILL

    def wait(self, timeout: float = 300) -> int:
        """Wait for the child's end: its exit code (negative: the signal that ended it)."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(60)
                raise TimeoutError(f"training child {self.argv} still running after {timeout}s")
            time.sleep(0.01)
        return self.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(condition: Callable[[], bool], timeout: float, every: float = 0.002) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


# ------------------------------------------------------------------------- comparing runs
def same_number(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ------------------------------------------------------------------------- reading runs back
VOLATILE = frozenset({"seconds"})
"""The fields of a log row that differ between two identical runs: the train event's wall
time. Exact keys only: any other field (``theta0_norm`` included) is compared."""


def _stable(row: dict) -> dict:
    """A log row without what differs between two identical runs (timings)."""
    return {k: v for k, v in row.items() if k not in VOLATILE}


@dataclasses.dataclass
class RunContents:
    """What a run directory holds, read back through the analysis layer and the reader of
    spider.rundir: every complete checkpoint's tensors, every event and statistics row."""

    path: Path
    status: str
    checkpoints: dict  # step -> group -> name -> tensor
    train: dict  # step -> stable fields of the train event
    evals: dict  # (step, split, metric) -> stable fields of the eval event
    layers: dict  # (step, param) -> stable fields of the row
    duplicates: list  # keys logged more than once
    resume_step: int | None


def read_back(path: Path) -> RunContents:
    """Read a run as a person would (``analysis.load_run``: run.json, metrics, train curve,
    layers; ``list_runs`` of its folder), and every complete checkpoint tensor by tensor.
    Any error reading is raised: a test calls this where the run must read back whole."""
    import analysis
    from spider.rundir import RunDir, read_group

    run = analysis.load_run(path)
    status = run.status
    assert list(run.metrics.columns) and list(run.train.columns)  # frames build
    layers_frame = run.layers
    listed = analysis.list_runs(path)
    assert len(listed) == 1, listed
    directory = RunDir(path)
    checkpoints = {}
    for step in run.steps:
        meta = json.loads((directory.checkpoint_dir(step) / "meta.json").read_text())
        checkpoints[step] = {g: read_group(directory.checkpoint_dir(step), g)
                             for g in meta["groups"]}
    train, evals, layers, duplicates, layer_rows = {}, {}, {}, [], 0
    for event in directory.read_events():
        if event.get("event") == "train":
            key, table = event["step"], train
        else:
            key, table = (event["step"], event["split"], event["metric"]), evals
        if key in table:
            duplicates.append(key)
        table[key] = _stable(event)
    for row in directory.read_layers():
        layer_rows += 1
        key = (row["step"], row["param"])
        if key in layers:
            duplicates.append(key)
        layers[key] = _stable(row)
    assert len(layers_frame) == layer_rows  # the frame holds every row the log holds
    resume = directory.read_resume()
    return RunContents(path=path, status=status, checkpoints=checkpoints, train=train,
                       evals=evals, layers=layers, duplicates=duplicates,
                       resume_step=None if resume is None else int(resume[0]["step"]))


def differences(found: RunContents, reference: RunContents) -> list[str]:
    """Everything ``found`` holds that differs from ``reference`` (the same run, never
    interrupted): a checkpoint tensor, an event or a statistics row. Missing later items are
    not differences (a killed run has not got there yet)."""
    out = [f"logged twice: {key}" for key in found.duplicates]
    for step, groups in found.checkpoints.items():
        if step not in reference.checkpoints:
            out.append(f"checkpoint step {step} is not in the reference")
            continue
        for group, tensors in groups.items():
            expected = reference.checkpoints[step].get(group, {})
            if tensors.keys() != expected.keys():
                out.append(f"checkpoint {step}/{group}: other tensor names")
                continue
            out += [f"checkpoint {step}/{group}/{name} differs" for name, t in tensors.items()
                    if not torch_equal(t, expected[name])]
    for table, name in ((found.train, "train"), (found.evals, "eval"), (found.layers, "layers")):
        expected = getattr(reference, name if name != "eval" else "evals")
        for key, row in table.items():
            if key not in expected:
                out.append(f"{name} {key} is not in the reference")
            elif not same_row(row, expected[key]):
                out.append(f"{name} {key} differs: {row} vs {expected[key]}")
    return out


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def same_row(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same_number(a[k], b[k]) for k in a)


def missing(found: RunContents, reference: RunContents) -> list[str]:
    """What the reference holds that ``found`` lacks (a finished run must lack nothing)."""
    out = [f"checkpoint step {s}" for s in reference.checkpoints if s not in found.checkpoints]
    out += [f"train step {k}" for k in reference.train if k not in found.train]
    out += [f"eval {k}" for k in reference.evals if k not in found.evals]
    out += [f"layers {k}" for k in reference.layers if k not in found.layers]
    return out


def snapshot(*folders: Path) -> dict[str, str]:
    """A digest of every file under ``folders`` (path -> blake2b of its bytes), to tell
    afterwards what an operation that must not write changed (:func:`changed`)."""
    import hashlib

    out = {}
    for folder in folders:
        files = [Path(folder)] if Path(folder).is_file() else Path(folder).rglob("*")
        for file in files:
            if file.is_file():
                out[str(file)] = hashlib.blake2b(file.read_bytes(), digest_size=16).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files that differ between two snapshots: changed, gone or new."""
    return sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))


def leftovers(path: Path) -> list[str]:
    """Temporary files and folders of interrupted writes still in the run directory."""
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob(".tmp-*"))
