"""A straightforward transcription of SPIDER's rule (ARCHITECTURE.md, "The SPIDER rule"), as the authors' trainer
computes it: every quantity recomputed from scratch for every tensor at every step, with
fresh allocations. It is the yardstick for both correctness (tests) and speed (bench).
"""

from __future__ import annotations

import torch


def rank(t: torch.Tensor) -> torch.Tensor:
    a = t.abs().float()
    if bool((a == 0).all()):
        return torch.zeros_like(a)
    return torch.sigmoid((a - a.mean()) / a.std())


class ReferenceSpider:
    """theta0, I, the gradient sum, G and the mask kept as five float32 copies."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.theta0 = {n: p.detach().clone().float() for n, p in params.items()}
        self.importance_pre = {n: rank(t) for n, t in self.theta0.items()}
        self.grad_sum = {n: torch.zeros_like(t) for n, t in self.theta0.items()}
        self.importance_ft = {n: torch.zeros_like(t) for n, t in self.theta0.items()}
        self.mask = {n: torch.zeros_like(t) for n, t in self.theta0.items()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for name, p in self.params.items():
            self.grad_sum[name] += p.grad.float()
            self.importance_ft[name] = rank(self.grad_sum[name])
            pre, ft = self.importance_pre[name], self.importance_ft[name]
            w = torch.where(pre < ft, ft / (pre + ft), torch.zeros_like(ft))
            nonzero = w[w != 0]
            if nonzero.numel() > 0:
                w = w / nonzero.mean()
            w = torch.clamp(w, max=1.0)
            self.mask[name] = w
            p.data = (self.theta0[name] * (1 - w) + p.data.float() * w).to(p.dtype)

    def kept_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for group in (self.theta0, self.importance_pre, self.grad_sum,
                          self.importance_ft, self.mask)
            for t in group.values()
        )
