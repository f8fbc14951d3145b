"""The lockstep comparison (``lockstep.py``) that the distributed and integration tests rely
on passes a faithful step taken in another summation order, and catches the faults those
tests exist for: a mask from part of a tensor (FSDP without the all-reduce), the hooks at
the wrong point, a gradient that is not the reference's."""

import pytest
import torch
from lockstep import EPS, Adam, adamw, check_spider_step

from spider.methods.spider import keep_weight


def _state(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(64, 48, generator=gen) * 0.05
    p = theta0 + torch.randn(64, 48, generator=gen) * 1e-3
    s = torch.randn(64, 48, generator=gen) * 1e-2
    grad = torch.randn(64, 48, generator=gen) * 1e-2
    adam = Adam(lr=1e-3, exp_avg=grad * 0.1, exp_avg_sq=grad * grad * 1e-3, step=1.0)
    return theta0, p, s, grad, adam


def _step(theta0, p, s, grad, adam, mask_from=None):
    """The SPIDER rule: AdamW, then p <- theta0 + w (p - theta0), w from S + grad."""
    total = s + grad
    stepped = adamw(p, grad, adam)
    w, _ = keep_weight(theta0, total) if mask_from is None else mask_from(total)
    return total, theta0 + w * (stepped - theta0)


def _check(theta0, p, s, grad, adam, other_sum, other_p):
    return check_spider_step("w", theta0, p, s, adam, s + grad, other_sum, other_p, terms=100)


def test_a_faithful_step_with_gradients_summed_in_another_order_passes():
    theta0, p, s, grad, adam = _state()
    noisy = grad * (1 + 4 * EPS * torch.randn(grad.shape, generator=torch.Generator()
                                              .manual_seed(1)))
    total, stepped = _step(theta0, p, s, noisy, adam)
    report = _check(theta0, p, s, grad, adam, total, stepped)
    assert report.problems == [] and 0 < report.free < report.entries


def test_a_mask_from_half_the_tensor_is_caught():
    theta0, p, s, grad, adam = _state()
    half = theta0.shape[0] // 2

    def shard_masks(total):  # each half ranked by its own statistics: no all-reduce
        w0, _ = keep_weight(theta0[:half], total[:half])
        w1, _ = keep_weight(theta0[half:], total[half:])
        return torch.cat([w0, w1]), None

    total, stepped = _step(theta0, p, s, grad, adam, mask_from=shard_masks)
    assert any("single-process rule" in m or "w = 0" in m
               for m in _check(theta0, p, s, grad, adam, total, stepped).problems)


@pytest.mark.parametrize("fault", ["mask before the optimizer step", "S without this step"])
def test_hooks_at_the_wrong_point_are_caught(fault):
    theta0, p, s, grad, adam = _state()
    if fault == "mask before the optimizer step":
        w, _ = keep_weight(theta0, s + grad)
        stepped, total = adamw(theta0 + w * (p - theta0), grad, adam), s + grad
    else:  # the mask taken from S before this step's gradient was added
        w, _ = keep_weight(theta0, s)
        stepped, total = theta0 + w * (adamw(p, grad, adam) - theta0), s + grad
    assert _check(theta0, p, s, grad, adam, total, stepped).problems


def test_another_gradient_is_caught():
    theta0, p, s, grad, adam = _state()
    total, stepped = _step(theta0, p, s, grad * 1.01, adam)  # e.g. an unclipped gradient
    assert any("S differs" in m for m in _check(theta0, p, s, grad, adam, total,
                                                stepped).problems)
