"""analysis.worked_example: the Learn page's example is SPIDER's own rule, step by step."""

import dataclasses

import numpy as np
import pytest
import torch

from analysis.figures.learn import Panel, example_history, matrix_grid, tie_scatter
from analysis.worked_example import (
    HISTORY_COLUMNS,
    ExampleSettings,
    ExampleStep,
    _draws,
    example_summary,
    near_tie,
    run_worked_example,
)
from spider.importance import rank
from spider.methods.spider import SpiderOptions, keep_weight

OPTIONS = [
    {},
    {"mask": "binary"},
    {"normalize": False},
    {"accumulate": "abs"},
    {"accumulate": "fisher", "mask": "binary", "normalize": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(map(str, o.values())) or "paper")
def test_every_step_is_spiders_rule(options, one_thread):
    example = run_worked_example(ExampleSettings(steps=6, seed=3, **options))
    theta0 = torch.from_numpy(example.theta0)
    opts = SpiderOptions(**options)
    assert np.array_equal(example.steps[0].importance_pre, rank(theta0).numpy())
    for step in example.steps:
        grad_sum = torch.from_numpy(step.grad_sum)
        w, _ = keep_weight(theta0, grad_sum, opts)
        assert np.array_equal(step.mask, w.numpy())
        assert np.array_equal(step.importance_ft, rank(grad_sum).numpy())
        # the merge: theta = theta0 + w * (theta_sgd - theta0)
        merged = example.theta0 + step.mask * (step.proposed - example.theta0)
        np.testing.assert_allclose(step.merged, merged, rtol=0, atol=1e-6)
        assert np.all(step.merged[step.mask == 0] == example.theta0[step.mask == 0])


@pytest.mark.parametrize("accumulate", ["signed", "abs", "fisher"])
def test_the_sum_s_accumulates_the_task_gradient(accumulate, one_thread):
    settings = ExampleSettings(steps=2, seed=1, noise=0.5, accumulate=accumulate)
    example = run_worked_example(settings)
    theta0, target, noise = _draws(settings)
    grad1 = (theta0 - target + noise[0]).numpy()  # d/dθ of 0.5|θ − target|² + <θ, noise>
    np.testing.assert_allclose(example.steps[0].grad, grad1, rtol=1e-6, atol=1e-6)
    as_summed = {"signed": lambda g: g, "abs": np.abs, "fisher": np.square}[accumulate]
    np.testing.assert_allclose(example.steps[0].grad_sum, as_summed(grad1), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(example.steps[1].grad_sum,
                               as_summed(grad1) + as_summed(example.steps[1].grad),
                               rtol=1e-5, atol=1e-5)
    # SGD: the proposed step is the previous merged weight minus lr * grad
    np.testing.assert_allclose(example.steps[1].proposed,
                               example.steps[0].merged - settings.lr * example.steps[1].grad,
                               rtol=1e-6, atol=1e-6)


def test_ablations_change_the_mask_as_documented(one_thread):
    paper = run_worked_example(ExampleSettings(steps=5, seed=2))
    raw = run_worked_example(ExampleSettings(steps=1, seed=2, normalize=False)).last
    binary = run_worked_example(ExampleSettings(steps=5, seed=2, mask="binary")).last
    # binary: 1 exactly where G > I
    assert set(np.unique(binary.mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(binary.mask, (binary.importance_ft > binary.importance_pre))
    # no normalisation: the raw ratio G / (I + G) where G > I
    free = raw.importance_ft > raw.importance_pre
    ratio = raw.importance_ft / (raw.importance_pre + raw.importance_ft)
    np.testing.assert_allclose(raw.mask[free], ratio[free], rtol=1e-6)
    assert np.all(raw.mask[~free] == 0) and np.all(raw.mask[free] > 0.5)
    # the paper's rule: normalised to mean 1 over the free entries, capped at 1
    w = paper.last.mask
    assert w.max() == 1.0 and 0 < (w == 1).mean() < (w > 0).mean()
    summary = example_summary(paper.last)
    assert summary["free_share"] == pytest.approx((w > 0).mean())
    assert summary["pinned_share"] + summary["free_share"] == pytest.approx(1.0)
    assert summary["mask_mean"] == pytest.approx(float(w.mean()), rel=1e-6)


def test_history_compares_spider_with_plain_fine_tuning(one_thread):
    example = run_worked_example(ExampleSettings(steps=12, seed=0))
    history = example.history
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert len(history) == 24 and set(history["method"]) == {"spider", "full"}
    spider = history[history["method"] == "spider"].set_index("step")
    full = history[history["method"] == "full"].set_index("step")
    last = example.last
    assert spider.loc[12, "drift"] == pytest.approx(
        np.linalg.norm(last.merged - example.theta0) / np.linalg.norm(example.theta0), rel=1e-5)
    assert full.loc[12, "drift"] == pytest.approx(
        np.linalg.norm(last.full - example.theta0) / np.linalg.norm(example.theta0), rel=1e-5)
    assert spider.loc[12, "mask_density"] == pytest.approx((last.mask > 0).mean())
    assert full["mask_density"].isna().all()
    weight = np.abs(example.theta0)
    assert spider.loc[12, "upstream_loss"] == pytest.approx(
        (weight * (last.merged - example.theta0) ** 2).sum() / weight.sum(), rel=1e-5)
    # the page's story: pinning keeps SPIDER closer to theta0 than plain fine-tuning, and
    # forgets less of the toy's old tasks
    assert spider.loc[12, "drift"] < full.loc[12, "drift"]
    assert spider.loc[12, "upstream_loss"] < full.loc[12, "upstream_loss"]
    # and both learn the task (the loss falls from step 1)
    assert spider.loc[12, "task_loss"] < spider.loc[1, "task_loss"]


def test_seed_draws_a_new_example_and_is_reproducible(one_thread):
    a = run_worked_example(ExampleSettings(steps=3, seed=7))
    b = run_worked_example(ExampleSettings(steps=3, seed=7))
    c = run_worked_example(ExampleSettings(steps=3, seed=8))
    assert np.array_equal(a.last.mask, b.last.mask) and np.array_equal(a.theta0, b.theta0)
    assert not np.array_equal(a.theta0, c.theta0)


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="steps"):
        ExampleSettings(steps=0)
    with pytest.raises(ValueError, match="lr"):
        ExampleSettings(lr=-1.0)
    with pytest.raises(ValueError, match="noise"):
        ExampleSettings(noise=float("nan"))
    with pytest.raises(ValueError, match="mask"):
        run_worked_example(ExampleSettings(mask="soft"))


def _step(pre: np.ndarray, ft: np.ndarray, mask: np.ndarray) -> ExampleStep:
    zeros = np.zeros_like(pre)
    return ExampleStep(step=1, grad=zeros, grad_sum=zeros, importance_pre=pre,
                       importance_ft=ft, mask=mask, proposed=zeros, merged=zeros, full=zeros)


def test_near_tie_counts_float32_steps_to_the_tie():
    pre = np.array([[0.5, 0.25, 0.75]], dtype=np.float32)
    one_up = np.nextafter(np.float32(0.75), np.float32(1))
    ft = np.array([[0.6, np.float32(0.25) - 4 * np.spacing(np.float32(0.25)), one_up]],
                  dtype=np.float32)
    mask = np.array([[1.0, 0.0, 0.9]], dtype=np.float32)
    tie = near_tie(_step(pre, ft, mask), n=3)
    assert list(zip(tie["row"], tie["col"])) == [(0, 2), (0, 1), (0, 0)]
    assert tie["ulps"].tolist()[:2] == [1.0, 4.0]
    assert tie["side"].iloc[0].startswith("G > I") and tie["side"].iloc[1].startswith("G ≤ I")
    assert tie["gap"].iloc[0] == pytest.approx(float(one_up) - 0.75)


def test_learn_figures_print_the_values_and_stay_small(one_thread):
    from analysis.figures import figure_json_size

    example = run_worked_example(ExampleSettings(steps=4))
    last = example.last
    fig = matrix_grid([[Panel("I", last.importance_pre, "importance"),
                        Panel("G", last.importance_ft, "importance"),
                        Panel("w", last.mask, "mask")],
                       [Panel("a", last.proposed - example.theta0, "signed", "d"),
                        Panel("b", last.merged - example.theta0, "signed", "d"), None]],
                      marked=[(0, 1)], marked_label="closest")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert [t.name for t in heatmaps] == ["I", "G", "w", "a", "b"]
    np.testing.assert_array_equal(np.asarray(heatmaps[2].z), last.mask)
    assert heatmaps[2].texttemplate == "%{z:.2f}" and (heatmaps[2].zmin, heatmaps[2].zmax) == (0, 1)
    # the two update panels share one symmetric range
    bound = max(np.abs(last.proposed - example.theta0).max(),
                np.abs(last.merged - example.theta0).max())
    assert heatmaps[3].zmax == pytest.approx(bound) and heatmaps[4].zmin == pytest.approx(-bound)
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(marks) == 5 and sum(bool(t.showlegend) for t in marks) == 1
    assert figure_json_size(fig) < 100_000
    history = example_history(example.history, current_step=4)
    assert {t.name for t in history.data} == {"SPIDER", "plain fine-tuning"}
    scatter = tie_scatter(last.importance_pre, last.importance_ft, last.mask, marked=[(0, 1)])
    x = np.asarray(scatter.data[0].x)
    np.testing.assert_allclose(x, (last.importance_ft.astype(np.float64)
                                   - last.importance_pre).ravel())
    assert np.all(np.asarray(scatter.data[0].y)[x <= 0] == 0)


def test_settings_are_hashable_for_caching():
    settings = ExampleSettings()
    assert hash(settings) == hash(dataclasses.replace(settings))
