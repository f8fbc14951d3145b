"""Is the process that trains a run still alive? (ARCHITECTURE.md, *The run directory*.)

A run's ``run.json`` records the training process (:func:`process_record`: pid, its start
time from ``/proc``, host, boot id) and a ``heartbeat`` rewritten every
:data:`HEARTBEAT_INTERVAL_S` seconds by a :class:`Heartbeat` thread. A reader on the same
host asks :func:`record_alive` (the pid runs and is still the same process: a reused pid has
another start time; the machine has not rebooted); on another host it can only read the
heartbeat's age (:func:`heartbeat_stale`). ``spider.rundir.effective_status`` combines the
two; ``app.jobs`` uses :func:`process_alive` for the processes it starts.

No file format here: the run directory (``spider.rundir``) stores what this module records.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

HEARTBEAT_INTERVAL_S = 10.0
HEARTBEAT_STALE_INTERVALS = 6  # a heartbeat older than this many intervals is stale


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


def boot_id() -> str | None:
    """This boot's id (Linux), to tell a pid recorded before a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_record(pid: int | None = None) -> dict:
    """What run.json records about the process that trains: pid, its start time, host."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "pid_start_time": process_start_time(pid),
            "hostname": socket.gethostname(), "boot_id": boot_id()}


def on_this_host(record: Mapping) -> bool:
    """Whether a :func:`process_record` (or a run.json holding one) was made on this host;
    True for a record naming no host."""
    host = record.get("hostname")
    return host is None or host == socket.gethostname()


def record_alive(record: Mapping) -> bool:
    """Whether the process a :func:`process_record` names still runs (asked on the host it
    ran on)."""
    boot = record.get("boot_id")
    if boot and boot_id() and boot != boot_id():
        return False  # the machine rebooted since
    return process_alive(record.get("pid"), record.get("pid_start_time"))


def heartbeat_stale(record: Mapping, now: float | None = None) -> bool | None:
    """Whether the ``heartbeat`` of ``record`` is older than
    :data:`HEARTBEAT_STALE_INTERVALS` intervals; None when it has none."""
    beat = record.get("heartbeat")
    if not isinstance(beat, (int, float)) or isinstance(beat, bool):
        return None
    interval = float(record.get("heartbeat_interval_s") or HEARTBEAT_INTERVAL_S)
    age = (time.time() if now is None else now) - beat
    return age > HEARTBEAT_STALE_INTERVALS * interval


class Heartbeat:
    """Context manager: a daemon thread calls ``beat()`` every ``interval`` seconds while
    inside (an ``OSError`` from it, a full disk, is left for the main thread's next write to
    find). Entering twice is a no-op while it runs."""

    def __init__(self, beat: Callable[[], None], interval: float = HEARTBEAT_INTERVAL_S):
        self.beat, self.interval = beat, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except OSError:
                pass

    def __enter__(self) -> Heartbeat:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="run-heartbeat",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


__all__ = ["HEARTBEAT_INTERVAL_S", "HEARTBEAT_STALE_INTERVALS", "Heartbeat", "boot_id",
           "heartbeat_stale", "on_this_host", "process_alive", "process_record",
           "process_start_time", "record_alive"]
