"""Faults around the statistics of a large run, written as Parquet parts while it runs
(``spider.rundir``, "At scale"): SIGKILL of the writer at random moments and inside a merge
or a resume's rewrite, readers while it writes, merges and compacts, and a real training run
made to write parts, killed and resumed.

The writer here is a process of its own (forked) that appends 7B-shaped steps (the 292
tensors of ``bench.bench_layers_scale.llava_7b_tensors``: Parquet from the first step) the
way the run recorder does, one ``RunDir.append_layers`` per logged step, with merges every
4 parts so that a short run merges often. The rows of a step depend on the step alone, so
what a directory must hold after any history is known exactly.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from harness import TINY, differences, leftovers, missing, read_back, record, wait_for

from bench.bench_layers_scale import llava_7b_tensors
from spider import rundir, statistics
from spider.rundir import RunDir, StatisticsRow

pytestmark = pytest.mark.usefixtures("one_thread")

TENSORS = llava_7b_tensors()
STEPS = 40
_FORK = multiprocessing.get_context("fork")


def _rows(step: int) -> list[StatisticsRow]:
    """The statistics rows of ``step``: the same in every process and history."""
    rng = np.random.default_rng(step)
    values = rng.uniform(0, 1, (len(TENSORS), len(statistics.METHOD_COLUMNS)))
    return [StatisticsRow(step, name, numel,
                          {c: float(values[t, k]) for k, c in enumerate(statistics.METHOD_COLUMNS)},
                          float(step + t), 100.0 + t)
            for t, (name, numel) in enumerate(TENSORS)]


def _expected(steps) -> pd.DataFrame:
    return pd.DataFrame.from_records([r.to_json() for s in steps for r in _rows(s)])


def _writer(path: str, first: int, last: int, kill_in: str | None = None,
            compact: bool = False) -> None:
    """Body of a writer process: append steps ``first``..``last`` (merging every 4 parts),
    then compact when ``compact``. ``kill_in="merge"``: SIGKILL itself right after the first
    merged part is renamed into place, before the parts it covers are removed."""
    rundir.LAYERS_PARTS_MERGE = 4
    if kill_in == "merge":
        write = rundir._write_part

        def write_then_die(folder, lo, hi, table):
            out = write(folder, lo, hi, table)
            if hi > lo:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        rundir._write_part = write_then_die
    run = RunDir(path)
    for step in range(first, last + 1):
        run.append_layers(_rows(step))
    if compact:
        run.compact_layers()
    os._exit(0)


def _start(path: Path, first: int, last: int, **options) -> multiprocessing.Process:
    child = _FORK.Process(target=_writer, args=(str(path), first, last), kwargs=options)
    child.start()
    return child


def _whole_steps(frame: pd.DataFrame) -> list[str]:
    """What is wrong with a frame read at any moment: it must hold steps 1..n, each whole
    (every tensor once), with the values the writer wrote."""
    if frame.empty:
        return []
    steps = sorted(frame["step"].unique())
    problems = []
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"steps are not 1..n: {steps[:5]}..{steps[-5:]}")
    if frame.duplicated(["step", "param"]).any():
        problems.append(f"{int(frame.duplicated(['step', 'param']).sum())} rows twice")
    counts = frame.groupby("step").size()
    if (counts != len(TENSORS)).any():
        problems.append(f"steps not whole: {counts[counts != len(TENSORS)].to_dict()}")
    if not problems:
        expected = _expected(steps)
        ordered = frame.sort_values(["step", "param"]).reset_index(drop=True)
        expected = expected.sort_values(["step", "param"]).reset_index(drop=True)
        for column in expected.columns:
            if ordered[column].tolist() != expected[column].tolist():
                problems.append(f"column {column} differs from what was written")
    return problems


def _resume(path: Path, keep: int) -> None:
    """What ``--resume`` does to the statistics, at a checkpoint of step ``keep``."""
    run = RunDir(path)
    run.remove_temporaries()
    run.truncate_layers(keep)


def test_sigkill_of_the_writer_then_resume_loses_and_repeats_no_row(tmp_path):
    rng = random.Random(24)
    problems, kills, chains = [], 0, 0
    timed = tmp_path / "timed"
    start = time.monotonic()
    _start(timed, 1, STEPS).join(300)
    duration = time.monotonic() - start
    for chain in range(4):
        chains += 1
        path = tmp_path / f"chain-{chain}"
        written = 0
        for attempt in range(4):
            child = _start(path, written + 1, STEPS)
            if attempt < 3:
                time.sleep(rng.uniform(0.05, 1.0) * duration)
                if child.is_alive():
                    os.kill(child.pid, signal.SIGKILL)
                    kills += 1
            child.join(300)
            frame = RunDir(path).read_layers_frame()
            problems += [f"chain {chain} kill {attempt}: {p}" for p in _whole_steps(frame)]
            if child.exitcode == 0:
                break
            assert attempt < 3, f"the last writer of chain {chain} exited {child.exitcode}"
            # resumed from a checkpoint at or before the last step written
            done = int(frame["step"].max()) if len(frame) else 0
            written = rng.randint(max(0, done - 6), done)
            _resume(path, written)
            frame = RunDir(path).read_layers_frame()
            got = sorted(frame["step"].unique()) if len(frame) else []
            if got != list(range(1, written + 1)):
                problems.append(f"chain {chain}: resumed at {written}, holds {got[-3:]}")
        frame = RunDir(path).read_layers_frame()
        problems += [f"chain {chain} end: {p}" for p in _whole_steps(frame)]
        if frame["step"].nunique() != STEPS:
            problems.append(f"chain {chain} ends with {frame['step'].nunique()} steps")
        assert RunDir(path).compact_layers()
        problems += [f"chain {chain} compacted: {p}"
                     for p in _whole_steps(RunDir(path).read_layers_frame())]
        problems += [f"chain {chain}: {name} left" for name in leftovers(path)]
    record("SIGKILL of the writer of Parquet statistics parts, then resume", "process killed",
           kills, f"every kill read back as whole steps; {chains} chains resumed to the end "
           "with no row lost or repeated", problems, data_lost=len(problems))
    assert not problems, problems[:10]


def test_a_kill_inside_a_merge_or_a_resume_rewrite_loses_no_row(tmp_path, monkeypatch):
    path = tmp_path / "run"
    child = _start(path, 1, 10, kill_in="merge")
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    parts = sorted(p.name for p in RunDir(path).layers_parts_dir.iterdir())
    assert rundir.part_name(1, 4) in parts and rundir.part_name(1, 1) in parts  # both there
    frame = RunDir(path).read_layers_frame()
    problems = _whole_steps(frame)
    assert frame["step"].nunique() == 4
    # a resume whose rewrite of the straddling part is killed after its rename
    write = rundir._write_part

    def write_then_die(folder, lo, hi, table):
        write(folder, lo, hi, table)
        raise KeyboardInterrupt  # stands for the kill: nothing after the rename runs

    monkeypatch.setattr(rundir, "_write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _resume(path, 2)
    monkeypatch.setattr(rundir, "_write_part", write)
    problems += [f"after the killed rewrite: {p}" for p in _whole_steps(RunDir(path)
                                                                        .read_layers_frame())]
    _resume(path, 2)  # the resume after it
    frame = RunDir(path).read_layers_frame()
    assert sorted(frame["step"].unique()) == [1, 2]
    child = _start(path, 3, 12)
    child.join(300)
    frame = RunDir(path).read_layers_frame()
    problems += _whole_steps(frame)
    assert frame["step"].nunique() == 12
    record("SIGKILL inside a merge of Parquet parts and inside a resume's rewrite",
           "process killed", 2, "every row read once, none lost", problems,
           data_lost=len(problems))
    assert not problems, problems


def test_readers_while_the_parts_are_written_merged_and_compacted(tmp_path):
    path = tmp_path / "run"
    run = RunDir(path)
    child = _start(path, 1, STEPS, compact=True)
    tail = run.tail_layers()
    problems, reads, seen = [], 0, 0
    while True:
        alive = child.is_alive()
        frame = run.read_layers_frame()
        reads += 1
        problems += [f"read {reads}: {p}" for p in _whole_steps(frame)]
        steps = frame["step"].nunique() if len(frame) else 0
        if steps < seen:
            problems.append(f"read {reads}: {steps} steps after {seen}")
        seen = max(seen, steps)
        tail.read()
        tail_frame = pd.DataFrame.from_records(tail.rows)
        problems += [f"tail read {reads}: {p}" for p in _whole_steps(tail_frame)]
        if not alive:
            break
    child.join(60)
    assert child.exitcode == 0
    assert run.layers_files() == [run.layers_parquet_file]
    tail.read()
    final = pd.DataFrame.from_records(tail.rows)
    problems += _whole_steps(final)
    if final["step"].nunique() != STEPS:
        problems.append(f"the tail ends with {final['step'].nunique()} steps")
    record("readers of Parquet statistics while they are written, merged and compacted",
           "concurrent reads", reads, "every read whole steps, never fewer than before",
           problems, data_lost=len(problems))
    assert reads >= 5 and not problems, (reads, problems[:10])


def _train(argv: list[str], log: str) -> None:
    """Body of a training process that writes its statistics as Parquet parts (the tiny
    model logs fewer tensors per step than a large one: the threshold is lowered)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    rundir.LAYERS_PARTS_MIN_ROWS = 1
    rundir.LAYERS_PARTS_MERGE = 2
    from spider.train import main

    try:
        main(argv)
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def test_a_training_run_writing_parts_killed_and_resumed_equals_the_uninterrupted_one(
        tmp_path, reference):
    import spider.train  # noqa: F401  (imported once here, not in every child)

    ref, duration = reference
    rng = random.Random(7)
    problems, kills = [], 0
    for chain in range(2):
        path = tmp_path / f"chain-{chain}"
        for attempt in range(3):
            resume = (path / "run.json").exists()
            argv = ["--output-dir", str(path), *(["--resume"] if resume else TINY)]
            child = _FORK.Process(target=_train, args=(argv, str(tmp_path / f"{chain}.log")))
            child.start()
            if attempt == 0:
                parts_dir, alive = RunDir(path).layers_parts_dir, child.is_alive
                wait_for(lambda: parts_dir.is_dir() or not alive(), timeout=300)  # noqa: B023
                time.sleep(rng.uniform(0.0, 0.5) * duration)
                if child.is_alive():
                    os.kill(child.pid, signal.SIGKILL)
                    kills += 1
                    child.join(60)
                    if (path / "run.json").exists():
                        found = read_back(path)
                        problems += [f"chain {chain} kill: {d}" for d in differences(found, ref)]
                    continue
            child.join(600)
            assert child.exitcode == 0, (tmp_path / f"{chain}.log").read_text()[-3000:]
            break
        found = read_back(path)
        problems += [f"chain {chain} end: {d}" for d in differences(found, ref)]
        problems += [f"chain {chain} end lacks {m}" for m in missing(found, ref)]
        run = RunDir(path)
        if found.status != "done" or run.layers_files() != [run.layers_parquet_file]:
            problems.append(f"chain {chain}: {found.status}, statistics in "
                            f"{[p.name for p in run.layers_files()]}")
        problems += [f"chain {chain}: {name} left" for name in leftovers(path)]
    record("SIGKILL of a training run writing Parquet statistics, then --resume",
           "process killed", kills, "the finished run equals the uninterrupted one (its "
           "statistics in layers.jsonl) in every row, event and checkpoint", problems,
           data_lost=len(problems))
    assert not problems, problems[:10]
