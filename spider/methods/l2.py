"""L2 regularisation towards the pre-trained weights.

Why: the classic soft alternative to masking (L2-SP, Xuhong Li et al., ICML 2018; the L2
baseline of the SPIDER paper): every weight may move, but moving away from ``theta0`` costs
loss, so the optimizer trades downstream fit against staying close to the pre-trained model.

Rule (ARCHITECTURE.md, "Methods")::

    loss <- loss + lam * sum over trainable tensors p of mean((p - theta0)^2)     (lam = 1e-3)

so ``d penalty / d p = 2 * lam * (p - theta0) / numel(p)``. The mean (not the sum) keeps a
tensor's pull independent of its size. The penalty is computed in float32 whatever the
parameter dtype. Nothing else is changed: ``masks()`` is all ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from spider.methods._baseline_utils import (
    load_group,
    number_option,
    pack,
    reject_leftovers,
    take_group,
)
from spider.methods.base import MethodBase, register, snapshot


@dataclasses.dataclass
class L2Options:
    lam: float = dataclasses.field(
        default=1e-3,
        metadata={"help": "weight lambda of the penalty lambda * sum_t mean((p - theta0)^2). "
                  "The mean divides each tensor's pull by its size, so the default 1e-3 does "
                  "nothing measurable on tensors of tens of thousands of entries (the bundled "
                  "model's l2 run equals full fine-tuning at 1e-3); a lambda of the order of "
                  "a tensor's size weighs like per-weight L2-SP (the sample run uses 10000)"},
    )

    def __post_init__(self) -> None:
        self.lam = number_option(self.lam, "lam", "l2", 0.0)


@register("l2")
class L2ToPretrained(MethodBase):
    """Adds ``lam * sum_t mean((p - theta0)^2)`` to the loss; no mask."""

    Options: ClassVar[type] = L2Options
    summary: ClassVar[str] = (
        "Adds lam * sum of mean((p - theta0)^2) to the loss, pulling every weight towards theta0."
    )

    def __init__(self, model: nn.Module, options: Any | None = None):
        super().__init__(model, options)
        self.theta0 = snapshot(self.params)

    def loss_penalty(self) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for name, p in self.params.items():
            if p.numel() == 0:
                continue  # the mean of nothing is NaN
            term = (p.float() - self.theta0[name].float()).square().mean()
            total = term if total is None else total + term
        return None if total is None else self.options.lam * total

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        return pack("theta0", self.theta0)

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        load_group(self.theta0, take_group(tensors, "theta0"), "theta0")
        reject_leftovers(tensors, self.name)
