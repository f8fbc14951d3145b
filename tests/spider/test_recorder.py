"""The one run recorder (spider/recorder.py) both runners write through."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spider.methods import build_method
from spider.recorder import RunRecorder, run_summary, statistics_rows
from spider.rundir import RunDir, RunInfoWriter


def _eval(step, split, value):
    return {"event": "eval", "step": step, "split": split, "metric": "score", "value": value}


def test_the_summary_compares_step_0_with_the_last_step_that_has_both_scores():
    events = [_eval(0, "upstream", 0.8), _eval(0, "downstream", 0.2),
              _eval(5, "upstream", 0.7), _eval(5, "downstream", 0.6),
              _eval(9, "upstream", 0.75)]  # incomplete: not the end
    summary = run_summary(events)
    assert summary["U"] == pytest.approx(0.7) and summary["D"] == pytest.approx(0.6)
    assert run_summary(events[2:]) is None  # no base scores


def test_rows_measure_the_update_from_the_start_weights_and_the_run_json_is_shared(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    method = build_method("full", model)
    theta0 = {n: t.detach().clone() for n, t in method.effective_weights().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    rows = statistics_rows(7, {"weight": {"mask_mean": 1.0}}, method.effective_weights(), theta0)
    by = {r.param: r.to_json() for r in rows}
    assert by["weight"]["update_norm"] == pytest.approx(math.sqrt(12))
    assert by["bias"]["update_norm"] == 0.0 and by["weight"]["mask_mean"] == 1.0
    assert math.isnan(by["bias"]["mask_mean"])

    run = RunDir(tmp_path / "run")
    recorder = RunRecorder(run, method, theta0, RunInfoWriter(run, {}))
    recorder.start(config={"steps": 2}, model=None, seed=0, device="cpu",
                   parallel={"mode": "none", "world_size": 1}, trainable={}, steps=2)
    info = run.read_run()
    assert info["method"] == "full" and info["status"] == "running" and "pid" in info
    assert info["progress"] == {"step": 0, "steps": 2} and "versions" in info
    recorder.write_statistics(2, method.statistics())
    recorder.write_statistics(2, method.statistics())  # once per step
    assert [r["step"] for r in run.read_layers()] == [2, 2]
    run.append_events([_eval(0, "upstream", 0.8), _eval(0, "downstream", 0.2),
                       _eval(2, "upstream", 0.7), _eval(2, "downstream", 0.6)])
    done = recorder.done(2)
    assert done["status"] == "done" and done["summary"]["D"] == pytest.approx(0.6)
    recorder.resumed(2)
    assert run.read_run()["status"] == "running" and run.read_run()["resumed_at_step"] == 2
