"""One SPIDER step of two implementations fed the same state, compared with derived bounds.

Two separately run trajectories drift apart (an entry at the tie I = G flips, AdamW turns
rounding noise in near-zero gradients into full steps), so cross-implementation and
cross-process-count checks feed both sides the same state (weights, optimizer state, S) and
compare the one step that comes out. A step is checked in three parts, each to a tolerance
derived where it is used, none tuned:

1. **the gradient** the other side took: ``S_other - S_ref`` within ``gradient_bound``;
2. **the mask side** (``w > 0``): where the two sides' S give different sides, the reference
   sat within ``tie_bound`` of I = G (the most that the gradients' difference can move G);
3. **the update**: the other side's weights equal the single-process rule (torch's AdamW, the
   optimizer training uses, then ``p <- theta0 + w (p - theta0)`` with w from ``keep_weight``)
   replayed on *its own* gradient, to float32 rounding (``replay_bound``). This is where a
   step at the wrong point, a mask from part of a tensor, or a lost optimizer state shows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

EPS = torch.finfo(torch.float32).eps  # 2**-23: one float32 rounding moves x by <= EPS*|x|


@dataclass
class Adam:
    """The AdamW settings and the state of one tensor before the step (None: first step)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    step: float = 0.0


def adamw(p: torch.Tensor, grad: torch.Tensor, adam: Adam) -> torch.Tensor:
    """``p`` after one step of ``torch.optim.AdamW`` (single-tensor, as on CPU) on ``grad``."""
    q = p.detach().clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([q], lr=adam.lr, betas=adam.betas, eps=adam.eps,
                            weight_decay=adam.weight_decay, foreach=False)
    if adam.exp_avg is not None:
        opt.state[q] = {"step": torch.tensor(float(adam.step)),
                        "exp_avg": adam.exp_avg.clone().float(),
                        "exp_avg_sq": adam.exp_avg_sq.clone().float()}
    q.grad = grad.detach().clone().float()
    opt.step()
    return q.detach()


def adamw_spread(p: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor,
                 adam: Adam) -> torch.Tensor:
    """Per entry, how far the step moves when the gradient moves by up to ``delta``:
    ``max(|step(g + delta) - step(g)|, |step(g - delta) - step(g)|)``. AdamW's step is smooth
    and, on an interval this small, extreme at its ends; near g = 0 it reaches ``lr`` (the
    amplification that makes trajectories drift)."""
    mid = adamw(p, grad, adam)
    return torch.maximum((adamw(p, grad + delta, adam) - mid).abs(),
                         (adamw(p, grad - delta, adam) - mid).abs())


def sum_error(n: int) -> float:
    """Relative error bound of a float32 sum of ``n`` non-negative terms as ATen computes it
    (a cascade of depth ceil(log2 n)), plus one rounding each for the float64 all-reduce of
    shard sums and the division into a mean."""
    return (math.ceil(math.log2(max(n, 2))) + 2) * EPS


def rank_shift(t: torch.Tensor) -> float:
    """Bound on how far ``rank(t) = sigmoid((|t| - mean)/std)`` moves, in any entry, when its
    mean and std carry the rounding of their sums (relative error ``r`` each, var formed as
    (sum t^2 - n mean^2)/(n - 1), whose cancellation multiplies r by (E t^2 + mean^2)/var):
    z = a|t| + b moves by <= |z| * dstd/std + |b| * (dmean/mean + dstd/std), and sigmoid
    by <= 1/4 of that."""
    a = t.detach().abs().double().reshape(-1)
    r = sum_error(a.numel())
    mean, var = float(a.mean()), float(a.var())
    if a.numel() < 2 or not var > 0 or mean == 0:
        return 0.0
    dstd = 0.5 * r * (float((a * a).mean()) + mean * mean) / var + r  # relative, of std
    std = math.sqrt(var)
    z_max = float(((a - mean) / std).abs().max())
    return 0.25 * (z_max * dstd + mean / std * (r + dstd))


@dataclass
class StepReport:
    """What one tensor's lockstep comparison found (empty lists: it agrees)."""

    flips: int = 0  # entries whose mask side differs between the two sides
    entries: int = 0
    free: int = 0  # entries with w > 0 in the reference (the check is not vacuous)
    # how much of each bound the largest difference used (diagnostics: <= 1 passes)
    gradient_used: float = 0.0
    replay_used: float = 0.0
    tie_bound: float = 0.0
    problems: list[str] = field(default_factory=list)


def check_spider_step(name: str, theta0: torch.Tensor, p_before: torch.Tensor,
                      sum_before: torch.Tensor, adam: Adam, sum_ref: torch.Tensor,
                      sum_other: torch.Tensor, p_other: torch.Tensor, terms: int,
                      options=None, unit: float = EPS) -> StepReport:
    """Compare one SPIDER step of one tensor (see the module docstring).

    Both sides started from ``p_before``, ``sum_before`` (S) and ``adam``; the reference
    ended with S = ``sum_ref``, the other side with ``sum_other`` and weights ``p_other``.
    ``terms`` is the length of the longest sum behind a gradient entry that the two sides
    may associate differently (e.g. the tokens of the global batch): a re-associated float32
    sum of ``terms`` terms moves by at most ``terms * EPS`` times the largest partial sum,
    taken here as the tensor's largest gradient entry. ``unit`` is the rounding unit of the
    arithmetic the gradients are computed in (bfloat16 under autocast: 2**-8).
    """
    from spider.methods.spider import keep_weight

    report = StepReport(entries=theta0.numel())
    theta0, p_before = theta0.float(), p_before.float()
    g_ref, g_other = sum_ref - sum_before, sum_other - sum_before

    # 1. the gradient. S = S_before + g is one more rounding of |S| on each side.
    gradient_bound = unit * terms * float(g_ref.abs().max()) + EPS * (sum_ref.abs()
                                                                      + sum_other.abs())
    excess = (sum_other - sum_ref).abs() - gradient_bound
    report.gradient_used = float(((sum_other - sum_ref).abs()
                                  / gradient_bound.clamp(min=torch.finfo(torch.float32).tiny)
                                  ).max())
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        report.problems.append(
            f"{name}: S differs by {float((sum_other - sum_ref).reshape(-1)[i].abs()):.3e} at "
            f"entry {i}, beyond the rounding bound {float(gradient_bound.reshape(-1)[i]):.3e}")

    # 2. the mask side. G = rank(S) is 1/4-Lipschitz in z = (|S| - mean)/std; the gradient
    # difference moves |S| by <= max(bound) entrywise, mean by as much and std by as much
    # (std is 1-Lipschitz in the max-norm, up to sqrt(n/(n-1))), so z by
    # <= (2 + |z|max) * max(bound) / std(|S|): only entries closer to I = G than that flip.
    gaps: dict[str, torch.Tensor] = {}
    w_ref, _ = keep_weight(theta0, sum_ref, options,
                           importances=lambda pre, ft: gaps.update(ref=(ft - pre).abs()))
    w_other, _ = keep_weight(theta0, sum_other, options,
                             importances=lambda pre, ft: gaps.update(other=(ft - pre).abs()))
    absolute = sum_ref.abs().double()
    std = float(absolute.std()) if absolute.numel() > 1 else 0.0
    moved = float(gradient_bound.max())
    if std > 0:
        z_max = float(((absolute - absolute.mean()) / std).abs().max())
        tie_bound = 0.25 * (2 + z_max) * moved * 1.01 / std + rank_shift(sum_ref)
    else:
        tie_bound = math.inf if moved > 0 else 0.0
    report.tie_bound = tie_bound
    flipped = (w_ref > 0) != (w_other > 0)
    report.flips, report.free = int(flipped.sum()), int((w_ref > 0).sum())
    if report.flips:
        worst = float(gaps["ref"][flipped].max())
        if not worst <= tie_bound:
            report.problems.append(
                f"{name}: {report.flips} entries changed mask side, one {worst:.2e} away from "
                f"I = G (more than the gradients' difference can move G: {tie_bound:.2e})")

    # 3. the update, replayed on the other side's own gradient. Recovering it as
    # S_other - S_before errs by one rounding of S_other (<= EPS*|S_other|); AdamW may
    # amplify that (adamw_spread). The mask is recomputed from S_other by keep_weight; the
    # other side may have summed its statistics in another order (shards): that moves its
    # ranks by rank_shift each, so w = G/(I+G), normalised, by <= 2 * shift / (I + G) plus the
    # normaliser's own rounding; an entry that close to the tie may sit on the other side.
    delta = EPS * sum_other.abs()
    stepped = adamw(p_before, g_other, adam)
    spread = adamw_spread(p_before, g_other, delta, adam)
    ranks: dict[str, torch.Tensor] = {}
    w, _ = keep_weight(theta0, sum_other, options,
                       importances=lambda pre, ft: ranks.update(pre=pre.clone(), ft=ft.clone()))
    shift = rank_shift(sum_other) + rank_shift(theta0)
    both = (ranks["pre"] + ranks["ft"]).clamp(min=1e-30)
    w_bound = 2 * shift / both + sum_error(theta0.numel()) * w
    expected = theta0 + w * (stepped - theta0)
    # the blend: three float32 operations, each <= EPS * the largest magnitude involved; and
    # the optimizer's own arithmetic, which another AdamW implementation (fused, foreach) may
    # round differently: its update takes 4 roundings (moments, square root, quotient)
    blend = 3 * EPS * torch.maximum(theta0.abs(), stepped.abs()) \
        + 4 * EPS * (stepped - p_before).abs()
    bound = w * spread + w_bound * (stepped - theta0).abs() + blend
    at_tie = (ranks["ft"] - ranks["pre"]).abs() <= shift
    pinned = (w == 0) & ~at_tie
    if not torch.equal(p_other.float()[pinned], theta0[pinned]):  # w = 0 is theta0 exactly
        report.problems.append(f"{name}: entries with w = 0 are not at theta0")
    excess = ((p_other.float() - expected).abs() - bound)[~at_tie]
    if bool((~at_tie).any()):
        report.replay_used = float(((p_other.float() - expected).abs() / bound)[~at_tie].max())
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        report.problems.append(
            f"{name}: the step differs from the single-process rule on its own gradient by "
            f"{float(excess[i] + bound[~at_tie][i]):.3e} (bound {float(bound[~at_tie][i]):.3e})")
    return report


def assert_steps_agree(reports: list[StepReport]) -> None:
    """Every tensor's step agreed; the comparison was not vacuous (the mask frees some
    entries and pins others)."""
    if os.environ.get("LOCKSTEP_VERBOSE"):  # how much of each bound was used, at most
        print(f"lockstep: {len(reports)} tensor steps; largest share of the gradient bound "
              f"{max(r.gradient_used for r in reports):.3g}, of the replay bound "
              f"{max(r.replay_used for r in reports):.3g}; {sum(r.flips for r in reports)} "
              f"mask flips; tie bound <= {max(r.tie_bound for r in reports):.2e}")
    problems = [p for r in reports for p in r.problems]
    assert not problems, "\n".join(problems[:20])
    entries = sum(r.entries for r in reports)
    free = sum(r.free for r in reports)
    assert 0 < free < entries
