"""Comparing SPIDER runs that should agree "up to float rounding".

SPIDER's mask jumps at the tie I = G: an entry whose two importances sit within rounding of
each other can land on the other side in a run that sums in another order (another process
count, thread count or machine), and its weight then differs by a whole update. Bit-equality
cannot hold entry by entry, so two such runs are compared for what must hold instead:

* the entries whose mask side (w > 0 or w = 0) differs are few, and
* each of them sat within ``TIE_EPS`` of the tie (|G - I| in the reference run) at the step
  where it first differed;
* every other entry agrees to rounding (checked by the caller, with these entries excluded).

These helpers compare masks over consecutive steps of two runs. The distributed and Trainer
tests no longer compare separately run trajectories (they drift apart, by an amount that
depends on the CPU's kernels); they compare one step in lockstep with derived bounds
(``lockstep.py``, whose tie bound is derived from the gradients' rounding instead of
``TIE_EPS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

TIE_EPS = 1e-4
"""How close to I = G an entry must have been to excuse a flip. Runs that differ only in
summation order differ in S by ~1e-6 relative, which moves G by far less than this."""


@dataclass
class TieFlips:
    """Where the mask sides of two runs of one tensor differ, step by step."""

    ever: torch.Tensor  # bool, entries whose side differed at some step
    per_step: list[int] = field(default_factory=list)  # entries on different sides, per step
    far_from_tie: list[str] = field(default_factory=list)  # flips the tie does not explain


def tie_flips(masks_ref: Sequence[torch.Tensor], masks_other: Sequence[torch.Tensor],
              gaps_ref: Sequence[torch.Tensor], tie_eps: float = TIE_EPS) -> TieFlips:
    """Compare one tensor's masks over consecutive steps.

    ``masks_*[k]`` is the keep-weight w at the k-th compared step, ``gaps_ref[k]`` is
    ``|G - I|`` of the reference there. An entry that first lands on another side at step k
    must have had ``gaps_ref[k] < tie_eps``.
    """
    ever = torch.zeros(masks_ref[0].shape, dtype=torch.bool)
    result = TieFlips(ever=ever)
    for k, (w_ref, w_other, gap) in enumerate(zip(masks_ref, masks_other, gaps_ref)):
        differs = (w_ref > 0) != (w_other > 0)
        first = differs & ~ever
        if bool(first.any()):
            worst = float(gap[first].max())
            if not worst < tie_eps:
                result.far_from_tie.append(
                    f"compared step #{k}: {int(first.sum())} entries flipped, one of them "
                    f"{worst:.2e} away from I = G")
        ever |= differs
        result.per_step.append(int(differs.sum()))
    return result


def spider_tie_flips(theta0: dict[str, torch.Tensor],
                     sums_ref: Sequence[dict[str, torch.Tensor]],
                     sums_other: Sequence[dict[str, torch.Tensor]],
                     options=None, tie_eps: float = TIE_EPS) -> dict[str, TieFlips]:
    """:func:`tie_flips` for every tensor of two SPIDER runs, from theta0 and the gradient
    sums S of each run at consecutive steps (``sums_*[k][name]``), with w, I and G computed
    by ``keep_weight``, the function training uses."""
    from spider.methods.spider import keep_weight

    def mask_and_gap(name, grad_sum):
        ranks = {}
        w, _ = keep_weight(theta0[name], grad_sum, options,
                           importances=lambda pre, ft: ranks.update(gap=(ft - pre).abs()))
        return w, ranks["gap"]

    flips = {}
    for name in sums_ref[0]:
        ref = [mask_and_gap(name, sums[name]) for sums in sums_ref]
        other = [mask_and_gap(name, sums[name])[0] for sums in sums_other]
        flips[name] = tie_flips([w for w, _ in ref], other, [g for _, g in ref], tie_eps)
    return flips
