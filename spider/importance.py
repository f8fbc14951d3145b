"""Per-tensor importance ranks, written for speed and for sharded tensors.

The authors' rank of a tensor ``t`` (ARCHITECTURE.md, "The SPIDER rule") is::

    rank(t) = 0                                   if t is all zeros
            = sigmoid((|t| - mean|t|) / std|t|)    otherwise (unbiased std, per tensor)

We write it as ``sigmoid(a * |t| + b)`` with two per-tensor scalars ``a = 1/std`` and
``b = -mean/std`` derived from three *sums* (count, sum|t|, sum t^2). Sums can be added
across shards (all-reduce) before the scalars are derived, so a sharded tensor gets exactly
the rank of the whole tensor.

Degenerate tensors, where the z-score is undefined (the authors' code yields NaN there and
NaN then reaches the weights), get a defined rank instead:

* all zeros (including an empty tensor): rank 0 everywhere (``a = 0, b = -inf``), as in the
  authors' rule;
* one element, or no spread (every |t| equal, e.g. a freshly initialised norm weight): rank
  0.5 everywhere (``a = b = 0``): "no element is more important than another".

Spread is "none" when the variance is below 1e-12 of the mean square, i.e. a relative spread
of about one float32 ulp; such a z-score would only amplify rounding noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# all-reduce hook: takes a float64 vector of local sums and returns the global sums.
Reducer = Callable[[torch.Tensor], torch.Tensor]

RELATIVE_VARIANCE_FLOOR = 1e-12


def abs_sums(t: torch.Tensor, abs_out: torch.Tensor | None = None) -> torch.Tensor:
    """Local sums ``[count, sum|t|, sum t^2]`` as a float64 vector (all-reducible).

    ``abs_out``, when given, receives ``|t|`` (float32 work buffer of ``t``'s shape), which
    the caller can reuse so that ``|t|`` is computed once.
    """
    # float32 reductions (PyTorch sums in cascades, accurate to a few ulps) turned into float64
    # scalars: asking for a float64 sum would convert the whole tensor first.
    flat = t.reshape(-1)
    sum_abs = (flat.abs() if abs_out is None else abs_into(abs_out, t)).sum(dtype=torch.float32)
    count = torch.tensor(float(flat.numel()), dtype=torch.float64, device=t.device)
    return torch.stack([count, sum_abs.double(), sum_of_squares(flat)])


_SQUARES_CHUNK = 1 << 16


def sum_of_squares(flat: torch.Tensor) -> torch.Tensor:
    """sum(t^2) as a float64 0-dim tensor, without a temporary the size of ``t``.

    ``vector_norm`` accumulates float32 serially and loses accuracy with size (relative
    error ~1e-3 at 3e7 entries); norms of 64K-entry rows stay accurate and their squares are
    summed in float64.
    """
    n = flat.numel()
    head = n - n % _SQUARES_CHUNK
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    if head:
        rows = flat[:head].view(-1, _SQUARES_CHUNK)
        total = total + (torch.linalg.vector_norm(rows, 2, dim=1).double() ** 2).sum()
    if head < n:
        total = total + torch.linalg.vector_norm(flat[head:], 2).double() ** 2
    return total


def abs_into(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``out = |t|`` where ``out`` may have a wider dtype than ``t`` (bf16 -> float32)."""
    if out.dtype == t.dtype:
        return torch.abs(t, out=out)
    return out.copy_(t).abs_()


def affine_from_sums(sums: torch.Tensor | list[float]) -> tuple[float, float]:
    """``(a, b)`` such that ``rank(t) = sigmoid(a*|t| + b)``, from global sums.

    Returns Python floats (the sums are few; keeping them on the host costs one small
    transfer per tensor and keeps the elementwise ops on scalars).
    """
    count, sum_abs, sum_sq = (float(x) for x in (sums.tolist() if torch.is_tensor(sums) else sums))
    if count == 0 or sum_abs == 0.0:
        return 0.0, -math.inf  # all zeros: rank 0
    mean = sum_abs / count
    if count < 2:
        return 0.0, 0.0  # one element: rank 0.5
    var = (sum_sq - count * mean * mean) / (count - 1)
    if not var > RELATIVE_VARIANCE_FLOOR * (sum_sq / count):
        return 0.0, 0.0  # no spread: rank 0.5
    std = math.sqrt(var)
    return 1.0 / std, -mean / std


def rank_into(out: torch.Tensor, abs_t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``out = sigmoid(a * abs_t + b)``; ``out`` may be ``abs_t`` itself."""
    if a == 0.0:
        return out.fill_(0.0 if b == -math.inf else 0.5)
    # one fused pass for b + a*|t| (a 0-dim tensor broadcasts), then the sigmoid in place
    torch.add(torch.tensor(b, dtype=out.dtype, device=out.device), abs_t, alpha=a, out=out)
    return out.sigmoid_()


def rank(t: torch.Tensor, reducer: Reducer | None = None) -> torch.Tensor:
    """The authors' rank of ``t`` as a new float32 tensor (degenerate cases defined above)."""
    buf = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    sums = abs_sums(t, abs_out=buf)
    if reducer is not None:
        sums = reducer(sums)
    a, b = affine_from_sums(sums)
    return rank_into(buf, buf, a, b)
