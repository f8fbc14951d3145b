"""The statistics vocabulary (spider/statistics.py) and the statistic added through it,
mask_churn: exact, and exact again after a resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spider import rundir
from spider import statistics as S
from spider.methods import STAT_COLUMNS, available_methods, build_method, method_class


def test_the_vocabulary_defines_the_columns_everyone_reads():
    assert STAT_COLUMNS == S.METHOD_COLUMNS
    assert rundir.STATISTICS_COLUMNS == ("step", "param", "numel", *S.LAYERS_FILE_COLUMNS)
    assert len(set(S.STATISTICS)) == len(S.STATISTICS)
    labels = [s.label for s in S.STATISTICS.values()]
    assert len(set(labels)) == len(labels)  # a label names one statistic
    for stat in S.STATISTICS.values():
        assert stat.pooling in ("mean", "sum", "max", "derived")
        assert stat.colorscale in ("sequential", "diverging")
        assert stat.source in ("method", "runner", "layer")
        assert format(0.5, stat.fmt)  # a valid format for Python (and d3)
    assert S.get("discrepancy_mean").colorscale == "diverging"  # signed: around 0
    assert set(S.heatmap_values()) >= {"mask_density", "mask_mean", "mask_churn",
                                       "update_rel_norm", "discrepancy_mean"}
    assert list(S.heatmap_values())[0] == "mask_density"  # the default view first
    with pytest.raises(KeyError, match="known"):
        S.get("nonsense")


def test_labels_and_formats():
    assert S.label("mask_density") == "share of weights free to move (w > 0)"
    assert S.label("not_a_statistic") == "not_a_statistic"
    assert S.format_value("mask_density", 0.4321) == "43.2%"
    assert S.format_value("mask_mean", 0.5) == "0.5000"
    assert S.format_value("mask_churn", math.nan) == "–"
    assert S.format_value("mask_churn", None) == "–"
    assert S.is_percent("frac_ft_gt_pre") and not S.is_percent("update_rel_norm")
    assert S.value_range("mask_density") == (0.0, 1.0)


def test_which_methods_report_what():
    assert S.reported_by("importance_pre_mean", "spider")
    assert not S.reported_by("importance_pre_mean", "full")
    assert S.reported_by("update_norm", "lora")
    assert S.reported_by("mask_churn", "hft")
    assert not S.reported_by("mask_churn", "lora")  # no per-weight mask
    for name in available_methods():
        assert S.reported_by("mask_density", name) == method_class(name).has_masks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _step(model, method, optimizer, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    penalty = method.loss_penalty()
    (loss + (penalty if penalty is not None else 0)).backward()
    method.before_optimizer_step()
    optimizer.step()
    method.after_optimizer_step()
    optimizer.zero_grad()


def _run(name, steps, log_every, method=None, model=None, optimizer=None, start=0):
    """Train ``steps`` steps, statistics on every ``log_every``-th as the runner takes them
    (collected by the update); returns the churn per logged step and what was used."""
    if method is None:
        model = Net()
        method = build_method(name, model)
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    churn, sides = {}, {}
    for step in range(start + 1, start + steps + 1):
        method.collect_statistics = step % log_every == 0
        method._last_statistics = {}
        _step(method.model, method, optimizer, step)
        if step % log_every == 0:
            churn[step] = {n: row["mask_churn"] for n, row in method.statistics().items()}
            sides[step] = {n: w > 0 for n, w in method.masks().items()}
    return churn, sides, (method, model, optimizer)


@pytest.mark.parametrize("name", ["spider", "hft", "full"])
def test_mask_churn_is_the_share_of_entries_whose_mask_side_changed(name):
    churn, sides, _ = _run(name, 12, 2)
    steps = sorted(churn)
    assert all(math.isnan(v) for v in churn[steps[0]].values())  # nothing to compare with
    for before, now in zip(steps, steps[1:]):
        for param, value in churn[now].items():
            expected = float((sides[now][param] != sides[before][param]).double().mean())
            assert value == pytest.approx(expected, abs=1e-12), (name, now, param)
    if name == "full":
        assert all(v == 0.0 for s in steps[1:] for v in churn[s].values())
    if name == "spider":  # the mask of a young run moves
        assert any(v > 0 for s in steps[1:] for v in churn[s].values())


@pytest.mark.parametrize("name", ["spider", "hft"])
def test_mask_churn_after_a_resume_is_the_uninterrupted_runs(name):
    straight, _, _ = _run(name, 12, 3)
    first, _, (method, model, optimizer) = _run(name, 7, 3)  # stops between two logged steps
    state = method.state_dict()
    assert any(k.startswith("mask_side/") for k in state["tensors"])
    weights = {n: p.detach().clone() for n, p in method.params.items()}
    opt_state = optimizer.state_dict()
    # a fresh process: the model, the method and the optimizer rebuilt from the saved state
    model2 = Net()
    method2 = build_method(name, model2)
    with torch.no_grad():
        for n, p in method2.params.items():
            p.copy_(weights[n])
    method2.load_state_dict(state)
    optimizer2 = torch.optim.SGD(method2.trainable_parameters(), lr=0.5)
    optimizer2.load_state_dict(opt_state)
    resumed, _, _ = _run(name, 5, 3, method2, model2, optimizer2, start=7)
    got = {**first, **resumed}
    assert sorted(got) == sorted(straight)
    for step in straight:
        for param, value in straight[step].items():
            assert (math.isnan(value) and math.isnan(got[step][param])) or \
                value == got[step][param], (step, param)


def test_a_state_saved_before_mask_churn_still_loads():
    method = build_method("spider", Net())
    state = method.state_dict()
    assert not any(k.startswith("mask_side/") for k in state["tensors"])
    other = build_method("spider", Net())
    other.load_state_dict(state)  # no sides: the churn starts again (NaN at the next log)
    other.collect_statistics = True
    _step(other.model, other, torch.optim.SGD(other.trainable_parameters(), lr=0.1), 1)
    assert all(math.isnan(r["mask_churn"]) for r in other.statistics().values())


def test_dowsers_importance_has_no_rank_range_nor_rank_format():
    """Dowser fills the pre-training importance with its own score (unbounded, often tiny):
    no 0–1 colour range, and a format that does not print a small score as 0.0000."""
    for name in ("importance_pre_mean", "importance_pre_sq_mean"):
        assert S.value_range(name) == (0.0, 1.0)
        assert S.value_range(name, "spider") == (0.0, 1.0)
        assert S.value_range(name, "dowser") is None
        assert S.fmt(name, "dowser") == ".4g" and S.fmt(name, "spider") == ".4f"
    assert S.format_value("importance_pre_mean", 3e-7, "dowser") == "3e-07"
    assert S.format_value("importance_pre_mean", 0.51234, "spider") == "0.5123"
    assert S.value_range("mask_density", "dowser") == (0.0, 1.0)  # no override: the range
    assert not S.is_percent("importance_pre_mean", "dowser")
