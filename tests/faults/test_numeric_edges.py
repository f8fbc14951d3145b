"""NaN and inf in gradients or weights, a zero or non-finite learning rate, a one-step run,
a dataset smaller than a batch: each has a defined outcome, checked here.

(A non-finite *loss* from a huge --lr is tested in tests/spider/test_train.py.)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from harness import TINY, Trainer, changed, differences, read_back, record, snapshot
from safetensors.torch import load_file, save_file

from spider.loop import BatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"


def _last_line(child: Trainer) -> str:
    lines = [line for line in child.output().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _all_saved_tensors_finite(path: Path) -> bool:
    files = list(path.rglob("*.safetensors"))
    return all(t.is_floating_point() is False or bool(torch.isfinite(t).all())
               for f in files for t in load_file(f).values())


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_weights_change(tmp_path, reference):
    ref, _ = reference
    path = tmp_path / "run"
    child = Trainer(["--output-dir", str(path), *TINY], tmp_path / "run.log",
                    faults={"nan_gradient_at_step": 3})
    code = child.wait()
    problems = []
    if code != 1 or not _last_line(child).startswith("failed: ") or \
            "not finite at step 3" not in _last_line(child):
        problems.append(f"exit {code}, last line {_last_line(child)!r}")
    if "Traceback" in child.output():
        problems.append("a traceback was printed")
    found = read_back(path)
    if found.status != "failed":
        problems.append(f"status {found.status}")
    lost = differences(found, ref)  # the step-2 checkpoint and logs equal the reference
    if sorted(found.checkpoints) != [2]:
        problems.append(f"checkpoints {sorted(found.checkpoints)}, not [2]")
    if not _all_saved_tensors_finite(path):
        problems.append("a saved tensor holds NaN or inf")
    record("NaN in a gradient while the loss is finite (step 3)", "numeric edge", 1,
           "exit 1, 'failed: the gradient is not finite at step 3', status failed, the "
           "step-2 checkpoint equal to the uninterrupted run's, nothing non-finite saved",
           problems + lost, data_lost=len(lost))
    assert not problems + lost, problems + lost


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_base_model_with_non_finite_weights_fails_cleanly(tmp_path, value):
    model = tmp_path / "model"
    shutil.copytree(BASE, model)
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if "layers.1.mlp.down_proj" in n)
    weights[name].view(-1)[7] = float(value)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    path = tmp_path / "run"
    before = snapshot(model)
    child = Trainer(["--output-dir", str(path), *TINY, "--model", str(model)],
                    tmp_path / "run.log")
    code = child.wait()
    lost = changed(before, snapshot(model))  # a refused run changes none of its input
    problems = []
    last = _last_line(child)
    # the model is at fault, not the learning rate: named at load, before anything is written
    if code != 2 or not last.startswith("error: ") or "not finite" not in last or \
            "layers.1.mlp.down_proj.weight" not in last or "--model" not in last or "--lr" in last:
        problems.append(f"exit {code}, last line {last!r}")
    if "Traceback" in child.output():
        problems.append("a traceback was printed")
    if path.exists() and any(path.iterdir()):
        problems.append(f"the run folder was written: {sorted(p.name for p in path.iterdir())}")
    record(f"a base model with one {value} entry in a trained weight", "numeric edge", 1,
           "exit 2 before anything is written, one line naming --model and the weight "
           "that is not finite, no traceback", problems + lost, data_lost=len(lost))
    assert not problems + lost, problems + lost


@pytest.mark.parametrize("lr, message", [("0", "--lr must be positive"),
                                          ("nan", "--lr must be a finite number"),
                                          ("inf", "--lr must be a finite number"),
                                          ("-1e-4", "--lr must not be negative")])
def test_a_zero_or_non_finite_learning_rate_is_refused_before_anything_is_written(
        tmp_path, lr, message):
    path = tmp_path / "run"
    before = snapshot(BASE)
    child = Trainer(["--output-dir", str(path), *TINY, f"--lr={lr}"], tmp_path / "run.log")
    code = child.wait()
    problems = changed(before, snapshot(BASE))  # a refused run changes none of its input
    lost = list(problems)
    if code != 2 or _last_line(child) != f"error: {message}" and message not in _last_line(child):
        problems.append(f"exit {code}, last line {_last_line(child)!r}")
    if path.exists():
        problems.append("the run directory was created")
    record(f"--lr {lr}", "numeric edge", 1, f"exit 2, 'error: {message}', nothing written",
           problems, data_lost=len(lost))
    assert not problems, problems


def _tiny_with(flag: str, value: str) -> list[str]:
    """The tiny run's flags with ``flag`` set to ``value``."""
    argv = list(TINY)
    argv[argv.index(flag) + 1] = value
    return argv


def _lacking(found, train, checkpoints, evaluated, logged) -> list[str]:
    """What a finished run lacks of what it must hold: train events, complete checkpoints,
    evaluations and statistics rows of the given steps (each checkpoint holding weights)."""
    out = [f"train step {s}" for s in train if s not in found.train]
    out += [f"checkpoint {s}" for s in checkpoints
            if not found.checkpoints.get(s, {}).get("weights")]
    out += [f"evaluation at {s}" for s in evaluated if s not in {k[0] for k in found.evals}]
    out += [f"statistics at {s}" for s in logged if s not in {k[0] for k in found.layers}]
    return out


def test_a_one_step_run_evaluates_saves_and_summarises(tmp_path):
    path = tmp_path / "run"
    argv = _tiny_with("--steps", "1")
    child = Trainer(["--output-dir", str(path), *argv], tmp_path / "run.log")
    code = child.wait()
    found = read_back(path)
    problems = []
    if code != 0 or found.status != "done":
        problems.append(f"exit {code}, status {found.status}: {child.output()[-500:]}")
    if sorted(found.train) != [1] or sorted(found.checkpoints) != [1]:
        problems.append(f"train steps {sorted(found.train)}, checkpoints "
                        f"{sorted(found.checkpoints)}")
    if sorted({k[0] for k in found.evals}) != [0, 1]:
        problems.append(f"evaluated at {sorted({k[0] for k in found.evals})}, not [0, 1]")
    summary = json.loads((path / "run.json").read_text()).get("summary", {})
    if set(summary) != {"U", "D", "H", "E", "F", "O"} or not all(
            math.isfinite(v) for v in summary.values()):
        problems.append(f"summary {summary}")
    if not {k[1] for k in found.layers} or {k[0] for k in found.layers} != {1}:
        problems.append("statistics not logged at step 1")
    lost = _lacking(found, train=[1], checkpoints=[1], evaluated=[0, 1], logged=[1])
    record("a one-step run (--steps 1)", "numeric edge", 1,
           "done: 1 train event, evaluation at 0 and 1, checkpoint 1, statistics at 1, a "
           "finite summary", problems + lost, data_lost=len(lost))
    assert not problems + lost, problems + lost


def test_a_dataset_smaller_than_a_batch_repeats_examples_within_the_batch(tmp_path):
    # the sampler draws batch after batch from seeded permutations, epoch after epoch: a
    # batch of 4 from 2 examples holds each twice
    sampler = BatchSampler(2, 4, 1, seed=0)
    batches = [sampler.indices(step, 0)[0] for step in range(5)]
    problems = [f"step {s}: {b}" for s, b in enumerate(batches) if sorted(b) != [0, 0, 1, 1]]
    path = tmp_path / "run"
    argv = _tiny_with("--train-size", "2")
    child = Trainer(["--output-dir", str(path), *argv], tmp_path / "run.log")
    code = child.wait()
    found = read_back(path)
    if code != 0 or found.status != "done" or sorted(found.train) != list(range(1, 7)):
        problems.append(f"exit {code}, status {found.status}, steps {sorted(found.train)}")
    if not all(math.isfinite(row["loss"]) for row in found.train.values()):
        problems.append("a non-finite loss")
    lost = _lacking(found, train=range(1, 7), checkpoints=[2, 4, 6], evaluated=[0, 3, 6],
                    logged=range(1, 7))
    record("a training set of 2 examples with --batch-size 4", "numeric edge", 1,
           "done: every batch holds each example twice (whole epochs, seeded), 6 finite "
           "losses", problems + lost, data_lost=len(lost))
    assert not problems + lost, problems + lost
