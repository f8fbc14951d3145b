"""SIGKILL placed by counting the run's own file changes, then ``--resume``.

``test_kill_resume.py`` places kills by time and by watching for the temporary names the
code chooses, so a copy of the code that stops using those names (a checkpoint written in
place) is never killed inside its writes. Here kills are placed from outside the code: the
training child counts the events by which it changes files under its run directory (Python
audit events: opens for writing, renames and replaces, removals, folders made and removed;
and safetensors file writes, seen at the Python call; ``forkserver.watch_file_events``) and
SIGKILLs itself at the N-th, just before it or just after it returned (a file opened for
writing, not yet written). The N are spread over every kind of write of an uninterrupted
run (its events recorded once): checkpoint, resume state, run.json, logs, other. Which kind
each kill landed in is read off the event it was killed at.

After each kill the run must read back whole and equal to the uninterrupted run in all it
holds; it is then continued (``--resume``, itself killed once in every other chain at a file
event of its own) until it ends. The end must equal the uninterrupted run in every checkpoint
tensor (weights and method state), event and statistics row, keep no temporaries, and the
last ``--resume`` must start no earlier than the latest resume state the killed processes
completed (a resume that starts again from step 0 after a kill between the two renames of a
swap reaches the same end, but loses the work done).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from forkserver import EVENT_KINDS
from harness import (
    TINY,
    Trainer,
    children_cpu_seconds,
    differences,
    leftovers,
    missing,
    read_back,
    record,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SAVE_EVERY = int(TINY[TINY.index("--save-every") + 1])
FAIL_FAST_ENV = "SPIDER_FAULTS_FAIL_FAST"  # set: stop at the first chain that finds a problem
PARTS = 2
# kills per part and kind of write (the first kill of each chain); every kind with events
# in the uninterrupted run is hit in every part
PER_KIND = {"checkpoint": 4, "resume state": 4, "run.json": 3, "logs": 3, "other": 1}
MUST_HIT = ("checkpoint", "resume state", "run.json", "logs")
WHERE = {"checkpoint": "inside a checkpoint write", "resume state": "inside a resume-state write",
         "run.json": "inside a run.json write", "logs": "inside a log write (metrics, layers)",
         "other": "at another file change"}


def _events_of(report: Path) -> dict:
    try:
        return json.loads(report.read_text())
    except (OSError, ValueError):
        return {"events": [], "killed_at": None}


@pytest.fixture(scope="module")
def event_trace(tmp_path_factory, reference):
    """The file-change events of the tiny run, uninterrupted (``[op, kind, paths]``), those
    of its main thread."""
    ref, _ = reference
    folder = tmp_path_factory.mktemp("events")
    path = folder / "run"
    child = Trainer(["--output-dir", str(path), *TINY], folder / "run.log",
                    faults={"events": {"run_dir": str(path), "report": str(folder / "ev.json")}})
    assert child.wait() == 0, child.output()[-2000:]
    found = read_back(path)  # watching the events changes nothing in the run
    assert not differences(found, ref) and not missing(found, ref)
    # the main thread's events, those kills are placed by (the heartbeat's come with time)
    events = [e[:3] for e in _events_of(folder / "ev.json")["events"] if e[3]]
    assert events, "no file events seen: the watch is broken"
    return events


def kill_points(events: list, part: int, parts: int = PARTS,
                per_kind: dict | None = None) -> list[tuple[int, bool]]:
    """``(N, after)`` of the kills of ``part``: for each kind of write, ``per_kind[kind]``
    events spread evenly over that kind's events in the uninterrupted run (the parts
    interleave), killed before or after the event in turn. ``per_kind=None``: every event,
    before and after in turn (the slow variant)."""
    points = []
    by_kind: dict[str, list[int]] = {}
    for index, (_, kind, _) in enumerate(events, start=1):
        by_kind.setdefault(kind, []).append(index)
    for kind, indices in by_kind.items():
        if per_kind is None:
            chosen = indices[part::parts]
        else:
            count = min(per_kind.get(kind, 1) * parts, len(indices))
            spread = sorted({indices[int((i + 0.5) * len(indices) / count)]
                             for i in range(count)})
            chosen = spread[part::parts]
        points += [(n, (n + part) % 2 == 1) for n in chosen]
    return sorted(points)


def _commits(events: list) -> int:
    """Resume states completed by a process: renames onto the resume folder."""
    return sum(1 for op, _, paths, _ in events if op == "os.rename" and paths[-1] == "resume")


class Chain:
    """One run killed, continued until it ends; what it found."""

    def __init__(self, folder: Path, name: str, reference):
        self.folder, self.path, self.ref = folder, folder / name, reference
        self.name, self.attempt = name, 0
        self.saved = 0  # the latest step whose resume state a process completed
        self.problems: list[str] = []
        self.lost: list[str] = []
        self.done = False

    def start(self, kill_at: int | None, after: bool = False) -> tuple[int, dict, str]:
        """Start the run (or continue it) with a kill at file event ``kill_at`` of the
        process; ``(exit code, its events report, its output)``."""
        self.attempt += 1
        resume = (self.path / "run.json").exists()
        argv = ["--output-dir", str(self.path), *(["--resume"] if resume else TINY)]
        report = self.folder / f"{self.name}-{self.attempt}.json"
        watch = {"run_dir": str(self.path), "report": str(report)}
        if kill_at is not None:
            watch.update(kill_at=kill_at, after=after)
        child = Trainer(argv, self.folder / f"{self.name}-{self.attempt}.log",
                        faults={"events": watch})
        code = child.wait()
        events = _events_of(report)
        start = self.saved if resume else 0
        commits = _commits(events["events"])
        if commits:
            self.saved = start + SAVE_EVERY * commits
        return code, events, child.output()

    def after_kill(self, events: dict, what: str) -> None:
        """Read the killed run back; a kill that came after the end: check --resume."""
        where = events["killed_at"]
        label = f"{what} {where[4]} event {where[0]} ({where[1]} {where[3]})"
        if not (self.path / "run.json").exists():
            return
        found = read_back(self.path)  # raises if anything fails to read
        gone = differences(found, self.ref)
        self.lost += gone
        self.problems += [f"{label}: {d}" for d in gone]
        if found.status == "done":
            child = Trainer(["--output-dir", str(self.path), "--resume"],
                            self.folder / f"{self.name}-done.log")
            code = child.wait()
            if code != 2 or "already done" not in child.output():
                self.problems.append(f"{label}: --resume of a done run exited {code}")
            self.done = True

    def finish(self, kill_at: int | None = None, after: bool = False) -> dict | None:
        """Continue the run to its end and compare it with the reference; with ``kill_at``,
        kill it there first (its events report when that kill came; None when the run
        ended before)."""
        expected = self.saved
        code, report, output = self.start(kill_at, after)
        if kill_at is not None and code == -9 and report["killed_at"]:
            return report
        if code != 0:
            self.problems.append(f"the last continuation exited {code}: {output[-600:]}")
            return
        found = read_back(self.path)
        gone = differences(found, self.ref) + [f"lacks {m}" for m in missing(found, self.ref)]
        self.lost += gone
        self.problems += gone
        if found.status != "done":
            self.problems.append(f"status {found.status} after the last continuation")
        if found.resume_step is not None:
            self.problems.append("a finished run kept its resume state")
        self.problems += [f"a finished run keeps {name}" for name in leftovers(self.path)]
        info = json.loads((self.path / "run.json").read_text())
        started = int(info.get("resumed_at_step") or 0)
        if started < expected:  # (later than expected: the commits were not seen by name)
            self.problems.append(f"the last --resume started from step {started}, before "
                                 f"step {expected}, the latest resume state completed")
        return None


def _run_chains(tmp_path: Path, ref, events: list, points: list[tuple[int, bool]],
                seed: int) -> tuple[Counter, Counter, list[str], list[str], int]:
    rng = random.Random(seed)
    landed, landed_resume, problems, lost, kills = Counter(), Counter(), [], [], 0
    for number, (kill_at, after) in enumerate(points, start=1):
        chain = Chain(tmp_path, f"chain-{number}", ref)
        code, report, output = chain.start(kill_at, after)
        if code != -9 or not report["killed_at"]:
            chain.problems.append(f"not killed at event {kill_at} (exit {code}; "
                                  f"{len(report['events'])} events): {output[-300:]}")
        else:
            kills += 1
            landed[report["killed_at"][2]] += 1
            chain.after_kill(report, "first kill")
            # every other chain: kill the continuation too, at an event of its own (the
            # rewind of a resume: temporaries removed, logs truncated, checkpoints dropped)
            if not chain.done and number % 2 == 0:
                report = chain.finish(rng.randint(1, 30), rng.random() < 0.5)
                if report is not None:
                    kills += 1
                    landed_resume[report["killed_at"][2]] += 1
                    chain.after_kill(report, "kill of --resume")
                else:
                    chain.done = True
            if not chain.done:
                chain.finish()
        problems += [f"chain {number} (kill at event {kill_at}, "
                     f"{'after' if after else 'before'}): {p}" for p in chain.problems]
        lost += chain.lost
        if problems and os.environ.get(FAIL_FAST_ENV):
            break  # scripts/mutation_check.py: one finding is enough
    return landed, landed_resume, problems, lost, kills


def _check(tmp_path, reference, event_trace, points, fault: str, seed: int):
    ref, _ = reference
    cpu_before, started = children_cpu_seconds(), time.monotonic()
    landed, landed_resume, problems, lost, kills = _run_chains(tmp_path, ref, event_trace,
                                                               points, seed)
    kinds = Counter(kind for _, kind, _ in event_trace)
    unhit = [k for k in MUST_HIT if kinds[k] and not landed[k]]
    problems += [f"no kill landed inside a {k} write" for k in unhit]
    where = {WHERE[k]: landed[k] for k in EVENT_KINDS if landed[k]}
    where.update({f"{WHERE[k]} of --resume": n for k, n in landed_resume.items()})
    record(fault, "process killed", kills,
           f"every kill read back whole; {len(points)} chains resumed to the uninterrupted end "
           "(weights, method state, events, rows bit-equal), never from before the latest resume state "
           "completed. Kills landed: " + ", ".join(f"{n} {w}" for w, n in where.items()),
           problems, data_lost=len(lost), landed=where, chains=len(points),
           events_in_a_run=dict(kinds),
           cpu_s=round(children_cpu_seconds() - cpu_before, 1),
           wall_s=round(time.monotonic() - started, 1))
    assert not problems, problems[:20]


FAULT = "SIGKILL at the N-th file change of a run (placed by counting events), then --resume"


@pytest.mark.parametrize("part", range(PARTS))
def test_sigkill_at_file_events_then_resume_reaches_the_uninterrupted_end(
        tmp_path, reference, event_trace, part):
    _check(tmp_path, reference, event_trace, kill_points(event_trace, part, PARTS, PER_KIND),
           FAULT, seed=2000 + part)


@pytest.mark.slow
@pytest.mark.parametrize("part", range(4))
def test_sigkill_at_every_file_event_then_resume(tmp_path, reference, event_trace, part):
    """Every file event of the run, once (before or after it), in 4 parts."""
    _check(tmp_path, reference, event_trace, kill_points(event_trace, part, 4, None),
           FAULT + " (every event)", seed=3000 + part)
