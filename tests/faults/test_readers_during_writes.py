"""The analysis layer reads a run while it is being written, over and over.

A training child writes the tiny run; meanwhile this process opens it again and again as the
app and a notebook do (``load_run``, ``list_runs``, ``Run.metrics`` / ``train`` /
``layers``, ``Run.tensor`` of the latest checkpoint) and compares everything it got with the
uninterrupted run: a torn file read as valid would differ; a reader tripping over a write
would raise.
"""

from __future__ import annotations

import time

import pytest
from harness import TINY, Trainer, record, torch_equal

import analysis

pytestmark = pytest.mark.usefixtures("one_thread")


def _read_once(path, reference, param: str, light: bool = False) -> list[str]:
    """One round of reads; the differences from the reference found (empty: none).
    ``light`` leaves out ``list_runs`` and the mask (the slowest reads) to read more often."""
    problems = []
    run = analysis.load_run(path)
    if not light:
        listed = analysis.list_runs(path.parent)
        if len(listed) != 1:
            problems.append(f"list_runs found {len(listed)} runs")
    for row in run.train.itertuples():
        expected = reference.train.get(int(row.step))
        if expected is None or expected["loss"] != row.loss:
            problems.append(f"train step {row.step}: loss {row.loss} vs {expected}")
    for row in run.metrics.itertuples():
        expected = reference.evals.get((int(row.step), row.split, row.metric))
        if expected is None or expected["value"] != row.value:
            problems.append(f"eval {row.step} {row.split} {row.metric}: {row.value} vs "
                            f"{expected}")
    layers = run.layers
    for row in layers[["step", "param", "update_norm"]].itertuples():
        expected = reference.layers.get((int(row.step), row.param))
        if expected is None or expected["update_norm"] != row.update_norm:
            problems.append(f"layers {row.step} {row.param}: differs")
    if run.steps:
        step = run.steps[-1]
        weight = run.tensor(step, param, "weight")
        if not torch_equal(weight, reference.checkpoints[step]["weights"][param].float()):
            problems.append(f"Run.tensor({step}, {param}, 'weight') differs")
        mask = run.tensor(step, param, "mask") if not light else weight.clamp(0, 1)
        if not (0 <= float(mask.min()) and float(mask.max()) <= 1):
            problems.append(f"mask of {param} at {step} outside [0, 1]")
    return problems


def test_the_analysis_layer_reads_a_run_being_written_without_errors(tmp_path, reference):
    ref, _ = reference
    param = next(n for n in ref.checkpoints[6]["weights"] if "down_proj" in n)
    path = tmp_path / "runs" / "run"
    child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "run.log")
    rounds, before_run_json, problems, errors = 0, 0, [], []
    steps_seen = set()
    while child.alive():
        if not (path / "run.json").exists():
            before_run_json += 1
            time.sleep(0.01)
            continue
        try:
            problems += _read_once(path, ref, param)
            steps_seen.add(len(analysis.load_run(path).train))
        except Exception as err:  # noqa: BLE001 - any error while reading is the finding
            errors.append(f"{type(err).__name__}: {err}")
        rounds += 1
    assert child.wait() == 0, child.output()[-2000:]
    problems += _read_once(path, ref, param)  # and once more, finished
    record("the analysis layer reads a run while it is written (load_run, list_runs, metrics, "
           "train, layers, Run.tensor weight and mask)", "concurrent readers", rounds,
           f"every read whole and equal to the uninterrupted run (seen at {len(steps_seen)} "
           "different stages of the run)", problems + errors, data_lost=len(problems))
    assert not errors, errors[:10]
    assert not problems, problems[:10]
    assert rounds >= 5 and len(steps_seen) >= 3, (rounds, steps_seen)


def test_readers_during_a_resume_that_rewinds_the_run(tmp_path, reference):
    """A killed run continued with --resume drops what came after its resume state (events,
    rows, later checkpoints) and writes it again; readers meanwhile see the run whole."""
    from harness import wait_for

    ref, duration = reference
    param = next(n for n in ref.checkpoints[6]["weights"] if "down_proj" in n)
    path = tmp_path / "runs" / "run"
    child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "run.log")
    # kill once step 5 is logged: the resume state is at step 4, events run ahead of it
    assert wait_for(lambda: (path / "metrics.jsonl").exists()
                    and '"step": 5' in (path / "metrics.jsonl").read_text(), duration * 4,
                    every=0.005) or not child.alive()
    child.kill()
    child = Trainer(["--output-dir", str(path), "--resume"], tmp_path / "resume.log")
    rounds, problems, errors = 0, [], []
    while child.alive():
        try:
            problems += _read_once(path, ref, param, light=True)
        except Exception as err:  # noqa: BLE001 - any error while reading is the finding
            errors.append(f"{type(err).__name__}: {err}")
        rounds += 1
    assert child.wait() == 0, child.output()[-2000:]
    problems += _read_once(path, ref, param)
    record("the analysis layer reads a run while --resume rewinds and rewrites it",
           "concurrent readers", rounds, "every read whole and equal to the uninterrupted run",
           problems + errors, data_lost=len(problems))
    assert not errors, errors[:10]
    assert not problems, problems[:10]
    assert rounds >= 3
