"""SIGKILL at random moments of a tiny run, then ``--resume``, again and again.

Each chain starts the tiny run of the issue (6 steps, evaluation at 0/3/6, checkpoints at
2/4/6) and kills it with SIGKILL at a moment chosen by one of three strategies, in turn:

* ``random``: a uniformly random time into the run (start-up, training, evaluation, writes);
* ``checkpoint``: the moment a checkpoint or resume folder is being written (its temporary
  folder has appeared);
* ``evaluation``: a random moment while ``run.json`` says an evaluation is under way.

After every kill the run directory must read back whole through the analysis layer
(``load_run``, its frames, ``list_runs``) and every complete checkpoint, event and statistics
row must equal the uninterrupted run's (a torn file taken as valid would differ or fail to
read). Then the run is continued as a person would: ``--resume`` when it has a ``run.json``,
the same command again when it has not. Each chain ends when a continuation runs to the end;
the finished run must equal the uninterrupted one in every checkpoint tensor, event and row,
and keep none of the temporary files or folders of the writes the kills cut short.
Where each kill landed is read off the directory afterwards (a temporary checkpoint folder:
inside a checkpoint write; ``evaluating`` in run.json: inside an evaluation).

The ``checkpoint`` strategy waits for the temporary names the code itself chooses: code that
wrote its checkpoints in place would never be killed inside one. ``test_kill_at_events.py``
places kills independently of the code's names, by counting the run's file changes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from harness import (
    TINY,
    Trainer,
    children_cpu_seconds,
    differences,
    leftovers,
    missing,
    read_back,
    record,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")

KILLS_PER_PART = 13  # 4 parts in CI: 52 kills
STRATEGIES = ("random", "checkpoint", "evaluation")


def _writing_checkpoint(path: Path, before: set[str]) -> bool:
    """Whether a checkpoint or resume folder is being written now (a temporary folder that
    was not there before this process started)."""
    for folder in (path / "checkpoints", path):
        try:
            if any(e.name.startswith((".tmp-step-", ".tmp-resume")) and e.name not in before
                   for e in os.scandir(folder)):
                return True
        except FileNotFoundError:
            continue
    return False


def _evaluating(path: Path) -> bool:
    try:
        progress = json.loads((path / "run.json").read_text()).get("progress") or {}
    except (OSError, ValueError):
        return False
    return bool(progress.get("evaluating"))


def _kill_point(child: Trainer, path: Path, strategy: str, rng: random.Random,
                duration: float, before: list[str]) -> bool:
    """Wait for the strategy's moment and SIGKILL ``child``; False when it ended first."""
    if strategy == "random":
        deadline = time.monotonic() + rng.uniform(0.0, duration)
        while time.monotonic() < deadline and child.alive():
            time.sleep(0.01)
    elif strategy == "checkpoint":
        old = {Path(name).name for name in before}
        wait_for(lambda: _writing_checkpoint(path, old) or not child.alive(), duration * 4,
                 every=0.001)
    else:
        if wait_for(lambda: _evaluating(path) or not child.alive(), duration * 4, every=0.002):
            time.sleep(rng.uniform(0.0, 0.3))
    return child.kill()


def _landed(path: Path, output: str, before: list[str]) -> str:
    """Where the kill landed, read off what the process left (``before``: temporary entries
    that earlier kills left)."""
    names = set(leftovers(path)) - set(before)
    if any(".tmp-step-" in n or ".tmp-resume" in n for n in names):
        return "inside a checkpoint write"
    if not (path / "run.json").exists():
        return "start-up (before run.json)"
    if _evaluating(path):
        return "inside an evaluation"
    if "step " not in output:
        return "start-up / first evaluation"
    return "between steps (training, logging)"


def _lost_against(path: Path, reference, finished: bool = True) -> list[str]:
    """What the run at ``path`` holds that differs from the uninterrupted run, and (a
    ``finished`` run) what it lacks; a run that does not read back has lost its run.json."""
    try:
        found = read_back(path)
    except Exception as err:  # noqa: BLE001 - any error reading is the finding
        return [f"the run does not read back: {type(err).__name__}: {err}"]
    gone = differences(found, reference)
    return gone + ([f"lacks {m}" for m in missing(found, reference)] if finished else [])


def _resume_of_a_done_run(path: Path, log: Path) -> list[str]:
    """``--resume`` of a run that is done: exit 2 saying so, and (a kill after the end may
    have cut the removal of the resume state short) no resume state or temporary left."""
    child = Trainer(["--output-dir", str(path), "--resume"], log)
    code = child.wait()
    if code != 2 or "already done" not in child.output():
        return [f"--resume of a done run: exit {code}, {child.output()[-300:]!r}"]
    return []


@pytest.mark.parametrize("part", range(4))
def test_sigkill_anywhere_then_resume_reaches_the_uninterrupted_end(tmp_path, reference, part):
    ref, duration = reference
    cpu_before, started = children_cpu_seconds(), time.monotonic()
    rng = random.Random(1000 + part)
    kills, chains, landed, problems, litter, lost = 0, 0, {}, [], 0, 0
    while kills < KILLS_PER_PART:
        chains += 1
        path = tmp_path / f"chain-{chains}"
        ended = False
        attempt = 0
        while not ended:
            attempt += 1
            resume = (path / "run.json").exists()
            argv = ["--output-dir", str(path), *(["--resume"] if resume else TINY)]
            log = tmp_path / f"chain-{chains}-{attempt}.log"
            before = leftovers(path) if path.exists() else []
            child = Trainer(argv, log)
            if kills < KILLS_PER_PART:
                strategy = STRATEGIES[kills % len(STRATEGIES)]
                killed = _kill_point(child, path, strategy, rng, duration, before)
            else:
                killed = False
            if killed:
                kills += 1
                where = _landed(path, child.output(), before)
                landed[where] = landed.get(where, 0) + 1
                if (path / "run.json").exists():
                    found = read_back(path)  # raises if anything fails to read
                    gone = differences(found, ref)
                    lost += len(gone)
                    problems += [f"kill {kills} ({where}): {d}" for d in gone]
                    if found.status == "done":  # the kill came as the finished run exited
                        landed[where] -= 1
                        where = "after the run was done (exiting)"
                        landed[where] = landed.get(where, 0) + 1
                        problems += _resume_of_a_done_run(path, tmp_path / f"{log.stem}-r.log")
                        ended = True
                continue
            code = child.wait()
            assert code == 0, f"{argv} exited {code}:\n{child.output()[-3000:]}"
            ended = True
        found = read_back(path)
        assert found.status == "done", found.status
        gone = differences(found, ref) + [f"lacks {m}" for m in missing(found, ref)]
        lost += len(gone)
        problems += [f"chain {chains} end: {d}" for d in gone]
        if found.resume_step is not None:
            problems.append(f"chain {chains}: a finished run kept its resume state")
        litter += len(leftovers(path))
        problems += [f"chain {chains}: a finished run keeps {name}" for name in leftovers(path)]
    record("SIGKILL of a training run, then --resume", "process killed", kills,
           f"every kill read back whole; {chains} chain(s) resumed to the uninterrupted end. "
           "Kills landed: " + ", ".join(f"{n} {w}" for w, n in sorted(landed.items())),
           problems, data_lost=lost, landed=landed, chains=chains,
           leftover_temporaries=litter,
           cpu_s=round(children_cpu_seconds() - cpu_before, 1),
           wall_s=round(time.monotonic() - started, 1))
    assert not problems, problems[:20]


def test_a_kill_during_the_first_run_json_write_does_not_strand_the_folder(tmp_path, reference):
    """Killed while writing its very first run.json, a run leaves only that write's temporary
    file (``.tmp-run.json.XXXX``, see spider.rundir.atomic_write_bytes): the same command
    must start the run there again (--resume cannot: there is no run.json)."""
    ref, _ = reference
    path = tmp_path / "run"
    path.mkdir()
    (path / ".tmp-run.json.k1ll3d").write_bytes(b'{\n  "schema_version": 2,\n  "con')
    child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "run.log")
    code = child.wait()
    problems = [] if code == 0 else [f"exit {code}: {child.output()[-400:]}"]
    lost = _lost_against(path, ref) if not problems else []
    problems += lost
    if not problems:
        problems += [f"keeps {name}" for name in leftovers(path)]
    record("a run killed while writing its first run.json, started again", "process killed",
           1, "the same command starts it again in place and ends like an uninterrupted run",
           problems, data_lost=len(lost))
    assert not problems, problems


def test_sigterm_before_the_first_step_ends_cancelled_and_resumes(tmp_path, reference):
    """SIGTERM after run.json is written but before the first step (here: as the step-0
    evaluation starts) is heard, not fatal: the run ends cancelled with exit 130 and the
    command to continue, and that command then ends like an uninterrupted run."""
    ref, _ = reference
    path = tmp_path / "run"
    child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "run.log",
                    faults={"sigterm_at_first_evaluation": True})
    code = child.wait()
    problems = []
    last = next((line for line in reversed(child.output().splitlines()) if line.strip()), "")
    if code != 130 or f"--output-dir {path} --resume" not in last:
        problems.append(f"exit {code}, last line {last!r}")
    info = json.loads((path / "run.json").read_text())
    if info.get("status") != "cancelled" or info.get("progress", {}).get("step") != 0:
        problems.append(f"status {info.get('status')}, progress {info.get('progress')}")
    lost = _lost_against(path, ref, finished=False)  # what the cancelled run holds
    if not problems:
        resumed = Trainer(["--output-dir", str(path), "--resume"], tmp_path / "resume.log")
        if (code := resumed.wait()) != 0:
            problems.append(f"--resume exited {code}: {resumed.output()[-400:]}")
        else:
            lost = _lost_against(path, ref)
    problems += lost
    record("SIGTERM before the first step (during the step-0 evaluation)", "process killed", 1,
           "exit 130, status cancelled at step 0, the --resume command printed; it then ends "
           "like an uninterrupted run", problems, data_lost=len(lost))
    assert not problems, problems


def test_a_kill_as_a_finished_run_exits_leaves_nothing_behind(tmp_path, reference):
    """Killed after run.json says done but while the resume state was being removed, a run
    keeps that state (or a renamed half of it): ``--resume`` says the run is done (exit 2)
    and removes them; every checkpoint stays as it was."""
    ref, _ = reference
    path = tmp_path / "run"
    shutil.copytree(ref.path, path)
    (path / "resume").mkdir()
    (path / "resume" / "meta.json").write_text('{"step": 6}')
    (path / ".tmp-resume-removed-4242").mkdir()
    (path / ".tmp-resume-removed-4242" / "optimizer.safetensors").write_bytes(b"\0" * 64)
    problems = _resume_of_a_done_run(path, tmp_path / "resume.log")
    lost = _lost_against(path, ref)
    problems += lost + [f"keeps {name}" for name in leftovers(path)]
    if (path / "resume").exists():
        problems.append("keeps the resume state of a done run")
    record("a kill as a finished run removes its resume state, then --resume", "process killed",
           1, "exit 2 'already done'; the leftover resume state and temporaries removed, "
           "every checkpoint as before", problems, data_lost=len(lost))
    assert not problems, problems
