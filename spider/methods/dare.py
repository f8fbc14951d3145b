"""DARE: drop most of the fine-tuning delta at random, rescale the rest (post-hoc).

Why: "Language Models are Super Mario" (Yu et al., ICML 2024) observe that fine-tuning
deltas are highly redundant: dropping 90 % of them and rescaling the survivors keeps the
downstream skill, while the model moves back towards ``theta0`` on the dropped entries. The
SPIDER paper uses it as a forgetting baseline (ARCHITECTURE.md, "Methods").

Training is plain full fine-tuning. In ``finalize()``, per trainable tensor ``p``::

    delta = p - theta0                                       (float32)
    keep  ~ Bernoulli(1 - p_drop) per entry                   (p_drop = 0.9; generator on p's
                                                               device, seeded per
                                                               (seed, tensor name))
    p     <- where(keep, theta0 + delta / (1 - p_drop), theta0)
    w     = keep                                              (after finalize; ones before)

Dropped entries are written back as ``theta0`` itself (bit for bit). ``finalize`` acts once:
a second call, or one after resuming a finalized state, does nothing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from spider.methods._baseline_utils import SparsePatchMethod, number_option, tensor_generator
from spider.methods.base import register


@dataclasses.dataclass
class DareOptions:
    p_drop: float = dataclasses.field(
        default=0.9,
        metadata={"help": "probability of dropping each entry of the fine-tuning delta"},
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random drop"})

    def __post_init__(self) -> None:
        self.p_drop = number_option(self.p_drop, "p_drop", "dare", 0.0, 1.0, high_open=True)
        self.seed = number_option(self.seed, "seed", "dare", 0, 2**63 - 1, integer=True)


@register("dare")
class Dare(SparsePatchMethod):
    """Full fine-tuning, then drop each delta entry with ``p_drop`` and rescale the kept ones.

    Attributes:
        theta0: pre-trained tensors, in the parameter dtype.
        kept: after ``finalize``, bool masks of the delta entries that were kept.
    """

    Options: ClassVar[type] = DareOptions
    summary: ClassVar[str] = (
        "Post-hoc: trains like full fine-tuning, then drops each weight change with "
        "probability p_drop and rescales the kept ones by 1/(1-p_drop)."
    )

    @torch.no_grad()
    def finalize(self) -> None:
        if self.finalized:
            return
        scale = 1.0 / (1.0 - self.options.p_drop)
        for name, p in self.params.items():
            theta0 = self.theta0[name]
            generator = tensor_generator(self.name, self.options.seed, name, device=p.device)
            keep = torch.rand(p.shape, generator=generator, device=p.device) >= self.options.p_drop
            rescaled = theta0.float() + (p.float() - theta0.float()) * scale
            p.copy_(torch.where(keep, rescaled.to(p.dtype), theta0))
            self.kept[name] = keep
        self.finalized = True
