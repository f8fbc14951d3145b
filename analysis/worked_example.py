"""The Learn page's worked example: SPIDER on one small weight tensor, step by step.

A 6 x 8 weight tensor ``theta0`` (the "pre-trained" weights) is fine-tuned on a toy
downstream task: the loss ``0.5 * ||theta - target||^2 + <theta, noise_t>`` pulls every weight
toward a task target, and ``noise_t`` (fresh each step) makes the gradient noisy the way
mini-batches do. Each step runs a real backward pass, a real ``torch.optim.SGD`` step and
then SPIDER's own hook, ``build_method("spider", module, **options).after_optimizer_step()``;
I, G and the mask w are read back with the method's ``importances()`` and ``masks()``. Nothing
of the rule is re-implemented here: the numbers are the ones training would produce.

The same task is also fine-tuned without SPIDER (``full``), with the same noise, so the
example can show what forgetting means. The toy has no real pre-training data; its stand-in
for the old abilities is :func:`upstream_loss`, which (SPIDER's own premise, I = rank(|theta0|))
weighs a change of each weight by the weight's pre-trained magnitude.

The mask jumps at ``I = G`` (from 0 to about 1 after normalisation). :func:`near_tie` lists
the entries closest to that tie and how many float32 rounding steps (ulps) away they are:
an entry within a few ulps may land on either side in another implementation, on another
thread count or on other hardware (ARCHITECTURE.md, "The SPIDER rule").
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from spider.methods import build_method

PARAM = "weight"
"""Name of the example's only parameter (what ``masks()`` and ``importances()`` key by)."""

HISTORY_COLUMNS = ("step", "method", "task_loss", "upstream_loss", "drift", "mask_density",
                   "mask_mean")
"""Columns of :attr:`WorkedExample.history`: per step and method (``spider`` or ``full``), the
task loss (without noise), the toy's old-task loss (:func:`upstream_loss`), the drift
``||theta - theta0|| / ||theta0||``, the share of entries with w > 0 and the mean w (NaN for
``full``, which has no mask)."""

TIE_COLUMNS = ("row", "col", "I", "G", "gap", "ulps", "w", "side")
"""Columns of :func:`near_tie`."""

TIE_ULPS = 4
"""Entries whose |G − I| is at most this many float32 ulps are "at the tie": float rounding
alone can put them on either side."""


@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    """What the Learn page's widgets set. Options are those of ``spider`` (README)."""

    steps: int = 10  # optimizer steps taken
    lr: float = 0.2  # SGD learning rate
    noise: float = 1.0  # gradient noise, in units of the task's typical gradient at step 0
    seed: int = 0  # draws theta0, the task target and the noise
    mask: str = "weighted"  # SPIDER option: weighted | binary
    normalize: bool = True  # SPIDER option: divide w by the mean of its non-zero entries
    accumulate: str = "signed"  # SPIDER option: signed | abs | fisher
    rows: int = 6
    cols: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ValueError(f"noise must be zero or positive, got {self.noise!r}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"the tensor needs at least one entry, got {self.rows}x{self.cols}")

    @property
    def spider_options(self) -> dict:
        return {"mask": self.mask, "normalize": self.normalize, "accumulate": self.accumulate}


@dataclasses.dataclass(frozen=True)
class ExampleStep:
    """The state after one step (float32 arrays shaped ``rows x cols``)."""

    step: int
    grad: np.ndarray  # this step's gradient (after backward, before the optimizer)
    grad_sum: np.ndarray  # S: what SPIDER accumulated so far (grad, |grad| or grad^2)
    importance_pre: np.ndarray  # I = rank(theta0)
    importance_ft: np.ndarray  # G = rank(S)
    mask: np.ndarray  # w: keep-weight applied at this step
    proposed: np.ndarray  # theta after optimizer.step(), before SPIDER's merge
    merged: np.ndarray  # theta after SPIDER: theta0 * (1 - w) + proposed * w
    full: np.ndarray  # theta of plain fine-tuning (no SPIDER) after the same steps


@dataclasses.dataclass(frozen=True)
class WorkedExample:
    settings: ExampleSettings
    theta0: np.ndarray
    target: np.ndarray
    steps: list[ExampleStep]
    history: pd.DataFrame  # HISTORY_COLUMNS

    @property
    def last(self) -> ExampleStep:
        return self.steps[-1]


def _one_weight_module(theta0: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.register_parameter(PARAM, nn.Parameter(theta0.clone(), requires_grad=True))
    return module


def _draws(settings: ExampleSettings) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """theta0, the task target and one noise tensor per step, all from ``seed``."""
    gen = torch.Generator().manual_seed(int(settings.seed))
    shape = (settings.rows, settings.cols)
    theta0 = torch.randn(shape, generator=gen)
    # The task wants some weights moved a lot and most a little: a heavy-tailed shift.
    shift = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(2) * 1.5
    target = theta0 + shift
    scale = float(shift.abs().mean())  # the typical gradient at step 0 is |theta0 - target|
    noise = [torch.randn(shape, generator=gen) * settings.noise * scale
             for _ in range(settings.steps)]
    return theta0, target, noise


def _task_loss(theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (theta - target).square().sum()


def upstream_loss(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    """The toy's old-task loss: ``sum(|theta0| * (theta - theta0)^2) / sum(|theta0|)``.

    0 at theta0; moving a large pre-trained weight costs more than moving a small one, the
    assumption behind SPIDER's pre-training importance I. A teaching device, not a claim
    about real models (the sample runs measure real old-task scores)."""
    weight = theta0.abs()
    return float((weight * (theta - theta0).square()).sum() / weight.sum())


def _drift(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    return float((theta - theta0).norm() / theta0.norm())


def run_worked_example(settings: ExampleSettings | None = None) -> WorkedExample:
    """Fine-tune the example tensor for ``settings.steps`` SGD steps with SPIDER (and, for
    comparison, without it); returns every step's I, G, w and weights.
    """
    settings = settings or ExampleSettings()
    theta0, target, noise = _draws(settings)
    spider_model = _one_weight_module(theta0)
    full_model = _one_weight_module(theta0)
    method = build_method("spider", spider_model, **settings.spider_options)
    spider_opt = torch.optim.SGD(spider_model.parameters(), lr=settings.lr)
    full_opt = torch.optim.SGD(full_model.parameters(), lr=settings.lr)
    spider_p, full_p = getattr(spider_model, PARAM), getattr(full_model, PARAM)

    steps: list[ExampleStep] = []
    rows: list[dict] = []
    for t in range(settings.steps):
        for model, opt in ((spider_model, spider_opt), (full_model, full_opt)):
            p = getattr(model, PARAM)
            loss = _task_loss(p, target) + (p * noise[t]).sum()
            loss.backward()
            opt.step()
            if model is spider_model:
                grad = p.grad.detach().clone()
                proposed = p.detach().clone()
                method.after_optimizer_step()  # SPIDER: accumulate S, mask, merge
            opt.zero_grad()
        importances = method.importances()[PARAM]
        w = method.masks()[PARAM]
        steps.append(ExampleStep(
            step=t + 1,
            grad=grad.numpy(),
            grad_sum=method.grad_sum[PARAM].detach().clone().numpy(),
            importance_pre=importances["pre"].numpy(),
            importance_ft=importances["ft"].numpy(),
            mask=w.numpy(),
            proposed=proposed.numpy(),
            merged=spider_p.detach().clone().numpy(),
            full=full_p.detach().clone().numpy(),
        ))
        with torch.no_grad():
            rows.append({"step": t + 1, "method": "spider",
                         "task_loss": float(_task_loss(spider_p, target)),
                         "upstream_loss": upstream_loss(spider_p, theta0),
                         "drift": _drift(spider_p, theta0),
                         "mask_density": float((w > 0).float().mean()),
                         "mask_mean": float(w.mean())})
            rows.append({"step": t + 1, "method": "full",
                         "task_loss": float(_task_loss(full_p, target)),
                         "upstream_loss": upstream_loss(full_p, theta0),
                         "drift": _drift(full_p, theta0),
                         "mask_density": math.nan, "mask_mean": math.nan})
    history = pd.DataFrame.from_records(rows, columns=list(HISTORY_COLUMNS))
    return WorkedExample(settings=settings, theta0=theta0.numpy(), target=target.numpy(),
                         steps=steps, history=history)


def near_tie(step: ExampleStep, n: int = 5) -> pd.DataFrame:
    """The ``n`` entries whose G is closest to I, closest first.

    ``gap`` = G − I (> 0: the task wins, w > 0); ``ulps`` = |gap| in float32 rounding steps at
    that magnitude; ``side`` says which side of the tie the entry fell on. Entries with
    ``ulps <= TIE_ULPS`` sit at the tie: another correct implementation may flip them.
    """
    pre = step.importance_pre.astype(np.float32).ravel()
    ft = step.importance_ft.astype(np.float32).ravel()
    gap = ft.astype(np.float64) - pre.astype(np.float64)
    spacing = np.spacing(np.maximum(np.abs(pre), np.abs(ft)).astype(np.float32))
    ulps = np.abs(gap) / spacing.astype(np.float64)
    order = np.argsort(np.abs(gap), kind="stable")[:n]
    cols = step.importance_pre.shape[1] if step.importance_pre.ndim == 2 else pre.size
    w = step.mask.ravel()
    return pd.DataFrame({
        "row": order // cols,
        "col": order % cols,
        "I": pre[order].astype(float),
        "G": ft[order].astype(float),
        "gap": gap[order],
        "ulps": ulps[order],
        "w": w[order].astype(float),
        "side": np.where(gap[order] > 0, "G > I: free (w > 0)", "G ≤ I: pinned (w = 0)"),
    }, columns=list(TIE_COLUMNS))


def example_summary(step: ExampleStep) -> dict[str, float]:
    """Headline numbers of one step's mask: the share of entries free to move (w > 0),
    pinned to theta0 (w = 0) and fully free (w = 1), and the mean w."""
    w = step.mask
    return {
        "free_share": float((w > 0).mean()),
        "pinned_share": float((w == 0).mean()),
        "full_share": float((w == 1).mean()),
        "mask_mean": float(w.mean()),
    }
