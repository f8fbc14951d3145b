"""Magnitude mask: pin the largest pre-trained weights of each tensor to ``theta0``.

Why: it is the authors' ``MagnitudeMask`` baseline (SPIDER, ICML 2025), the binary,
gradient-free ablation of SPIDER's pre-training importance ``I = rank(|theta0|)``: if large
pre-trained weights carry generalisation, freezing them alone should already limit
forgetting. Comparing it with SPIDER shows what the fine-tuning importance ``G`` adds.

Rule, per trainable tensor ``p`` (ARCHITECTURE.md, "Methods")::

    pinned = the round(ratio * numel) entries of largest |theta0|     (ratio = 0.5)
    p      <- where(pinned, theta0, p)      after every optimizer step (bit for bit)
    w      = 1 - pinned                     (1 = free, 0 = pinned)

The optimizer still steps the pinned entries (its state is untouched); the restore after the
step undoes that, so pinned weights never leave ``theta0``.
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
    restore_,
    take_group,
    top_fraction,
)
from spider.methods.base import MethodBase, register, snapshot


@dataclasses.dataclass
class MagnitudeMaskOptions:
    ratio: float = dataclasses.field(
        default=0.5,
        metadata={
            "help": "fraction of each tensor pinned to theta0: its entries of largest |theta0|"
        },
    )

    def __post_init__(self) -> None:
        self.ratio = number_option(self.ratio, "ratio", "magnitude_mask", 0.0, 1.0)


@register("magnitude_mask")
class MagnitudeMask(MethodBase):
    """Pins the top ``ratio`` of each tensor by ``|theta0|`` to ``theta0``; the rest trains.

    Attributes:
        theta0: pre-trained tensors, in the parameter dtype.
        pinned: bool masks, True where the entry is held at ``theta0``.
    """

    Options: ClassVar[type] = MagnitudeMaskOptions
    summary: ClassVar[str] = (
        "Pins the largest-|theta0| entries of each tensor (ratio, default half) to theta0; "
        "the rest train freely."
    )

    def __init__(self, model: nn.Module, options: Any | None = None):
        super().__init__(model, options)
        self.theta0 = snapshot(self.params)
        self.pinned = {name: self.choose_pinned(name, t) for name, t in self.theta0.items()}

    def choose_pinned(self, name: str, theta0: torch.Tensor) -> torch.Tensor:
        """Bool mask of the entries to pin; here the top ``ratio`` by ``|theta0|``."""
        return top_fraction(theta0.detach().abs().float(), self.options.ratio)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for name, p in self.params.items():
            restore_(p, self.theta0[name], self.pinned[name])
        super().after_optimizer_step()

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: (~pinned).float() for name, pinned in self.pinned.items()}

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**pack("theta0", self.theta0), **pack("pinned", self.pinned)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        load_group(self.theta0, take_group(tensors, "theta0"), "theta0")
        load_group(self.pinned, take_group(tensors, "pinned"), "pinned")
        reject_leftovers(tensors, self.name)
