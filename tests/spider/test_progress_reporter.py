"""The progress a run writes to run.json follows the step trained (issue 23, item 2)."""

from __future__ import annotations

from types import SimpleNamespace

from spider.hooks import ProgressReporter
from spider.rundir import RunDir, RunInfoWriter, read_progress

RECORD = {"loss": 1.0, "lr": 1e-4}


def _reporter(tmp_path, interval):
    run = RunDir(tmp_path)
    info = RunInfoWriter(run, {"status": "running", "progress": {"step": 0, "steps": 60}})
    evaluator = SimpleNamespace(seconds=0.0)
    return run, ProgressReporter(10, 60, 0, info, evaluator, SimpleNamespace(is_main=True),
                                 interval=interval)


def test_every_step_is_written_when_steps_are_slower_than_the_interval(tmp_path):
    run, reporter = _reporter(tmp_path, interval=0.0)
    reporter.start()
    for step in range(1, 10):  # none of them a logged step (every 10)
        reporter.after_step(step, RECORD)
        assert read_progress(run).step == step


def test_fast_steps_are_written_at_most_every_interval_and_at_logged_steps(tmp_path):
    run, reporter = _reporter(tmp_path, interval=3600.0)
    reporter.start()
    reporter.after_step(1, RECORD)  # the first is written at once
    assert read_progress(run).step == 1
    for step in range(2, 10):
        reporter.after_step(step, RECORD)
    assert read_progress(run).step == 1  # within the interval: not rewritten
    reporter.after_step(10, RECORD)  # a logged step always is
    assert read_progress(run).step == 10
