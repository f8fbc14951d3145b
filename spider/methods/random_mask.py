"""Random mask: pin a seeded random ``ratio`` of each tensor to ``theta0``.

Why: the control for every *informed* mask. If the magnitude mask or SPIDER beat a random
mask that pins as many weights, the choice of *which* weights matters, not just how many
(ARCHITECTURE.md, "Methods").

Rule, per trainable tensor ``p``::

    pinned = round(ratio * numel) entries drawn uniformly without replacement
             (torch.Generator on the tensor's device, seeded from (seed, tensor name);
              the global RNG is neither used nor advanced)
    p      <- where(pinned, theta0, p)      after every optimizer step (bit for bit)
    w      = 1 - pinned

It is ``MagnitudeMask`` with a random score in place of ``|theta0|``; a tensor's pinned set
depends only on the seed, the tensor's name and the kind of device, not on which other
tensors are trainable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from spider.methods._baseline_utils import number_option, random_fraction, tensor_generator
from spider.methods.base import register
from spider.methods.magnitude_mask import MagnitudeMask


@dataclasses.dataclass
class RandomMaskOptions:
    ratio: float = dataclasses.field(
        default=0.5, metadata={"help": "fraction of each tensor pinned to theta0, chosen at random"}
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of the random choice (same seed, same pinned set)"}
    )

    def __post_init__(self) -> None:
        self.ratio = number_option(self.ratio, "ratio", "random_mask", 0.0, 1.0)
        self.seed = number_option(self.seed, "seed", "random_mask", 0, 2**63 - 1, integer=True)


@register("random_mask")
class RandomMask(MagnitudeMask):
    """Pins a seeded random ``ratio`` of each tensor to ``theta0``; the rest trains."""

    Options: ClassVar[type] = RandomMaskOptions
    summary: ClassVar[str] = (
        "Pins a seeded random fraction (ratio, default half) of each tensor to theta0; "
        "the rest train freely."
    )

    def choose_pinned(self, name: str, theta0: torch.Tensor) -> torch.Tensor:
        generator = tensor_generator(self.name, self.options.seed, name, device=theta0.device)
        return random_fraction(theta0.shape, self.options.ratio, generator)
