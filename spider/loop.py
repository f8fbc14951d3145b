"""The one training loop of the project (pre-training and fine-tuning both use it).

nanoGPT-style: one function, read top to bottom, in commented phases. A ``Method``'s hooks are
called at the points ARCHITECTURE.md ("Methods") names; evaluation, logging and checkpointing
are the caller's, through ``LoopHooks`` (several may be given; they are called in order), so
the loop itself stays short. ``LoopConfig`` holds the loop's settings once, with their
defaults and help: the entry points' configs (``spider.train.RunConfig``,
``spider.pretrain.PretrainConfig``) extend it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from spider.distributed import Dist, gradient_sync
from spider.errors import RunFailed, UserError


def config_field(default, help_text: str = "", **kwargs):
    """A config field; ``help`` makes it a command-line flag of the entry points."""
    metadata = {"help": help_text} if help_text else {}
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass
class LoopConfig:
    """The loop's settings (defaults: fine-tuning's; pre-training overrides some)."""

    steps: int = config_field(150, "optimizer steps")
    lr: float = config_field(3e-4, "peak learning rate (AdamW)")
    batch_size: int = config_field(16, "examples per micro-batch")
    grad_accum: int = config_field(1, "micro-batches per optimizer step")
    warmup_steps: int = config_field(10, "linear warm-up steps before the cosine decay")
    weight_decay: float = config_field(0.0, "AdamW weight decay")
    clip: float = config_field(1.0, "max gradient norm (0: no clipping)")
    seed: int = config_field(0, "seed for data, order and method")
    min_lr_ratio: float = config_field(0.1)  # cosine decays to lr * min_lr_ratio
    betas: tuple[float, float] = config_field((0.9, 0.999))


def add_config_flags(parser, config_cls: type) -> None:
    """One ``--flag`` per field of ``config_cls`` that has help (``_`` -> ``-``), typed
    like the field; a bool field is a switch. Unset flags are left out of the parse
    (``argument_default=SUPPRESS`` on the parser) so the dataclass's defaults apply; the
    help text shows each default."""
    from pathlib import Path

    kinds = {"int": int, "float": float, "str": str, "Path": Path}
    for field in dataclasses.fields(config_cls):
        if "help" not in field.metadata or field.type in ("dict", dict):
            continue
        flag = "--" + field.name.replace("_", "-")
        text = field.metadata["help"]
        if field.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=text)
            continue
        default = field.default if field.default_factory is dataclasses.MISSING else (
            field.default_factory())
        if default is not dataclasses.MISSING and default not in (None, "") and (
                "default" not in text.lower()):
            text = f"{text} (default: {str(default).replace('%', '%%')})"
        kind = kinds.get(field.type if isinstance(field.type, str) else field.type.__name__,
                         str)
        parser.add_argument(flag, type=kind, help=text)


class LossNotFinite(RunFailed):
    """The loss became NaN or inf: stop at once, earlier checkpoints stay as they are."""


class LoopHooks:
    """Called by ``train_loop``; every hook is a no-op here."""

    def after_step(self, step: int, record: dict) -> None:
        """``step`` optimizer steps are done; ``record`` holds loss, lr, grad_norm, seconds."""

    def should_stop(self) -> bool:
        """Checked after every step (e.g. SIGTERM received)."""
        return False


class HookList(LoopHooks):
    """Several hooks, called in order; the loop stops when any of them asks to."""

    def __init__(self, hooks: Sequence[LoopHooks]):
        self.hooks = list(hooks)

    def after_step(self, step: int, record: dict) -> None:
        for hook in self.hooks:
            hook.after_step(step, record)

    def should_stop(self) -> bool:
        return any([hook.should_stop() for hook in self.hooks])  # every hook is asked


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class BatchSampler:
    """Which examples make micro-batch ``(step, micro)``: a pure function of the seed.

    Examples are drawn epoch by epoch from seeded permutations, so a resumed run sees exactly
    the batches an uninterrupted one would. ``mix`` adds a second dataset (data-hybrid
    training): a share ``ratio`` of every micro-batch comes from it. With ``world`` processes
    (data parallel), process ``rank``'s micro-batch ``m`` is number ``m * world + rank`` of the
    single-process order: the step's global batch is the same examples as one process with
    ``world`` times the accumulation.
    """

    def __init__(self, size: int, batch_size: int, grad_accum: int, seed: int,
                 mix_size: int = 0, mix_ratio: float = 0.0, rank: int = 0, world: int = 1):
        if size <= 0:
            raise UserError("the training dataset is empty")
        self.size, self.batch_size, self.grad_accum, self.seed = size, batch_size, grad_accum, seed
        self.rank, self.world = rank, world
        self.mix_size = mix_size
        self.n_mix = int(round(batch_size * mix_ratio)) if mix_size > 0 else 0
        self.n_main = batch_size - self.n_mix

    @staticmethod
    def _take(size: int, seed: int, stream: int, start: int, count: int) -> list[int]:
        out: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, size)
            perm = np.random.default_rng([seed, stream, epoch]).permutation(size)
            chunk = perm[offset: offset + count]
            out.extend(int(i) for i in chunk)
            start += len(chunk)
            count -= len(chunk)
        return out

    def indices(self, step: int, micro: int) -> tuple[list[int], list[int]]:
        """(indices into the main dataset, indices into the mixed-in one)."""
        position = (step * self.grad_accum + micro) * self.world + self.rank
        main = self._take(self.size, self.seed, 0, position * self.n_main, self.n_main)
        mixed = (self._take(self.mix_size, self.seed, 1, position * self.n_mix, self.n_mix)
                 if self.n_mix else [])
        return main, mixed


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (the authors' setting); plain float32 on CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(params: Sequence[torch.nn.Parameter] | Sequence[dict], cfg: LoopConfig
                   ) -> torch.optim.AdamW:
    """AdamW over ``params``: tensors, or param-group dicts; a group's ``lr_scale`` multiplies
    the scheduled learning rate for it (e.g. a gentler rate for a vision tower)."""
    params = [g for g in params if not isinstance(g, dict) or g["params"]]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient "
                        "(check --train and --train-last-layers)")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def train_loop(
    model: torch.nn.Module,
    method,
    optimizer: torch.optim.Optimizer,
    get_batch: Callable[[int, int], dict[str, torch.Tensor]],
    cfg: LoopConfig,
    hooks: LoopHooks | Sequence[LoopHooks] | None = None,
    start_step: int = 0,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
) -> int:
    """Train from ``start_step`` to ``cfg.steps``; returns the number of steps done.

    ``get_batch(step, micro)`` returns model inputs (with ``labels``) on ``device``. ``model``
    may be wrapped by DDP or sharded by FSDP2 (``spider.distributed``); ``dist`` then averages
    the reported loss over processes so that all of them stop together on a non-finite one.
    """
    hooks = HookList(hooks) if isinstance(hooks, Sequence) else (hooks or LoopHooks())
    dist = dist or Dist()
    device = torch.device(device)
    autocast = autocast_for(device)
    trainable = [p for p in method.trainable_parameters()]
    model.train()
    step = start_step
    while step < cfg.steps:
        t0 = time.perf_counter()
        # -- phase 1: learning rate for this step
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # -- phase 2: forward/backward over the micro-batches (gradient accumulation)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = get_batch(step, micro)
            # several processes: gradients are averaged once, after the last micro-batch
            with gradient_sync(model, micro == cfg.grad_accum - 1):
                with autocast():
                    outputs = model(**batch)
                    loss = outputs.loss
                    extra = method.output_penalty(batch, outputs)  # LwF: from the outputs
                    if extra is not None:
                        loss = loss + extra
                    del outputs
                penalty = method.loss_penalty()
                if penalty is not None:
                    loss = loss + penalty
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        loss_mean = dist.mean(loss_sum / cfg.grad_accum)
        if not math.isfinite(loss_mean):  # before the step: the weights stay as they were
            raise LossNotFinite(f"loss is not finite at step {step + 1}; try a lower --lr")
        # -- phase 3: clip
        if cfg.clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable
                                                             if p.grad is not None]))
        if not math.isfinite(grad_norm):  # a finite loss with an overflowing backward pass
            raise LossNotFinite(f"the gradient is not finite at step {step + 1} (its norm is "
                                f"{grad_norm}); try a lower --lr")
        # -- phase 4: the method's hooks around the optimizer step
        method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # -- phase 5: report; evaluation and checkpoints happen in the hooks
        hooks.after_step(step, {
            "step": step, "loss": loss_mean, "lr": lr,
            "grad_norm": grad_norm, "seconds": time.perf_counter() - t0,
        })
        if hooks.should_stop():
            break
    return step
