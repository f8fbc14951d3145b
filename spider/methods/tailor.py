"""Model Tailor (simplified): keep a sparse patch of the fine-tuning delta, revert the rest.

Why: "Model Tailor: Mitigating Catastrophic Forgetting in Multi-modal Large Language Models"
(Zhu et al., ICML 2024) find that grafting only a small "model patch" (<= 10 % of the
fine-tuned weights) onto the pre-trained model keeps most of the downstream gain and almost
all of the pre-trained ability. The patch is chosen by how much each entry matters to the
downstream loss. It is a post-hoc baseline of the SPIDER paper (ARCHITECTURE.md, "Methods").

Rule. During training (after every optimizer step, i.e. on clipped gradients) accumulate the
diagonal empirical Fisher ``F += grad^2`` per trainable tensor. In ``finalize()``::

    delta = p - theta0                                       (float32)
    score = 0.5 * F * delta^2     (score="salience", default: the OBD estimate of the loss
                                   increase if the entry were reverted to theta0)
          | |delta|               (score="magnitude")
    keep  = the round(keep_ratio * numel) entries of highest score, per tensor (keep_ratio=0.1)
    p     <- where(keep, p, theta0)
    w     = keep                  (after finalize; ones before)

What of the paper is in, and what is not — see ``PAPER_COVERAGE``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from spider.methods._baseline_utils import SparsePatchMethod, number_option, top_fraction
from spider.methods.base import choice, register

PAPER_COVERAGE = """\
In: the sparse "model patch" — a fixed fraction of each tensor's fine-tuning delta, chosen by
salience (|delta|) and sensitivity (diagonal Fisher F from the training gradients, combined
as the Optimal-Brain-Damage loss increase 0.5 * F * delta^2), grafted onto theta0; every
other entry is reverted to theta0.
Not in: (1) the paper's "patch decorator", the Hessian-inverse (Optimal-Brain-Surgeon /
SparseGPT-style) compensation that adjusts the kept weights for the reverted ones; kept
entries here keep exactly their fine-tuned value. (2) The paper's layer-wise Hessians from
calibration inputs: F here is the empirical Fisher of the training gradients. (3) The search
over which layers to patch and over patch sizes: one keep_ratio applies to every tensor.
(4) The multi-task patch fusion."""

SCORES = ("salience", "magnitude")


@dataclasses.dataclass
class TailorOptions:
    keep_ratio: float = dataclasses.field(
        default=0.10,
        metadata={"help": "fraction of each tensor's fine-tuning delta kept (the model patch)"},
    )
    score: str = dataclasses.field(
        default="salience",
        metadata={
            "help": "how entries are ranked: salience = 0.5 * Fisher * delta^2 (OBD loss "
            "increase of reverting), magnitude = |delta|"
        },
    )

    def __post_init__(self) -> None:
        self.keep_ratio = number_option(self.keep_ratio, "keep_ratio", "tailor", 0.0, 1.0)
        choice(self.score, SCORES, "score", "tailor")


@register("tailor")
class ModelTailor(SparsePatchMethod):
    """Full fine-tuning, then keep only the top ``keep_ratio`` of each delta by salience.

    A simplified Model Tailor: the sparse patch is chosen as in the paper's spirit
    (salience/sensitivity from |delta| and the diagonal Fisher), but there is no Hessian-based
    compensation of the kept weights and no search over layers or patch sizes
    (``PAPER_COVERAGE`` has the full list).

    Attributes:
        theta0: pre-trained tensors, in the parameter dtype.
        fisher: float32 running sums of ``grad^2`` (only with ``score="salience"``).
        kept: after ``finalize``, bool masks of the delta entries that were kept.
    """

    Options: ClassVar[type] = TailorOptions
    summary: ClassVar[str] = (
        "Post-hoc (simplified Model Tailor): trains like full fine-tuning, then keeps the "
        "top keep_ratio (default 10%) of each weight change by Fisher salience and reverts "
        "the rest to theta0."
    )

    def __init__(self, model: nn.Module, options: Any | None = None):
        super().__init__(model, options)
        self.fisher: dict[str, torch.Tensor] = {}
        if self.options.score == "salience":
            self.fisher = {
                name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()
            }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for name, fisher in self.fisher.items():
            grad = self.params[name].grad
            if grad is not None:
                fisher.add_(torch.nan_to_num(grad.float().square(), nan=0.0))
        super().after_optimizer_step()

    def scores(self) -> dict[str, torch.Tensor]:
        """Per tensor, the float32 score each delta entry is ranked by (higher = kept first)."""
        out = {}
        for name, p in self.params.items():
            delta = p.detach().float() - self.theta0[name].float()
            if self.options.score == "salience":
                score = 0.5 * self.fisher[name] * delta.square()
            else:
                score = delta.abs()
            out[name] = torch.nan_to_num(score, nan=0.0)  # inf * 0 costs nothing to revert
        return out

    @torch.no_grad()
    def finalize(self) -> None:
        if self.finalized:
            return
        for name, score in self.scores().items():
            p = self.params[name]
            keep = top_fraction(score, self.options.keep_ratio)
            p.copy_(torch.where(keep, p, self.theta0[name]))
            self.kept[name] = keep
        self.finalized = True

    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"fisher": self.fisher}
