"""The one training loop: schedule, deterministic batches, hooks, non-finite loss."""

import math

import pytest
import torch

from spider.loop import (
    BatchSampler,
    LoopConfig,
    LoopHooks,
    LossNotFinite,
    lr_at,
    make_optimizer,
    train_loop,
)
from spider.methods import build_method


def test_warmup_then_cosine():
    cfg = LoopConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = BatchSampler(50, batch_size=8, grad_accum=2, seed=3)
    b = BatchSampler(50, batch_size=8, grad_accum=2, seed=3)
    assert a.indices(7, 1) == b.indices(7, 1)
    assert a.indices(7, 1) != BatchSampler(50, 8, 2, seed=4).indices(7, 1)
    # the first epoch (50 examples = 6.25 micro-batches) visits every example once
    seen = [i for pos in range(6) for i in a.indices(pos // 2, pos % 2)[0]]
    assert len(seen) == len(set(seen)) == 48


def test_mixed_batches_take_the_ratio_from_the_second_dataset():
    s = BatchSampler(100, batch_size=10, grad_accum=1, seed=0, mix_size=40, mix_ratio=0.3)
    main, mixed = s.indices(5, 0)
    assert len(main) == 7 and len(mixed) == 3 and max(mixed) < 40


class _Recorder(LoopHooks):
    def __init__(self, stop_at=None):
        self.records, self.stop_at = [], stop_at

    def after_step(self, step, record):
        self.records.append(record)

    def should_stop(self):
        return self.stop_at is not None and len(self.records) >= self.stop_at


class _Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        out = self.net(x)
        return type("Out", (), {"loss": torch.nn.functional.mse_loss(out, labels)})()


def _batches(scale=1.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) * scale
    return lambda step, micro: {"x": x, "labels": y}


def test_loop_trains_and_reports_every_step():
    model = _Regressor()
    method = build_method("full", model)
    cfg = LoopConfig(steps=40, lr=0.05, warmup_steps=2)
    hooks = _Recorder()
    done = train_loop(model, method, make_optimizer(list(model.parameters()), cfg),
                      _batches(), cfg, hooks)
    assert done == 40 and [r["step"] for r in hooks.records] == list(range(1, 41))
    assert hooks.records[-1]["loss"] < 0.2 * hooks.records[0]["loss"]


def test_resuming_from_a_step_matches_an_uninterrupted_run():
    cfg = LoopConfig(steps=20, lr=0.05, warmup_steps=3)

    def fresh():
        model = _Regressor()
        return model, build_method("spider", model)

    m1, meth1 = fresh()
    o1 = make_optimizer(list(m1.parameters()), cfg)
    train_loop(m1, meth1, o1, _batches(), cfg)

    m2, meth2 = fresh()
    o2 = make_optimizer(list(m2.parameters()), cfg)
    stopped = train_loop(m2, meth2, o2, _batches(), cfg, _Recorder(stop_at=8))
    assert stopped == 8
    m3, meth3 = fresh()
    m3.load_state_dict(m2.state_dict())
    meth3.load_state_dict(meth2.state_dict())
    o3 = make_optimizer(list(m3.parameters()), cfg)
    o3.load_state_dict(o2.state_dict())
    train_loop(m3, meth3, o3, _batches(), cfg, start_step=8)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_a_clear_message():
    model = _Regressor()
    method = build_method("full", model)
    cfg = LoopConfig(steps=50, lr=0.01)
    good = _batches()

    def poisoned(step, micro):  # the data turns bad at the 4th step
        batch = good(step, micro)
        return {**batch, "x": batch["x"] * (float("inf") if step >= 3 else 1.0)}

    hooks = _Recorder()
    with pytest.raises(LossNotFinite, match=r"^loss is not finite at step 4; try a lower --lr$"):
        train_loop(model, method, make_optimizer(list(model.parameters()), cfg), poisoned, cfg,
                   hooks)
    assert len(hooks.records) == 3  # stopped at once, before any optimizer step on the bad loss
    assert all(math.isfinite(v) for p in model.parameters() for v in p.flatten().tolist())


def test_nothing_to_train_is_a_user_error():
    model = _Regressor()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer([p for p in model.parameters() if p.requires_grad], LoopConfig())


def test_param_groups_scale_the_scheduled_learning_rate():
    model = _Regressor()
    method = build_method("full", model)
    cfg = LoopConfig(steps=3, lr=0.1, warmup_steps=0, min_lr_ratio=1.0)
    groups = [{"params": [model.net.weight]}, {"params": [model.net.bias], "lr_scale": 0.25},
              {"params": []}]  # an empty group is dropped, not an error
    optimizer = make_optimizer(groups, cfg)
    assert len(optimizer.param_groups) == 2
    train_loop(model, method, optimizer, _batches(), cfg, _Recorder())
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.1), pytest.approx(0.025)]


def test_cuda_steps_run_in_bf16_autocast_and_cpu_steps_in_float32():
    """The GPU path's precision choice, checked without a GPU: the context the loop enters
    around forward passes is bf16 autocast for CUDA devices and nothing (float32) on CPU."""
    import contextlib
    import warnings

    from spider.loop import autocast_for

    with warnings.catch_warnings():  # a CPU-only build warns that CUDA is absent
        warnings.simplefilter("ignore")
        cuda_ctx = autocast_for(torch.device("cuda", 0))()
    assert isinstance(cuda_ctx, torch.autocast)
    assert cuda_ctx.device == "cuda" and cuda_ctx.fast_dtype == torch.bfloat16
    assert isinstance(autocast_for(torch.device("cpu"))(), contextlib.nullcontext)
