"""SPIDER: Importance Discrepancy Measurement + Importance Selection Mask.

Huang et al., "Learn from Downstream and Be Yourself in Multimodal Large Language Model
Fine-Tuning", ICML 2025 (arXiv 2411.10928). For every trainable tensor ``p`` (ARCHITECTURE.md, "The SPIDER rule")::

    I  = rank(theta0)                       pre-training importance (fixed)
    S += p.grad                             after optimizer.step(), i.e. after clipping
    G  = rank(S)                            fine-tuning importance
    w  = where(I < G, G / (I + G), 0)       Importance Selection Mask (raw)
    w  = min(w / mean(w[w != 0]), 1)        (w stays 0 when no entry is non-zero)
    p <- theta0 * (1 - w) + p * w           after every optimizer step

By default this matches the authors' released trainer step for step, to float32 rounding.
What differs from a line-by-line transcription is only *how* it is computed:

* Kept memory is theta0 (in the parameter's own dtype) and S (float32): 8 bytes per float32
  parameter, 6 per bf16 one. I, G and w are computed per tensor on the fly in two reusable
  float32 work buffers the size of the largest tensor.
* ``rank`` is ``sigmoid(a*|t| + b)`` with per-tensor scalars from sums that can be
  all-reduced (``reducer``), so a sharded tensor gets the mask of the whole tensor.
* ``where(I < G, G/(I+G), 0)`` is computed as "keep ``r = G/(I+G)`` where ``r > 0.5``": the two
  are the same condition (r > 1/2 <=> G > I), which saves a comparison pass. Ties closer than
  one float32 ulp may resolve differently from the authors' comparison.
* Large tensors are updated in three fused passes (accumulate + moments, mask + its sums,
  normalise + merge) instead of ~18 eager ones: on GPUs by ``torch.compile``d kernels
  (tensors of at least ``FUSED_MIN_NUMEL`` entries; compiled by the first update, cached on
  disk by inductor), on CPUs by a small C library (``_spider_native.c``, float32 tensors of
  at least ``NATIVE_MIN_NUMEL`` entries; built by the first update, about a second, cached
  on disk). A failing compiler falls back to the eager update with one warning, and
  ``SPIDERSCOPE_SPIDER_FUSED`` (1/0) turns fusion on or off on every device. Both paths agree
  to float rounding (tests/spider/methods/test_spider.py).
* Degenerate tensors (one element, no spread) get rank 0.5 instead of NaN; see
  ``spider.importance``. Such a tensor's theta0 rank then never loses to G = 0.5, so e.g. a
  one-element tensor stays pinned at theta0, as it does (through NaN) in the authors' code.

Ablations (options): a binary mask ``w = 1[I < G]``, no mean-normalisation, ``S`` as the
sum of ``|grad|``, or Fisher importance (``S`` as the sum of ``grad**2``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from spider.distributed import any_sharded, as_logical, local, shard_of, sum_across
from spider.importance import Reducer, abs_into, abs_sums, affine_from_sums, rank_into
from spider.methods import _native
from spider.methods.base import (
    STAT_COLUMNS,
    MethodBase,
    check_state_tensors,
    choice,
    register,
)


@dataclasses.dataclass
class SpiderOptions:
    mask: str = dataclasses.field(
        default="weighted",
        metadata={"help": "weighted: w = G/(I+G) where G > I (the paper's ISM); "
                  "binary: w = 1 where G > I (ablation)"},
    )
    normalize: bool = dataclasses.field(
        default=True,
        metadata={"help": "divide w by the mean of its non-zero entries and cap at 1 "
                  "(the authors' trainer); off for the ablation"},
    )
    accumulate: str = dataclasses.field(
        default="signed",
        metadata={"help": "fine-tuning importance from the running sum of: signed = grad "
                  "(the authors'), abs = |grad|, fisher = grad**2"},
    )

    def __post_init__(self) -> None:
        choice(self.mask, ("weighted", "binary"), "mask", "spider")
        choice(self.accumulate, ("signed", "abs", "fisher"), "accumulate", "spider")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"option 'normalize' of method 'spider' must be true or false, "
                             f"got {self.normalize!r}")


@dataclasses.dataclass
class KeepWeightStats:
    """By-products of one ``keep_weight`` call (sums, so they can be all-reduced)."""

    numel: float
    nonzero: float  # entries with G > I (= entries with w > 0)
    mask_sum: float = math.nan  # sum of the final w
    pre_sum: float = math.nan  # sum of I
    ft_sum: float = math.nan  # sum of G
    pre_sq_sum: float = math.nan  # sum of I^2
    ft_sq_sum: float = math.nan  # sum of G^2
    cross_sum: float = math.nan  # sum of I*G

    def as_row(self) -> dict[str, float]:
        n = self.numel or math.nan
        return {
            "mask_mean": self.mask_sum / n,
            "mask_density": self.nonzero / n,
            "importance_pre_mean": self.pre_sum / n,
            "importance_ft_mean": self.ft_sum / n,
            "frac_ft_gt_pre": self.nonzero / n,
            "importance_pre_sq_mean": self.pre_sq_sum / n,
            "importance_ft_sq_mean": self.ft_sq_sum / n,
            "importance_cross_mean": self.cross_sum / n,
        }


def keep_weight(
    theta0: torch.Tensor,
    grad_sum: torch.Tensor,
    options: SpiderOptions | None = None,
    **kwargs,
) -> tuple[torch.Tensor, KeepWeightStats]:
    """The keep-weight ``w`` of one tensor from theta0 and the gradient sum S.

    This is the function training uses and the one analysis uses to rebuild masks from a
    checkpoint. Keyword arguments are those of ``keep_weight_scaled``.
    """
    w, _, stats = keep_weight_scaled(theta0, grad_sum, options, fold_scale=False, **kwargs)
    return w, stats


def keep_weight_scaled(
    theta0: torch.Tensor,
    grad_sum: torch.Tensor,
    options: SpiderOptions | None = None,
    *,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    pre_affine: tuple[float, float] | None = None,
    reducer: Reducer | None = None,
    collect: bool = False,
    importances: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    fold_scale: bool = True,
) -> tuple[torch.Tensor, float, KeepWeightStats]:
    """``(v, scale, stats)`` with the keep-weight ``w = scale * v``.

    Returning the normalisation factor apart (``fold_scale``) lets the update fold it into
    its last pass; with ``fold_scale=False`` the scale is applied here, exactly as the authors
    do (``min(w * scale, 1)``), and returned as 1.
    ``out`` and ``work`` are float32 buffers shaped like ``theta0`` (allocated
    when not given); ``w`` is returned in ``out``. ``pre_affine`` caches the fixed
    ``(a, b)`` of I. ``importances(I, G)``, when given, is called with the two ranks before
    they are combined (for ``Method.importances``).
    """
    opts = options or SpiderOptions()
    w = out if out is not None else torch.empty(theta0.shape, dtype=torch.float32,
                                                 device=theta0.device)
    imp = work if work is not None else torch.empty_like(w)
    reduce = reducer or (lambda sums: sums)

    # G = rank(S), into w (the abs pass also yields sum|S|)
    g_a, g_b = affine_from_sums(reduce(abs_sums(grad_sum, abs_out=w)))
    rank_into(w, w, g_a, g_b)
    # I = rank(theta0), into imp
    if pre_affine is None:
        pre_affine = affine_from_sums(reduce(abs_sums(theta0, abs_out=imp)))
    else:
        abs_into(imp, theta0)
    rank_into(imp, imp, *pre_affine)
    if importances is not None:
        importances(imp, w)

    stats = KeepWeightStats(numel=float(theta0.numel()), nonzero=0.0)
    if collect:
        numel = torch.tensor(float(theta0.numel()), device=w.device)
        flat_i, flat_g = imp.reshape(-1), w.reshape(-1)
        sums = torch.stack([imp.sum(), w.sum(), numel, torch.dot(flat_i, flat_i),
                            torch.dot(flat_g, flat_g), torch.dot(flat_i, flat_g)]).double()
        (stats.pre_sum, stats.ft_sum, stats.numel, stats.pre_sq_sum, stats.ft_sq_sum,
         stats.cross_sum) = reduce(sums).tolist()

    if g_a == 0.0 and g_b == -math.inf:
        # S is all zeros (no gradient yet): G = 0 is never above I, nothing is free.
        w.zero_()
        stats.mask_sum = 0.0
        return w, 1.0, stats

    if opts.mask == "binary":
        w.sub_(imp)  # G - I
        w.sign_().clamp_(min=0.0)  # 1 where G > I, else 0
        stats.nonzero = float(reduce(w.sum().double().reshape(1))[0])
        stats.mask_sum = stats.nonzero
        return w, 1.0, stats

    # r = G / (I + G); r > 1/2 exactly where G > I, so thresholding at 1/2 is where(I < G, r, 0)
    imp.add_(w)  # I + G
    w.div_(imp)
    F.threshold_(w, 0.5, 0.0)
    torch.sign(w, out=imp)
    sums = reduce(torch.stack([w.sum(), imp.sum()]).double())
    raw_sum, nonzero = sums.tolist()
    if math.isnan(raw_sum):
        # Both ranks underflowed to 0 somewhere (0/0): there G > I is false, so w = 0. Rare
        # enough to repair after the fact instead of guarding every entry on every step.
        w.nan_to_num_(nan=0.0)
        torch.sign(w, out=imp)
        raw_sum, nonzero = reduce(torch.stack([w.sum(), imp.sum()]).double()).tolist()
    stats.nonzero = nonzero
    if not (opts.normalize and nonzero > 0):
        stats.mask_sum = raw_sum
        return w, 1.0, stats
    # w / mean(w[w != 0]) capped at 1  ==  scale * min(w, 1/scale)
    scale = nonzero / raw_sum
    if not fold_scale:
        w.mul_(scale).clamp_(max=1.0)
        if collect:
            stats.mask_sum = float(reduce(w.sum().double().reshape(1))[0])
        return w, 1.0, stats
    w.clamp_(max=1.0 / scale)
    if collect:
        stats.mask_sum = scale * float(reduce(w.sum().double().reshape(1))[0])
    return w, scale, stats


def accumulate(grad_sum: torch.Tensor, grad: torch.Tensor, mode: str) -> None:
    """``S += g`` (``signed``), ``|g|`` (``abs``) or ``g**2`` (``fisher``), in place."""
    if mode == "signed":
        grad_sum.add_(grad)
    elif mode == "abs":
        grad_sum.add_(grad.abs())
    else:  # fisher
        grad_sum.addcmul_(grad, grad)


def apply_keep_weight(
    param: torch.Tensor, theta0: torch.Tensor, w: torch.Tensor, work: torch.Tensor,
    scale: float = 1.0,
) -> None:
    """``param <- theta0 * (1 - w) + param * w``, computed in float32.

    The keep-weight is ``scale * w``. Low-precision parameters (bf16) are combined in float32
    in the authors' order of operations and written back once. ``w`` and ``work`` are
    overwritten.
    """
    if param.dtype == torch.float32 and theta0.dtype == torch.float32:
        # theta0 + scale * w * (param - theta0): two passes instead of five; equal to the
        # authors' form to float32 rounding, and exactly theta0 where w = 0.
        param.sub_(theta0)
        torch.addcmul(theta0, param, w, value=scale, out=param)
        return
    if scale != 1.0:
        w.mul_(scale)
    torch.sub(1.0, w, out=work)
    work.mul_(theta0)
    w.mul_(param)
    w.add_(work)
    param.copy_(w)


# ---------------------------------------------------------------------------- fused update
# The default update above makes ~18 elementwise passes over each tensor in eager PyTorch.
# The same arithmetic in three compiled kernels reads and writes each tensor far fewer times:
#
#   1. S += g (or |g|, g^2), returning [sum|S|, sum S^2]               -> affine of G
#   2. w = where(G/(I+G) > 1/2, G/(I+G), 0) into the work buffer,
#      returning [sum w, count(w > 0)]                                 -> the normaliser
#   3. v = min(w * count / sum w, 1) from kernel 2's sums (no trip to the host), then
#      p <- theta0 + v (p - theta0) (float32), or the authors' blend theta0 (1 - v) + p v
#      in float32 for low-precision parameters.
#
# Between kernels 1 and 2 the sums go through the host for the ranks' scalars; the sums of
# sharded tensors are all-reduced there, and between kernels 2 and 3, as in the eager path.
# The result is the eager one to float rounding.
# Inductor sums float32 in cascades, as accurate as PyTorch's own reductions.

#: tensors with fewer entries take the eager path (a compiled call costs tens of
#: microseconds; the fusion pays off above ~64K entries). Set to 0 to fuse every tensor.
FUSED_MIN_NUMEL = 1 << 16
#: the same for the CPU library: a ctypes call costs a few microseconds, the eager update
#: of a tensor ~20 calls of PyTorch's
NATIVE_MIN_NUMEL = 1 << 12
#: environment variable: 1 fuses on every device, 0 on none; unset, fused on every device
#: (compiled kernels off the CPU, the C library on it).
FUSED_ENV = "SPIDERSCOPE_SPIDER_FUSED"


def fusion_wanted(device: torch.device) -> bool:
    """Whether the update of tensors on ``device`` takes the fused passes by default."""
    env = os.environ.get(FUSED_ENV, "").strip()
    return env != "0"


def _ranks(grad_sum, theta0, coef):
    g = torch.sigmoid(grad_sum.abs() * coef[0] + coef[1])
    i = torch.sigmoid(theta0.abs().float() * coef[2] + coef[3])
    return i, g


def _accumulate_kernel(grad_sum, grad, mode: str):
    if mode == "signed":
        grad_sum.add_(grad)
    elif mode == "abs":
        grad_sum.add_(grad.abs())
    else:
        grad_sum.addcmul_(grad, grad)
    return torch.stack([grad_sum.abs().sum(), (grad_sum * grad_sum).sum()])


def _mask_kernel(grad_sum, theta0, coef, out, binary: bool):
    i, g = _ranks(grad_sum, theta0, coef)
    if binary:
        w = (g > i).float()
    else:
        r = g / (i + g)
        # r > 1/2 exactly where G > I; a NaN r (both ranks underflowed) is not, so w = 0 there
        w = torch.where(r > 0.5, r, torch.zeros_like(r))
    out.copy_(w)
    return torch.stack([w.sum(), (w > 0).float().sum()])


def _merge_kernel(param, theta0, w, mask_sums, normalize: bool, full_precision: bool):
    if normalize:  # w / mean(w[w != 0]) capped at 1; kernel 2's sums, no trip to the host
        raw_sum, nonzero = mask_sums[0], mask_sums[1]
        scale = torch.where(nonzero > 0, nonzero / raw_sum, torch.ones_like(raw_sum))
        v = torch.clamp(w * scale, max=1.0)
    else:
        v = w
    if full_precision:
        param.copy_(theta0 + v * (param - theta0))
    else:
        param.copy_((theta0.float() * (1.0 - v) + param.float() * v).to(param.dtype))


@torch.no_grad()  # as in the update: grad mode is part of what a compiled kernel guards
def _check_passes(kernels, what: str, device: torch.device, param_dtype: torch.dtype,
                  theta0_dtype: torch.dtype, options: SpiderOptions) -> None:
    """Run ``kernels``' three passes once on a probe tensor and compare each with the eager
    update (raises ``RuntimeError`` naming the pass that differs). Why: a compiler can build
    a kernel that runs and is wrong (torch 2.13's inductor left the tail of a bf16 tensor
    unsummed under ATEN_CPU_CAPABILITY=avx2); such kernels are then not used at all."""
    # above FUSED_MIN_NUMEL: compiled kernels specialise on size ranges, so probe the range
    # the update will mostly see
    n = 70_001
    s = torch.zeros(n, dtype=torch.float32, device=device)
    g = torch.linspace(-1, 1, n, device=device).to(param_dtype)
    t0 = torch.linspace(2, -1, n, device=device).to(theta0_dtype)
    p = (t0.float() + 0.05 * g.float()).to(param_dtype)  # moved a little from theta0
    w = torch.empty(n, dtype=torch.float32, device=device)
    binary = options.mask == "binary"
    sums = kernels.accumulate(s, g, options.accumulate)
    expected_s = torch.zeros_like(s)
    accumulate(expected_s, g, options.accumulate)
    if not torch.equal(s, expected_s):
        raise RuntimeError(f"{what} S += g differs from the eager one")
    coef = [*affine_from_sums(abs_sums(s)), *affine_from_sums(abs_sums(t0))]
    if isinstance(sums, torch.Tensor):  # compiled: scalars as a tensor (no recompiles)
        coef = torch.tensor(coef, dtype=torch.float32, device=device)
    mask_sums = kernels.mask(s, t0, coef, w, binary)
    expected_w = keep_weight(t0, s, dataclasses.replace(options, normalize=False))[0]
    if not torch.allclose(w, expected_w, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"{what} mask differs from the eager one")
    expected_p = p.clone()
    keep, scale, _ = keep_weight_scaled(t0, s, options)
    apply_keep_weight(expected_p, t0, keep, torch.empty_like(keep), scale)
    kernels.merge(p, t0, w, mask_sums, options.normalize and not binary,
                  param_dtype == theta0_dtype == torch.float32)
    ulp = 1e-6 if param_dtype == torch.float32 else 1e-2
    if not torch.allclose(p.float(), expected_p.float(), rtol=ulp, atol=ulp):
        raise RuntimeError(f"{what} merge differs from the eager one")


class _Kernels:
    """The three kernels, compiled once per process; ``None`` members mean eager."""

    def __init__(self) -> None:
        self.accumulate = self.mask = self.merge = None
        self.checked: dict[tuple, bool] = {}
        self.generation = 0  # counts disable() calls: decisions cached before are stale

    def usable(self, device: torch.device, param_dtype: torch.dtype, theta0_dtype: torch.dtype,
               options: SpiderOptions) -> bool:
        """Whether the compiled kernels work for this device, these dtypes and options
        (tried once on a probe tensor; a failing compiler means eager, with one warning)."""
        key = (device.type, param_dtype, theta0_dtype, options.accumulate, options.mask,
               options.normalize)
        if key not in self.checked:
            self.checked[key] = self._probe(device, param_dtype, theta0_dtype, options)
        return self.checked[key]

    def disable(self, error: Exception, device: torch.device) -> None:
        """Turn the kernels off for the rest of the process (one warning)."""
        self.checked = collections.defaultdict(bool)
        self.generation += 1
        warnings.warn(f"SPIDER: compiled update unavailable on {device.type} "
                      f"({type(error).__name__}: {error}); using the eager update",
                      RuntimeWarning, stacklevel=4)

    @torch.no_grad()  # as in the update: grad mode is part of what a compiled kernel guards
    def _probe(self, device, param_dtype, theta0_dtype, options) -> bool:
        try:
            if self.accumulate is None:
                compile_ = functools.partial(torch.compile, dynamic=True)
                self.accumulate = compile_(_accumulate_kernel)
                self.mask = compile_(_mask_kernel)
                self.merge = compile_(_merge_kernel)
            _check_passes(self, "compiled", device, param_dtype, theta0_dtype, options)
            return True
        except Exception as error:  # noqa: BLE001 - any compiler failure means "use eager"
            self.disable(error, device)
            return False


_KERNELS = _Kernels()


class _NativeBackend:
    """The CPU library (``spider.methods._native``) behind the compiled kernels' interface:
    float32 tensors only (others take the eager update)."""

    def __init__(self) -> None:
        self.kernels = None
        self.checked: dict[tuple, bool] = {}
        self.generation = 0  # counts disable() calls: decisions cached before are stale

    def usable(self, device: torch.device, param_dtype: torch.dtype, theta0_dtype: torch.dtype,
               options: SpiderOptions) -> bool:
        if not (device.type == "cpu" and param_dtype == theta0_dtype == torch.float32):
            return False
        key = (options.accumulate, options.mask, options.normalize)
        if key not in self.checked:
            self.checked[key] = self._probe(options)
        return self.checked[key]

    def disable(self, error: Exception, device: torch.device) -> None:
        self.checked = collections.defaultdict(bool)
        self.generation += 1
        warnings.warn(f"SPIDER: fused CPU update unavailable ({type(error).__name__}: "
                      f"{error}); using the eager update", RuntimeWarning, stacklevel=4)

    @torch.no_grad()
    def _probe(self, options: SpiderOptions) -> bool:
        """Build (or load) the library and check its passes against the eager ones once."""
        try:
            self.kernels = self.kernels or _native.kernels()
            cpu = torch.device("cpu")
            _check_passes(self.kernels, "the CPU library's", cpu, torch.float32,
                          torch.float32, options)
            return True
        except Exception as error:  # noqa: BLE001 - any build or load failure means eager
            self.disable(error, torch.device("cpu"))
            return False

    def __getattr__(self, name):  # accumulate, mask, merge: the loaded library's
        if name in ("accumulate", "mask", "merge") and self.kernels is not None:
            return getattr(self.kernels, name)
        raise AttributeError(name)


_NATIVE = _NativeBackend()


def _as_floats(sums) -> list[float]:
    return sums if isinstance(sums, list) else sums.tolist()


@register("spider")
class Spider(MethodBase):
    """SPIDER (ICML 2025): pull each weight back toward theta0 unless G > I."""

    Options = SpiderOptions
    shardable = True
    summary = ("SPIDER: per weight, compare pre-training importance (|theta0| rank) with "
               "fine-tuning importance (accumulated-gradient rank); pull weights back to "
               "theta0 unless the downstream task matters more.")

    def __init__(self, model, options: SpiderOptions | None = None):
        super().__init__(model, options)
        # Under FSDP2 the parameters are sharded (DTensors): the method keeps theta0 and S for
        # this process's shard only and all-reduces the per-tensor sums behind every rank, so
        # each shard gets exactly the mask the whole tensor would.
        self.theta0 = {name: local(p).detach().clone() for name, p in self.params.items()}
        self.grad_sum = {
            name: torch.zeros(local(p).shape, dtype=torch.float32, device=local(p).device)
            for name, p in self.params.items()
        }
        #: all-reduce hook for sharded tensors: float64 vector of local sums -> global sums.
        self.reducer: Reducer | None = sum_across if any_sharded(self.params.values()) else None
        self._pre_affine: dict[str, tuple[float, float]] = {}
        self._work: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        #: tensors with at least this many entries (per process) take the fused update;
        #: None: the backend's own minimum (``NATIVE_MIN_NUMEL`` or ``FUSED_MIN_NUMEL``)
        self.fused_min_numel: int | None = None
        #: True/False force the fused update on/off; None follows ``fusion_wanted``
        self.fused: bool | None = None
        #: "native" (the C library, CPU float32 only) or "compiled" (torch.compile, any
        #: device); None: native on CPUs, compiled elsewhere
        self.fused_backend: str | None = None
        # per step, the fused tensors and their flat views are looked up, not re-derived:
        # at ~25 us of Python a tensor that was a tenth of the whole update
        self._fused_key: tuple | None = None
        self._fused_set: frozenset[str] = frozenset()
        self._flat: dict[str, tuple[torch.Tensor, ...]] = {}

    # ------------------------------------------------------------------ internals
    def _buffers(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 work buffers shaped like ``like``, views of per-device scratch."""
        device = like.device
        if device not in self._work:
            largest = max(t.numel() for t in self.theta0.values() if t.device == device)
            self._work[device] = (
                torch.empty(largest, dtype=torch.float32, device=device),
                torch.empty(largest, dtype=torch.float32, device=device),
            )
        a, b = self._work[device]
        n = like.numel()
        return a[:n].view(like.shape), b[:n].view(like.shape)

    def _affine_pre(self, name: str) -> tuple[float, float]:
        if name not in self._pre_affine:
            sums = abs_sums(self.theta0[name])
            if self.reducer is not None:
                sums = self.reducer(sums)
            self._pre_affine[name] = affine_from_sums(sums)
        return self._pre_affine[name]

    def _accumulate(self, grad_sum: torch.Tensor, grad: torch.Tensor) -> None:
        accumulate(grad_sum, grad, self.options.accumulate)

    def _weight(self, name: str, out: torch.Tensor, work: torch.Tensor, collect: bool = False,
                importances=None):
        """``(v, scale, stats)`` for tensor ``name``: its keep-weight is ``scale * v``."""
        return keep_weight_scaled(
            self.theta0[name], self.grad_sum[name], self.options, out=out, work=work,
            pre_affine=self._affine_pre(name), reducer=self.reducer, collect=collect,
            importances=importances,
        )

    def _kernels(self, device: torch.device):
        """The fused passes for tensors on ``device``."""
        if self.fused_backend is not None:
            return {"native": _NATIVE, "compiled": _KERNELS}[self.fused_backend]
        return _NATIVE if device.type == "cpu" else _KERNELS

    def _fused(self, name: str) -> bool:
        """Whether tensor ``name`` takes the fused update (``_fused_update``)."""
        theta0, param = self.theta0[name], local(self.params[name].data)
        wanted = fusion_wanted(param.device) if self.fused is None else self.fused
        kernels = self._kernels(param.device)
        minimum = self.fused_min_numel
        if minimum is None:
            minimum = NATIVE_MIN_NUMEL if kernels is _NATIVE else FUSED_MIN_NUMEL
        return (wanted and theta0.numel() >= max(minimum, 1)
                and param.is_contiguous() and param.is_floating_point()
                and kernels.usable(param.device, param.dtype, theta0.dtype, self.options))

    def _fused_names(self) -> frozenset[str]:
        """The tensors ``_fused`` says yes to, recomputed only when what it depends on
        changes (the switches, the environment, a backend turned off)."""
        key = (self.fused, self.fused_min_numel, self.fused_backend,
               os.environ.get(FUSED_ENV, ""), _NATIVE.generation, _KERNELS.generation)
        if key != self._fused_key:
            self._fused_set = frozenset(n for n in self.params if self._fused(n))
            self._fused_key = key
        return self._fused_set

    def _flat_views(self, name: str) -> tuple[torch.Tensor, ...]:
        """``(S, theta0, w, work)`` of tensor ``name``, flat (the buffers' first numel)."""
        if name not in self._flat:
            grad_sum, theta0 = self.grad_sum[name].view(-1), self.theta0[name].view(-1)
            self._flat[name] = (grad_sum, theta0, *self._buffers(grad_sum))
        return self._flat[name]

    def _fused_update(self, name: str, p: torch.Tensor) -> bool:
        """The update of tensor ``name`` in three fused passes. Should a pass fail (a
        recompile for a new size that the compiler cannot do), fusion is turned off and
        the rest of this tensor's update runs eagerly; returns False when nothing was done
        yet (the caller then runs the whole eager update)."""
        grad_sum, theta0, w, work = self._flat_views(name)
        param = local(p.data).view(-1)
        grad = None if p.grad is None else local(p.grad).reshape(-1)
        kernels = self._kernels(param.device)
        if kernels is _NATIVE and not _native.NativeKernels.accepts(
                param, *(() if grad is None else (grad,))):
            # the C passes read raw float32 CPU memory: a model moved or cast after the
            # method was built (which the cached choice of fused tensors cannot see) is
            # updated eagerly, where PyTorch checks devices and dtypes
            return False
        try:
            if grad is not None:
                sums = kernels.accumulate(grad_sum, grad, self.options.accumulate)
            else:
                sums = torch.stack([grad_sum.abs().sum(), grad_sum.square().sum()])
        except Exception as error:  # noqa: BLE001 - nothing changed yet: all eager
            kernels.disable(error, param.device)
            return False
        try:
            mask_sums = self._fused_weight(name, sums, w)
            kernels.merge(param, theta0, w, mask_sums, self._normalizes(),
                          param.dtype == theta0.dtype == torch.float32)
        except Exception as error:  # noqa: BLE001 - S is updated: finish eagerly from it
            kernels.disable(error, param.device)
            _, scale, _ = self._weight(name, w, work)
            apply_keep_weight(param, theta0, w, work, scale)
        return True

    def _fused_weight(self, name: str, sums: torch.Tensor | None,
                      w: torch.Tensor) -> torch.Tensor:
        """Pass 2 into ``w`` (flat): the raw mask. Returns ``[sum w, count(w > 0)]`` over
        the whole tensor, from which pass 3 normalises. ``sums`` are pass 1's
        ``[sum|S|, sum S^2]`` (computed here when None)."""
        grad_sum, theta0 = self._flat_views(name)[:2]
        kernels = self._kernels(w.device)
        native = kernels is _NATIVE  # its sums are Python floats, its scalars too
        if sums is None:
            sums = torch.stack([grad_sum.abs().sum(), grad_sum.square().sum()]).tolist()
        if not isinstance(sums, list):
            sums = sums.tolist()
        if self.reducer is None:
            moments = [float(grad_sum.numel()), *sums]
        else:
            moments = self.reducer(torch.tensor([float(grad_sum.numel()), *sums],
                                                dtype=torch.float64, device=w.device))
        coef = [*affine_from_sums(moments), *self._affine_pre(name)]
        if not native:  # a tensor, not Python floats: new values never recompile a kernel
            coef = torch.tensor(coef, dtype=torch.float32, device=w.device)
        mask_sums = kernels.mask(grad_sum, theta0, coef, w, self.options.mask == "binary")
        if self.reducer is not None:
            reduced = self.reducer(torch.as_tensor(mask_sums, dtype=torch.float64,
                                                   device=w.device))
            # back as they came: a compiled kernel guards its inputs' dtype
            mask_sums = reduced.tolist() if native else reduced.to(mask_sums.dtype)
        return mask_sums

    def _normalizes(self) -> bool:
        return self.options.normalize and self.options.mask != "binary"

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        collect = self.collect_statistics
        stats: dict[str, dict[str, float]] = {}
        fused = frozenset() if collect else self._fused_names()
        for name, p in self.params.items():
            if name in fused and self._fused_update(name, p):
                continue
            if p.grad is not None:
                self._accumulate(self.grad_sum[name], local(p.grad))
            w, work = self._buffers(self.theta0[name])
            _, scale, tensor_stats = self._weight(name, w, work, collect=collect)
            if collect:
                stats[name] = tensor_stats.as_row()
                stats[name]["mask_churn"] = self.mask_churn(name, w > 0, self.reducer)
            apply_keep_weight(local(p.data), self.theta0[name], w, work, scale)
        if collect:
            self._last_statistics = stats
        self.steps_done += 1

    # ------------------------------------------------------------------ views
    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            if self._fused(name):  # the very pass the update uses, so the same pinned set
                w = torch.empty(self.grad_sum[name].shape, dtype=torch.float32,
                                device=self.grad_sum[name].device)
                raw_sum, nonzero = _as_floats(self._fused_weight(name, None, w.view(-1)))
                if self._normalizes() and nonzero > 0:  # the authors' min(w * scale, 1)
                    w.mul_(nonzero / raw_sum).clamp_(max=1.0)
                out[name] = as_logical(w, p)
                continue
            w, _ = keep_weight(
                self.theta0[name], self.grad_sum[name], self.options,
                pre_affine=self._affine_pre(name), reducer=self.reducer,
            )
            out[name] = as_logical(w, p)
        return out

    @torch.no_grad()
    def importances(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.params:
            w, work = self._buffers(self.grad_sum[name])

            def keep(pre, ft, name=name):
                like = self.params[name]
                out[name] = {"pre": as_logical(pre.clone(), like),
                             "ft": as_logical(ft.clone(), like)}

            self._weight(name, w, work, importances=keep)
        return out

    @torch.no_grad()
    def compute_statistics(self) -> dict[str, dict[str, float]]:
        stats = {}
        for name in self.params:
            w, work = self._buffers(self.grad_sum[name])
            stats[name] = self._weight(name, w, work, collect=True)[2].as_row()
            stats[name]["mask_churn"] = self.mask_churn(name, w > 0, self.reducer)
        assert all(set(row) == set(STAT_COLUMNS) for row in stats.values())
        return stats

    # ------------------------------------------------------------------ state
    # State tensors have the parameters' full shapes (sharded ones as DTensors, gathered by
    # the caller); loading takes whole tensors and keeps this process's shard.
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"theta0/{n}": as_logical(t, self.params[n]) for n, t in self.theta0.items()}
        state.update(self.analysis_state())
        return state

    def analysis_state(self) -> dict[str, torch.Tensor]:
        # theta0 is the base model's weights: the analysis reads it from there.
        return {f"grad_sum/{n}": as_logical(t, self.params[n]) for n, t in self.grad_sum.items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        check_state_tensors(self.extra_state(), tensors, "spider")
        for key, tensor in tensors.items():
            kind, name = key.split("/", 1)
            target = self.theta0[name] if kind == "theta0" else self.grad_sum[name]
            target.copy_(shard_of(tensor, self.params[name]))
        self._pre_affine.clear()
