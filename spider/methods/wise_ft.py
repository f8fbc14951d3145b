"""WiSE-FT: interpolate the fine-tuned weights back towards the pre-trained ones (post-hoc).

Why: "Robust fine-tuning of zero-shot models" (Wortsman et al., CVPR 2022) show that the
straight line between ``theta0`` and the fine-tuned weights often keeps most of the
downstream gain while recovering much of the pre-trained robustness. The SPIDER comparison
uses it as the simplest post-hoc forgetting baseline (ARCHITECTURE.md, "Methods").

Training is plain full fine-tuning. In ``finalize()``, per trainable tensor ``p``::

    p <- theta0 + alpha * (p - theta0)        (alpha = 0.5; in float32; alpha = 1 leaves p as is)
    w  = alpha everywhere                     (after finalize; ones before)

``finalize`` acts once; a second call does nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from spider.methods._baseline_utils import (
    FINALIZED_KEY,
    flag,
    load_group,
    number_option,
    pack,
    reject_leftovers,
    take_flag,
    take_group,
)
from spider.methods.base import MethodBase, register, snapshot


@dataclasses.dataclass
class WiseFtOptions:
    alpha: float = dataclasses.field(
        default=0.5,
        metadata={"help": "weight of the fine-tuned model: 0 = theta0, 1 = fine-tuned weights"},
    )

    def __post_init__(self) -> None:
        self.alpha = number_option(self.alpha, "alpha", "wise_ft", 0.0, 1.0)


@register("wise_ft")
class WiseFt(MethodBase):
    """Full fine-tuning, then ``p <- theta0 + alpha * (p - theta0)``."""

    Options: ClassVar[type] = WiseFtOptions
    summary: ClassVar[str] = (
        "Post-hoc: trains like full fine-tuning, then moves every weight back to "
        "theta0 + alpha * (p - theta0)."
    )

    def __init__(self, model: nn.Module, options: Any | None = None):
        super().__init__(model, options)
        self.theta0 = snapshot(self.params)
        self.finalized = False

    @torch.no_grad()
    def finalize(self) -> None:
        if self.finalized:
            return
        alpha = self.options.alpha
        if alpha != 1.0:  # theta0 + (p - theta0) could differ from p by rounding
            for name, p in self.params.items():
                theta0 = self.theta0[name].float()
                p.copy_((theta0 + alpha * (p.float() - theta0)).to(p.dtype))
        self.finalized = True

    def masks(self) -> dict[str, torch.Tensor]:
        if not self.finalized:
            return super().masks()
        return {
            name: torch.full_like(p, self.options.alpha, dtype=torch.float32)
            for name, p in self.params.items()
        }

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        return {FINALIZED_KEY: flag(self.finalized), **pack("theta0", self.theta0)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        finalized = take_flag(tensors)
        load_group(self.theta0, take_group(tensors, "theta0"), "theta0")
        reject_leftovers(tensors, self.name)
        self.finalized = finalized
