"""Statistics agree with checkpoints (ARCHITECTURE.md, "The run directory"): a
``layers.jsonl`` row of step k describes the weights the checkpoint of step k holds, and
the final step's rows are taken after ``finalize``, where a post-hoc method acts.

Checked from outside, on a run of a post-hoc method (DARE: drop 90 % of the update, rescale
the rest, at ``finalize``): every row's ``update_norm`` and ``theta0_norm`` against the norms
of the checkpoint's ``delta`` (theta - theta0) and of theta0, read back through the analysis
layer. Statistics taken before ``finalize`` would describe the update DARE then dropped.
"""

from __future__ import annotations

import math

import pytest
from harness import TINY, Trainer, record

import analysis
from spider.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7)


def test_every_statistics_row_describes_its_checkpoint_after_finalize(tmp_path):
    path = tmp_path / "run"
    argv = list(TINY)
    argv[argv.index("--method") + 1] = "dare"
    child = Trainer(["--output-dir", str(path), *argv], tmp_path / "run.log")
    assert child.wait() == 0, child.output()[-2000:]
    run = analysis.load_run(path)
    layers = run.layers
    problems, lost, compared = [], [], 0  # lost: rows that do not describe their checkpoint
    for step in run.steps:
        rows = layers[layers["step"] == step]
        if rows.empty:
            problems.append(f"no statistics rows at checkpoint step {step}")
        for row in rows.itertuples():
            delta = float(run.tensor(step, row.param, "delta").double().norm())
            theta0 = float(run.theta0(row.param).double().norm())
            compared += 1
            if not _close(row.update_norm, delta):
                lost.append(f"step {step} {row.param}: update_norm {row.update_norm} but "
                                f"the checkpoint's update has norm {delta}")
            if not _close(row.theta0_norm, theta0):
                lost.append(f"step {step} {row.param}: theta0_norm {row.theta0_norm} but "
                                f"theta0 has norm {theta0}")
    finalized = [RunDir(path).checkpoint_meta(s).finalized for s in run.steps]
    if finalized != [s == run.steps[-1] for s in run.steps]:
        problems.append(f"checkpoints' finalized flags {finalized} for steps {run.steps}")
    record("statistics of a post-hoc method (DARE) checked against its checkpoints",
           "statistics agree with checkpoints", compared,
           f"every layers.jsonl row at a checkpoint step ({compared} rows, steps "
           f"{run.steps}) has the norms of that checkpoint's update and theta0; the final "
           "rows describe the weights after finalize", problems + lost, data_lost=len(lost),
           finalized=finalized)
    assert not problems + lost, (problems + lost)[:10]
