"""Fine-tuning jobs of the Train page: queue, launch, cancel, resume, liveness (no Streamlit).

Everything lives on disk under the user's runs root, so a reload, a second tab, a restarted
app or a shell see the same jobs::

    ROOT/NAME/                     the run directory the runner writes (``spider.rundir``);
        train.log                  the runner's stdout + stderr (moved in once run.json exists)
    ROOT/.queue/
        supervisor.lock            held (fcntl.flock) by the one supervisor working the queue
        names/NAME                 a run name taken (created with O_EXCL: no two jobs share one)
        pending/NAME.json          a queued job; created whole by link() (O_EXCL semantics)
        active/NAME.json           a claimed job: pid and process start time of its runner
        ended/NAME.json            how it ended: exit code, the last ``error:`` line
        cancel/NAME                a cancel request (time it was asked), for the kill deadline
        logs/NAME.log              the log until the runner has written NAME/run.json
        launches/FIRST.json        the run names one Launch queued (shown together)
        timings/timing-*/          short timing runs the page made for an estimate

A job of kind ``attribute`` (:func:`queue_attribution`) runs ``python -m analysis.attribute``
on a finished run through the same queue; it has no run directory of its own, so its log
stays in ``logs/`` and :func:`attribution_jobs` (not :func:`jobs_overview`) lists it.

Why these choices:

* **Claiming** a queued job is ``os.rename(pending/NAME.json, active/NAME.json)``: atomic, so
  of two claimers (two supervisors, two processes) exactly one succeeds; the other gets
  ``FileNotFoundError`` and moves on. A job is therefore started at most once.
* **One after another, with no browser open**: :func:`launch` queues the jobs and starts a
  *supervisor* (``python -m app.jobs supervise --root ROOT``) in its own session. It takes the
  exclusive lock (a second one exits at once), starts the oldest pending job, waits for it,
  then the next, and exits when the queue is empty (re-checking after it lets the lock go, so
  a job queued in that instant is not stranded). The page also restarts a supervisor when jobs
  are pending and nobody holds the lock (after a crash or a reboot).
* **Processes**: the runner (``python -m spider.train``) is started with an argument list (no
  shell), ``start_new_session=True`` (its own process group, untouched by the app's Ctrl-C) and
  stdout/stderr to a log file, never a pipe that could fill up and block it. The runner refuses
  a non-empty ``--output-dir``, so a new run's log is opened under ``.queue/logs`` and renamed
  into the run directory (same file system: the open descriptor keeps writing) as soon as the
  runner has written ``run.json``.
* **Cancel** sends SIGTERM to the process group (the runner saves a checkpoint and ends
  ``cancelled``), and SIGKILL to the group once :data:`GRACE_S` have passed without it ending
  (enforced by the supervisor, or by :func:`cancel` itself with ``wait=True``).
* **Liveness**: a process is the job's only while its pid exists *and* its start time (from
  ``/proc``) is the one recorded when it was started; a dead or reused pid makes a run that
  says ``running`` show as "stopped unexpectedly" (:func:`run_status`), which offers
  **Resume** (``--resume``) like a cancelled run.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from spider import rundir
from spider.errors import CliParser, UserError, cli_main
from spider.liveness import process_alive, process_start_time

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUEUE = ".queue"
LOG_NAME = "train.log"
GRACE_S = 30.0
"""Seconds a cancelled runner gets to save and end before its process group is killed."""
POLL_S = 0.2
"""How often the supervisor looks at its job (log to move, cancel deadline, exit)."""

ATTRIBUTE = "attribute"
"""The job kind that explains a finished run (:func:`queue_attribution`)."""
ATTRIBUTE_BY = ("component", "layer", "module")
"""The groupings of ``python -m analysis.attribute --by``."""
STOPPED_UNEXPECTEDLY = rundir.STOPPED_UNEXPECTEDLY
RESUMABLE = ("cancelled", STOPPED_UNEXPECTEDLY)
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
NAME_MAX = 100
"""Longest run name a user may ask for (a ``-N`` suffix may be added to make it unique)."""


# ---------------------------------------------------------------------------------- layout
def queue_dir(root: str | os.PathLike) -> Path:
    return Path(root) / QUEUE


def _sub(root: str | os.PathLike, part: str) -> Path:
    path = queue_dir(root) / part
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_file(root: str | os.PathLike, name: str) -> Path:
    """Where the runner's output of run ``name`` is now (inside the run once it exists)."""
    check_run_name(name)
    inside = Path(root) / name / LOG_NAME
    return inside if inside.exists() else queue_dir(root) / "logs" / f"{name}.log"


@dataclasses.dataclass
class Job:
    """One queued run of ``python -m spider.train``: its run name and runner flags."""

    name: str
    args: list[str]
    resume: bool = False
    queued: float = 0.0
    order: int = 0  # time.time_ns() when queued: the queue runs in this order
    kind: str = "train"  # or ATTRIBUTE: ``python -m analysis.attribute TARGET ARGS``
    target: str = ""  # the finished run an attribution job explains

    def __post_init__(self):
        check_run_name(self.name)

    def run_dir(self, root: str | os.PathLike) -> Path:
        return Path(root) / self.name

    def command(self, root: str | os.PathLike) -> list[str]:
        """The runner's argument list (never a shell string)."""
        if self.kind == ATTRIBUTE:
            return [sys.executable, "-m", "analysis.attribute", self.target, *self.args]
        cmd = [sys.executable, "-m", "spider.train", "--output-dir",
               str(self.run_dir(root).resolve())]
        return cmd + (["--resume"] if self.resume else list(self.args))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Job:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def _write_new(path: Path, data: dict) -> bool:
    """Create ``path`` whole with ``data``, only if it does not exist yet (False if it does).

    Written to a temporary file and hard-linked into place: ``link`` fails when the target
    exists, so this is O_EXCL with the content already complete for any reader.
    """
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{time.time_ns()}")
    tmp.write_text(json.dumps(data, indent=1))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """A job record, or None when it is gone (claimed, ended) or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------- naming
def valid_run_name(name: object) -> bool:
    """Whether ``name`` is a plain folder name (see :func:`check_run_name`)."""
    return isinstance(name, str) and _NAME_OK.match(name) is not None


def check_run_name(name: str) -> None:
    """A run name is a plain folder name: letters, digits, '.', '_' and '-' (no path).

    Every function here that takes a run name checks it first: a name is joined to the
    queue's folders, so ``../x`` would reach files outside them."""
    if not valid_run_name(name):
        raise UserError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-' "
                        "(a folder name, not a path)")


def _records(folder: Path) -> list[dict]:
    """The job records of a queue folder, those whose name is not their file's left out."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        record = _read(path)
        if record and valid_run_name(record.get("name")) and path.stem == record["name"]:
            found.append(record)
    return found


def reserve_name(root: str | os.PathLike, wanted: str) -> str:
    """Take a run name under ``root`` that no run and no other job has: ``wanted``, or
    ``wanted-2``, ``wanted-3``, ... (taken atomically, so two tabs never get the same)."""
    check_run_name(wanted)
    if len(wanted) > NAME_MAX:
        raise UserError(f"run name {wanted[:20]}... is {len(wanted)} characters long; "
                        f"at most {NAME_MAX}")
    names = _sub(root, "names")
    for n in range(1, 1000):
        name = wanted if n == 1 else f"{wanted}-{n}"
        if (Path(root) / name).exists():
            continue
        try:
            os.close(os.open(names / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return name
        except FileExistsError:
            continue
    raise UserError(f"no free run name like {wanted!r} under {root}")


def default_name(method: str, data: str, when: float | None = None) -> str:
    """``METHOD-DATA-YYYYmmdd-HHMMSS``: readable in tables, sorted by time."""
    stem = Path(data.removeprefix("builtin:")).stem if not data.startswith("builtin:") else (
        data.removeprefix("builtin:").replace(":", "-"))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "data"
    return f"{method}-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"


# ---------------------------------------------------------------------------------- the queue
def enqueue(root: str | os.PathLike, name: str, args: Sequence[str], resume: bool = False
            ) -> Job:
    """Queue one run (``name`` already reserved, or an existing run for ``resume``)."""
    check_run_name(name)
    now = time.time_ns()
    job = Job(name=name, args=[str(a) for a in args], resume=resume, queued=now / 1e9,
              order=now)
    if not _write_new(_sub(root, "pending") / f"{name}.json", job.to_json()):
        raise UserError(f"run {name} is already queued")
    (queue_dir(root) / "ended" / f"{name}.json").unlink(missing_ok=True)
    return job


def pending_jobs(root: str | os.PathLike) -> list[Job]:
    """Queued jobs, in the order they will run."""
    jobs = _records(queue_dir(root) / "pending")
    return sorted((Job.from_json(j) for j in jobs), key=lambda j: (j.order, j.name))


def claim_next(root: str | os.PathLike) -> Job | None:
    """Take the oldest queued job for this process, or None when the queue is empty.

    The claim is the rename into ``active/``: of several claimers exactly one wins each job.
    """
    active = _sub(root, "active")
    for job in pending_jobs(root):
        try:
            os.rename(queue_dir(root) / "pending" / f"{job.name}.json", active / f"{job.name}.json")
        except FileNotFoundError:
            continue  # another claimer took it first (or it was cancelled)
        return job
    return None


def active_records(root: str | os.PathLike) -> list[dict]:
    """Claimed jobs (with ``pid`` / ``pid_start`` once their process exists)."""
    return _records(queue_dir(root) / "active")


def ended_record(root: str | os.PathLike, name: str) -> dict | None:
    check_run_name(name)
    return _read(queue_dir(root) / "ended" / f"{name}.json")


# ---------------------------------------------------------------------------------- processes
def _signal_group(pid: int, sig: int) -> bool:
    """Signal the runner's process group (it leads its own session, so its pgid is its pid);
    a run started from a shell that does not lead a group gets the signal itself."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def start_job(root: str | os.PathLike, job: Job) -> subprocess.Popen:
    """Start the runner of a claimed job; record its pid and start time in ``active/``."""
    run_dir = job.run_dir(root)
    if job.resume and run_dir.is_dir():
        log_path = run_dir / LOG_NAME
    else:
        log_path = _sub(root, "logs") / f"{job.name}.log"
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(job.command(root))}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(job.command(root), cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=env)
    record = {**job.to_json(), "pid": proc.pid, "pid_start": process_start_time(proc.pid),
              "host": socket.gethostname(), "started": time.time(), "log": str(log_path)}
    rundir.atomic_write_json(queue_dir(root) / "active" / f"{job.name}.json", record)
    return proc


def _move_log_into_run(root: str | os.PathLike, record: dict) -> dict:
    """Once the runner has written run.json, move its log into the run directory."""
    log_path = Path(record.get("log", ""))
    run_dir = Path(root) / record["name"]
    target = run_dir / LOG_NAME
    if log_path != target and log_path.exists() and (run_dir / rundir.RUN_FILE).exists():
        if target.exists():  # an earlier attempt's log: keep both, oldest first
            with open(target, "ab") as out:
                out.write(log_path.read_bytes())
            log_path.unlink()
        else:
            os.rename(log_path, target)  # the runner's open descriptor follows the file
        record = {**record, "log": str(target)}
        rundir.atomic_write_json(queue_dir(root) / "active" / f"{record['name']}.json", record)
    return record


def _finish(root: str | os.PathLike, record: dict, returncode: int | None) -> None:
    """Move an active job to ``ended/`` with its exit code and last error line."""
    name = record["name"]
    record = _move_log_into_run(root, record)
    error = last_error_line(Path(record.get("log", "")))
    ended = {**record, "returncode": returncode, "ended": time.time(), "error": error,
             "cancel_requested": (queue_dir(root) / "cancel" / name).exists()}
    rundir.atomic_write_json(_sub(root, "ended") / f"{name}.json", ended)
    (queue_dir(root) / "active" / f"{name}.json").unlink(missing_ok=True)
    (queue_dir(root) / "cancel" / name).unlink(missing_ok=True)


def last_error_line(log_path: Path, tail_bytes: int = 16384) -> str | None:
    """The last ``error: ...`` (bad input) or ``failed: ...`` (a run that could not go on)
    line the runner printed: its one-sentence reason, if any."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - tail_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(("error:", "failed:")):
            return line
    return None


# ---------------------------------------------------------------------------------- cancel
def cancel(root: str | os.PathLike, name: str, grace: float = GRACE_S, wait: bool = False
           ) -> str:
    """Cancel run ``name``: drop it from the queue, or SIGTERM its runner's process group
    (SIGKILL after ``grace`` seconds). Returns what happened: ``dequeued``, ``signalled``,
    ``not running``. With ``wait=True`` it blocks until the process has ended.
    """
    check_run_name(name)
    try:
        (queue_dir(root) / "pending" / f"{name}.json").unlink()
        rundir.atomic_write_json(_sub(root, "ended") / f"{name}.json",
                                 {"name": name, "returncode": None, "ended": time.time(),
                                  "error": None, "dequeued": True})
        return "dequeued"
    except FileNotFoundError:
        pass
    pid, start = _live_process(root, name)
    if pid is None:
        return "not running"
    cancel_file = _sub(root, "cancel") / name
    if not cancel_file.exists():
        rundir.atomic_write_json(cancel_file, {"asked": time.time(), "grace": grace})
    _signal_group(pid, signal.SIGTERM)
    if wait:
        deadline = time.monotonic() + grace
        while process_alive(pid, start):
            if time.monotonic() > deadline:
                _signal_group(pid, signal.SIGKILL)
            _reap_child(pid)
            time.sleep(0.05)
    return "signalled"


def _reap_child(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (so it does not linger as a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _live_process(root: str | os.PathLike, name: str) -> tuple[int | None, int | None]:
    """``(pid, start time)`` of run ``name``'s live runner, or ``(None, None)``."""
    check_run_name(name)
    record = _read(queue_dir(root) / "active" / f"{name}.json")
    if record and process_alive(record.get("pid"), record.get("pid_start")):
        return record["pid"], record.get("pid_start")
    info = run_info(Path(root) / name)
    if info and run_status(Path(root) / name, info) == "running" and info.get("pid"):
        return int(info["pid"]), info.get("pid_start_time")
    return None, None


def _enforce_cancel_deadline(root: str | os.PathLike, record: dict) -> None:
    request = _read(queue_dir(root) / "cancel" / record["name"])
    if request and time.time() - request.get("asked", 0) > request.get("grace", GRACE_S):
        _signal_group(record["pid"], signal.SIGKILL)


# ---------------------------------------------------------------------------------- status
def run_info(run_dir: str | os.PathLike) -> dict | None:
    """run.json as a dict, or None while it is missing or unreadable (never raises)."""
    try:
        info = json.loads((Path(run_dir) / rundir.RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def run_status(run_dir: str | os.PathLike, info: dict | None = None) -> str:
    """The run's status as a person should see it (``spider.rundir.effective_status``):
    run.json's, except that a run whose process is gone, or whose pid now belongs to another
    process, is "stopped unexpectedly". ``unknown`` when run.json cannot be read."""
    try:
        return str(rundir.effective_status(Path(run_dir) if info is None else info))
    except (UserError, OSError, ValueError, TypeError):
        return "unknown"


@dataclasses.dataclass
class JobView:
    """What the page shows for one job: queued, starting, running, or a run that ended."""

    name: str
    state: str  # queued | starting | running | done | failed | cancelled | stopped unexpectedly
    run_dir: Path
    error: str | None = None
    order: int = 0


def jobs_overview(root: str | os.PathLike) -> list[JobView]:
    """Queued and active jobs, in queue order (cheap: small JSON files only)."""
    root = Path(root)
    views = []
    for record in active_records(root):
        if record.get("kind", "train") != "train":
            continue  # an attribution job: attribution_jobs() shows it
        info = run_info(root / record["name"])
        alive = process_alive(record.get("pid"), record.get("pid_start"))
        if info is None:
            state = "starting" if alive or "pid" not in record else "failed"
        elif "pid" not in record or (alive and info.get("pid") != record.get("pid")):
            # run.json is still an earlier attempt's (a resumed run's runner is loading the
            # model): its "cancelled" is not this job's state; the job is starting
            state = "starting"
        else:
            state = run_status(root / record["name"], info)
            if state == "running" and not alive and record.get("pid") == info.get("pid"):
                state = STOPPED_UNEXPECTEDLY
        views.append(JobView(record["name"], state, root / record["name"],
                             order=record.get("order", 0)))
    views += [JobView(j.name, "queued", j.run_dir(root), order=j.order)
              for j in pending_jobs(root) if j.kind == "train"]
    return views


def ended_before_run(root: str | os.PathLike) -> list[JobView]:
    """Jobs that ended before their runner wrote run.json (bad input found by the runner,
    or cancelled while loading): ``failed`` with the error line, or ``cancelled``."""
    views = []
    for record in _records(queue_dir(root) / "ended"):
        if record.get("dequeued") or "returncode" not in record:
            continue
        if record.get("kind", "train") != "train":
            continue  # an attribution job: attribution_jobs() shows it
        if (Path(root) / record["name"] / rundir.RUN_FILE).exists():
            continue
        state = "cancelled" if record.get("cancel_requested") else "failed"
        views.append(JobView(record["name"], state, Path(root) / record["name"],
                             error=record.get("error"), order=record.get("order", 0)))
    return sorted(views, key=lambda v: v.order, reverse=True)


def anything_running(root: str | os.PathLike) -> bool:
    """True while a job is queued or its runner lives (the page keeps refreshing then)."""
    return any(v.state in ("queued", "starting", "running") for v in jobs_overview(root))


# ---------------------------------------------------------------------------------- attribution
@dataclasses.dataclass
class AttributionView:
    """One attribution job as the Train page shows it."""

    name: str
    state: str  # queued | running | done | failed | cancelled
    target: Path  # the run it explains
    args: list[str]
    log: Path
    error: str | None = None
    order: int = 0


def queue_attribution(root: str | os.PathLike, run_dir: str | os.PathLike, by: str,
                      eval_limit: int | None = None, start_supervisor: bool = True) -> Job:
    """Queue ``python -m analysis.attribute RUN --by BY [--eval-limit N]`` for a finished
    run, as a job of the same queue as the training runs (one after another). The job's
    name is ``RUN.attribute-BY`` (made unique); its log is ``.queue/logs/NAME.log``."""
    if by not in ATTRIBUTE_BY:
        raise UserError(f"--by must be one of {', '.join(ATTRIBUTE_BY)}, got {by!r}")
    run_dir = Path(run_dir).resolve()
    if not (run_dir / rundir.RUN_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {rundir.RUN_FILE})")
    status = run_status(run_dir)
    if status != "done":
        raise UserError(f"run {run_dir.name} is {status}; only a finished run can be explained")
    args = ["--by", by] + (["--eval-limit", str(int(eval_limit))] if eval_limit else [])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.name)[:60].strip("-.") or "run"
    name = reserve_name(root, f"{stem}.{ATTRIBUTE}-{by}")
    now = time.time_ns()
    job = Job(name=name, args=args, queued=now / 1e9, order=now, kind=ATTRIBUTE,
              target=str(run_dir))
    if not _write_new(_sub(root, "pending") / f"{name}.json", job.to_json()):
        raise UserError(f"job {name} is already queued")
    if start_supervisor:
        ensure_supervisor(root)
    return job


def attribution_jobs(root: str | os.PathLike) -> list[AttributionView]:
    """Attribution jobs, newest first: queued, running (its process alive), or ended (done
    when it exited 0; cancelled when asked; else failed with its last error line)."""
    root = Path(root)
    views = []
    for job in pending_jobs(root):
        if job.kind == ATTRIBUTE:
            views.append(AttributionView(job.name, "queued", Path(job.target), job.args,
                                         queue_dir(root) / "logs" / f"{job.name}.log",
                                         order=job.order))
    for folder, ended in (("active", False), ("ended", True)):
        for record in _records(queue_dir(root) / folder):
            if record.get("kind") != ATTRIBUTE:
                continue
            log = Path(record.get("log") or queue_dir(root) / "logs" / f"{record['name']}.log")
            error = None
            if not ended:
                alive = process_alive(record.get("pid"), record.get("pid_start"))
                state = "running" if alive or "pid" not in record else "failed"
            elif record.get("dequeued") or record.get("cancel_requested"):
                state = "cancelled"
            elif record.get("returncode") == 0:
                state = "done"
            else:
                state, error = "failed", record.get("error") or last_error_line(log)
            views.append(AttributionView(record["name"], state, Path(record.get("target", "")),
                                         list(record.get("args", [])), log, error,
                                         order=record.get("order", 0)))
    return sorted(views, key=lambda v: v.order, reverse=True)


# ---------------------------------------------------------------------------------- supervisor
class _Lock:
    """The supervisor's exclusive lock (released by the kernel if the process dies)."""

    def __init__(self, root: str | os.PathLike):
        self.path = queue_dir(root) / "supervisor.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return True
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def supervisor_running(root: str | os.PathLike) -> bool:
    """Does some process hold the queue's lock? (A probe: takes and drops it at once.)"""
    lock = _Lock(root)
    if lock.acquire():
        lock.release()
        return False
    return True


def _wait_for(root: str | os.PathLike, record: dict, proc: subprocess.Popen | None) -> None:
    """Wait until the job's runner ends: move its log in, enforce a cancel's deadline."""
    while True:
        record = _move_log_into_run(root, record)
        if proc is not None:
            code = proc.poll()
            if code is not None:
                _finish(root, record, code)
                return
        elif not process_alive(record.get("pid"), record.get("pid_start")):
            _finish(root, record, None)  # not our child: its exit code is unknown
            return
        _enforce_cancel_deadline(root, record)
        time.sleep(POLL_S)


def work_queue(root: str | os.PathLike) -> int:
    """Run queued jobs one after another until the queue is empty; returns how many ran.

    The caller must hold the supervisor lock. Runners left by an earlier supervisor (it
    died) are waited for first, so two runs never train at once.
    """
    ran = 0
    while True:
        for record in active_records(root):
            if "pid" not in record:  # claimed, but its claimer died before starting it
                (queue_dir(root) / "active" / f"{record['name']}.json").unlink(missing_ok=True)
                job = Job.from_json(record)
                _write_new(_sub(root, "pending") / f"{job.name}.json", job.to_json())
                continue
            _wait_for(root, record, None)
        job = claim_next(root)
        if job is None:
            return ran
        proc = start_job(root, job)
        record = _read(queue_dir(root) / "active" / f"{job.name}.json") or {}
        _wait_for(root, record, proc)
        ran += 1


def supervise(root: str | os.PathLike, wait_for_lock: float = 2.0) -> int:
    """The supervisor's whole life: take the lock (or leave it to the one holding it), work
    the queue, let go; look once more so a job queued while letting go is not stranded."""
    ran = 0
    lock = _Lock(root)
    while lock.acquire(timeout=wait_for_lock):
        try:
            ran += work_queue(root)
        finally:
            lock.release()
        if not pending_jobs(root):
            break
        wait_for_lock = 0.0  # someone queued in between: take it on, unless another did
    return ran


def ensure_supervisor(root: str | os.PathLike) -> bool:
    """Start a detached supervisor when jobs wait and nobody works the queue. Returns True
    when one was started."""
    if not (pending_jobs(root) or active_records(root)) or supervisor_running(root):
        return False
    log = _sub(root, "logs") / "supervisor.log"
    with open(log, "ab") as out:
        subprocess.Popen([sys.executable, "-m", "app.jobs", "supervise", "--root",
                          str(Path(root).resolve())], cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                         close_fds=True)
    return True


# ---------------------------------------------------------------------------------- launching
def runner_defaults() -> dict[str, Any]:
    """The runner's own defaults (``spider.train.RunConfig``): the page starts from these."""
    from spider.train import RunConfig

    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(RunConfig)}


def check_model(path: str | os.PathLike) -> Path:
    """The model directory behind ``path`` (a model folder or a run checkpoint), checked the
    way the runner will load it, without loading weights: a ``UserError`` says what is wrong."""
    from transformers import AutoConfig

    from spider.models import _check_model_dir, _check_model_files, resolve_model_path

    resolved = Path(resolve_model_path(path))
    _check_model_dir(resolved)
    _check_model_files(resolved)
    try:
        AutoConfig.from_pretrained(resolved, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = " ".join(str(err).split()).split(". ")[0]
        raise UserError(f"the config of model directory '{resolved}' does not load: {first}"
                        ) from None
    return resolved


def check_data(spec: str, sample_images: int = 16) -> str:
    """Check a data spec as the runner will read it; returns what it is, in a few words.

    For a LLaVA-style JSON file every record is checked (and that its image file exists),
    and the first ``sample_images`` images are decoded.
    """
    from spider.data import load_dataset

    dataset = load_dataset(spec, "train")
    for index in range(min(sample_images, len(dataset))):
        dataset[index]  # decodes the image: a damaged one is a UserError naming it
    if spec.startswith("builtin:"):
        return f"{spec}: {len(dataset)} generated training examples"
    return f"{len(dataset)} records, images read relative to the JSON file's folder"


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options as the runner will take them (a ``UserError`` names a bad one)."""
    from spider.methods import make_options

    try:
        return dataclasses.asdict(make_options(method, **options))
    except ValueError as err:
        raise UserError(str(err)) from None


def check_settings(settings: dict[str, Any]) -> None:
    """The runner's own checks of numbers and choices (``spider.train.check_config``)."""
    problems = settings_problems(settings)
    if problems:
        raise UserError(problems[0])


def settings_problems(settings: dict[str, Any]) -> list[str]:
    """Every setting the runner would refuse, one sentence each naming its flag ([] if none):
    each setting checked alone by the runner's own rules (``spider.train.check_config``),
    then all of them together."""
    from spider.models import resolve_device
    from spider.train import RunConfig, check_config

    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - known - {"name"})
    if unknown:
        return [f"unknown setting {unknown[0]!r}"]
    given = {k: v for k, v in settings.items() if k in known}
    problems: list[str] = []
    for key, value in given.items():
        try:
            check_config(RunConfig(**{key: value, "output_dir": "(checked later)"}))
        except ValueError as err:  # UserError included
            problems.append(str(err))
        except TypeError:
            problems.append(f"--{key.replace('_', '-')} must be a number, not {value!r}")
    if problems:
        return problems
    try:
        cfg = RunConfig(**{**given, "output_dir": "(checked later)"})
        check_config(cfg)
        resolve_device(cfg.device)  # "cuda" where there is none is refused here
    except UserError as err:
        problems.append(str(err))
    return problems


def check_launch(settings: dict[str, Any]) -> list[str]:
    """Every reason why ``settings`` (one run) cannot start, one sentence each; [] if none."""
    problems = []
    for check in (lambda: check_settings(settings),
                  lambda: check_model(settings.get("model") or runner_defaults()["model"]),
                  lambda: check_data(str(settings.get("data") or "builtin:counting")),
                  lambda: check_options(settings.get("method", "spider"),
                                        settings.get("options") or {})):
        try:
            check()
        except UserError as err:
            problems.append(str(err))
    return problems


def config_args(settings: dict[str, Any]) -> list[str]:
    """Runner flags for ``settings`` (RunConfig field names; ``options`` a dict)."""
    args: list[str] = []
    for key, value in settings.items():
        if key == "output_dir":
            continue
        if key == "options":
            for option, option_value in (value or {}).items():
                args += ["--option", f"{option}={option_value}"]
            continue
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def launch(root: str | os.PathLike, runs: Sequence[dict[str, Any]],
           start_supervisor: bool = True) -> list[Job]:
    """Queue one run per settings dict (one per method), in order, and make sure a
    supervisor works the queue. ``settings['name']`` may give the run's name."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for settings in runs:
        settings = dict(settings)
        wanted = settings.pop("name", None) or default_name(
            settings.get("method", "spider"), str(settings.get("data", "builtin:counting")))
        jobs.append(enqueue(root, reserve_name(root, wanted), config_args(settings)))
    _record_launch(root, [j.name for j in jobs])
    if start_supervisor:
        ensure_supervisor(root)
    return jobs


def _record_launch(root: str | os.PathLike, names: Sequence[str]) -> None:
    """Remember which runs one Launch queued (``launches/FIRST.json``), so that the Train
    page shows them together, on one chart, from any tab and after a restart. Named by the
    first run, whose name was reserved: no two launches share a file."""
    if names:
        _write_new(_sub(root, "launches") / f"{names[0]}.json",
                   {"runs": list(names), "created": time.time()})


def launch_groups(root: str | os.PathLike) -> dict[str, list[str]]:
    """Run name -> the names of every run queued by the same Launch, in launch order
    (itself included). Runs never launched together (one-run launches, runs made by the
    command line) are not keys."""
    groups: dict[str, list[str]] = {}
    folder = queue_dir(root) / "launches"
    paths = sorted(folder.glob("*.json"))  # records are written whole, once, never changed
    version = tuple(p.name for p in paths)
    known = _LAUNCH_GROUPS.get(str(folder))
    if known and known[0] == version:  # the page asks every second: read the files once
        return known[1]
    for path in paths:
        runs = (_read(path) or {}).get("runs")
        names = [n for n in runs if valid_run_name(n)] if isinstance(runs, list) else []
        if len(names) > 1:
            for name in names:
                groups.setdefault(name, names)
    _LAUNCH_GROUPS[str(folder)] = (version, groups)
    return groups


_LAUNCH_GROUPS: dict[str, tuple[tuple[str, ...], dict[str, list[str]]]] = {}


def resume(root: str | os.PathLike, name: str, start_supervisor: bool = True) -> Job:
    """Queue ``--resume`` of a cancelled or stopped-unexpectedly run."""
    check_run_name(name)
    run_dir = Path(root) / name
    status = run_status(run_dir)
    if status not in RESUMABLE:
        raise UserError(f"run {name} is {status}; only a cancelled run or one that stopped "
                        "unexpectedly can be resumed")
    (queue_dir(root) / "active" / f"{name}.json").unlink(missing_ok=True)  # its dead record
    job = enqueue(root, name, [], resume=True)
    if start_supervisor:
        ensure_supervisor(root)
    return job


def iter_user_runs(root: str | os.PathLike) -> Iterator[Path]:
    """Run directories directly under ``root`` (what the Train page lists), newest first."""
    root = Path(root)
    if not root.is_dir():
        return iter(())
    found = [p for p in root.iterdir()
             if not p.name.startswith(".") and (p / rundir.RUN_FILE).is_file()]
    return iter(sorted(found, key=lambda p: (p / rundir.RUN_FILE).stat().st_mtime, reverse=True))


# ---------------------------------------------------------------------------------- command line
def _existing_root(text: str) -> Path:
    """argparse type of ``--root``: an existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is not a folder" if path.exists() else f"{text} does not exist")
    return path


def _parser() -> CliParser:
    parser = CliParser(prog="python -m app.jobs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (("supervise", "work the queue of ROOT until it is empty"),
                          ("list", "print queued and active jobs of ROOT")):
        p = sub.add_parser(command, help=text)
        p.add_argument("--root", required=True, type=_existing_root,
                       help="the user's runs root")
    p = sub.add_parser("cancel", help="cancel run NAME under ROOT")
    p.add_argument("--root", required=True, type=_existing_root, help="the user's runs root")
    p.add_argument("name", help="the run's folder name")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "supervise":
        supervise(args.root)
    elif args.command == "list":
        for view in jobs_overview(args.root):
            print(f"{view.state:22s} {view.name}")
    else:
        print(cancel(args.root, args.name, wait=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
