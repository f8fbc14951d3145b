"""Half Fine-Tuning (HFT): in each round, a random half of the weights is frozen.

Why: "HFT: Half Fine-Tuning for Large Language Models" (Hui et al., 2024) argue that
leaving half of the parameters at their previous values keeps much of the earlier knowledge
(a mild form of resetting), while the other half is enough to learn the new task; a fresh
random half is chosen every round (ARCHITECTURE.md, "Methods").

Rule, per trainable tensor ``p``, for round ``r = steps_done // round_steps`` (one round for
the whole run when ``round_steps = 0``)::

    at the start of round r:  anchor = p (round 0: anchor = theta0)
                              frozen = round(ratio * numel) random entries
                                       (generator on p's device, seeded from
                                        (seed, tensor name, r))
    after every step:         p <- where(frozen, anchor, p)      (bit for bit)
    w = 1 - frozen            (for the current round)

Departure from the paper: HFT freezes whole parameter matrices (half of the attention and
half of the feed-forward matrices of each block); here a random half of the *entries* of
every trainable tensor is frozen, so the method is a per-weight mask like the others and
needs no knowledge of the architecture.
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
    random_fraction,
    reject_leftovers,
    restore_,
    take_group,
    tensor_generator,
)
from spider.methods.base import MethodBase, register, snapshot


@dataclasses.dataclass
class HftOptions:
    ratio: float = dataclasses.field(
        default=0.5, metadata={"help": "fraction of each tensor frozen in a round"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random halves"})
    round_steps: int = dataclasses.field(
        default=0,
        metadata={
            "help": "optimizer steps per round; a new random half is frozen every round "
            "(0 = one round for the whole run)"
        },
    )

    def __post_init__(self) -> None:
        self.ratio = number_option(self.ratio, "ratio", "hft", 0.0, 1.0)
        self.seed = number_option(self.seed, "seed", "hft", 0, 2**63 - 1, integer=True)
        self.round_steps = number_option(self.round_steps, "round_steps", "hft", 0, integer=True)


@register("hft")
class HalfFineTuning(MethodBase):
    """Freezes a random ``ratio`` of each tensor at its round-start value; redrawn per round.

    Attributes:
        anchor: values the frozen entries are held at (theta0 in round 0), parameter dtype.
        frozen: bool masks of the entries frozen in the current round.
    """

    Options: ClassVar[type] = HftOptions
    summary: ClassVar[str] = (
        "Half Fine-Tuning: a random half of each tensor is frozen at its round-start value "
        "(theta0 in round 1); a new half is drawn every round_steps steps."
    )

    def __init__(self, model: nn.Module, options: Any | None = None):
        super().__init__(model, options)
        self.anchor = snapshot(self.params)
        self.frozen = {name: self.draw_frozen(name, 0) for name in self.params}

    def draw_frozen(self, name: str, round_index: int) -> torch.Tensor:
        p = self.params[name]
        generator = tensor_generator(
            self.name, self.options.seed, name, salt=round_index, device=p.device
        )
        return random_fraction(p.shape, self.options.ratio, generator)

    @property
    def round_index(self) -> int:
        """0-based round of the next optimizer step."""
        steps = self.options.round_steps
        return self.steps_done // steps if steps > 0 else 0

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for name, p in self.params.items():
            restore_(p, self.anchor[name], self.frozen[name])
        super().after_optimizer_step()
        steps = self.options.round_steps
        if steps > 0 and self.steps_done % steps == 0:  # a new round starts
            for name, p in self.params.items():
                self.anchor[name].copy_(p)
                self.frozen[name] = self.draw_frozen(name, self.round_index)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: (~frozen).float() for name, frozen in self.frozen.items()}

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**pack("anchor", self.anchor), **pack("frozen", self.frozen)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        load_group(self.anchor, take_group(tensors, "anchor"), "anchor")
        load_group(self.frozen, take_group(tensors, "frozen"), "frozen")
        reject_leftovers(tensors, self.name)
