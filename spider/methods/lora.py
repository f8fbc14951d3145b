"""LoRA through PEFT: train low-rank adapters, merge them into the base weights at the end.

Why: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., ICLR 2022) is the
default parameter-efficient fine-tuning of MLLMs, and a common answer to forgetting: the
update ``delta W = (alpha / r) * B @ A`` has rank at most ``r``, so it can only move the model
so far ("LoRA learns less and forgets less", Biderman et al., 2024). It is a SPIDER baseline
(ARCHITECTURE.md, "Methods").

Rule, for each targeted ``nn.Linear`` with weight ``W`` (default: every ``nn.Linear`` whose
weight is trainable, except ``lm_head``)::

    y = x W^T + (alpha / r) * x A^T B^T        (A: r x in, B: out x r, B = 0 at the start)
    finalize():  W <- W + (alpha / r) * B @ A  (PEFT ``merge_and_unload``)

LoRA has no per-weight mask: it trains new adapter tensors, not a subset of the original
weights. ``has_masks`` is False and ``masks()`` is empty. PEFT's ``get_peft_model`` freezes
the whole base model, so the other trainable tensors (norms, biases, ``lm_head``) stay at
their pre-trained values. ``self.model`` is the ``PeftModel`` until ``finalize`` and the
merged base model after it (original parameter names and ``requires_grad`` flags).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn

from spider.methods._baseline_utils import (
    FINALIZED_KEY,
    flag,
    load_group,
    number_option,
    pack,
    reject_leftovers,
    take_flag,
    take_group,
)
from spider.methods.base import MethodBase, register

EXCLUDED_BY_DEFAULT = ("lm_head",)


@dataclasses.dataclass
class LoraOptions:
    r: int = dataclasses.field(default=8, metadata={"help": "rank of the adapters B @ A"})
    alpha: float = dataclasses.field(
        default=16.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r"}
    )
    dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "dropout on the adapter input (0 = none)"}
    )
    target: str = dataclasses.field(
        default="",
        metadata={
            "help": "comma-separated module names (or name suffixes, e.g. q_proj,v_proj) to "
            "adapt; empty = every nn.Linear with a trainable weight except lm_head"
        },
    )

    def __post_init__(self) -> None:
        self.r = number_option(self.r, "r", "lora", 1, integer=True)
        self.alpha = number_option(self.alpha, "alpha", "lora", 0.0, low_open=True)
        self.dropout = number_option(self.dropout, "dropout", "lora", 0.0, 1.0, high_open=True)
        if not isinstance(self.target, str):
            raise ValueError(
                f"option 'target' of method 'lora' must be a comma-separated string; "
                f"got {self.target!r}"
            )


def target_modules(model: nn.Module, target: str = "") -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA adapts (only those with a trainable weight).

    With ``target`` empty: all of them except ``lm_head``. Otherwise those whose name equals,
    or ends with ``"." +``, one of the comma-separated entries (PEFT's matching rule).
    """
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad
    ]
    wanted = [t.strip() for t in target.split(",") if t.strip()]
    if not wanted:
        chosen = [n for n in linears if n.rsplit(".", 1)[-1] not in EXCLUDED_BY_DEFAULT]
        if not chosen:
            raise ValueError("lora found no nn.Linear module with a trainable weight to adapt")
        return chosen
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in wanted)]
    if not chosen:
        raise ValueError(
            f"option 'target' of method 'lora' ({target!r}) matches no nn.Linear module with a "
            f"trainable weight; such modules include: {', '.join(linears[:8]) or 'none'}"
        )
    return chosen


@register("lora")
class Lora(MethodBase):
    """Trains PEFT LoRA adapters (no per-weight mask); ``finalize`` merges them into the weights.

    Attributes:
        base_model: the model passed in (PEFT injects the adapters into it in place).
        params: the adapter tensors, by their ``PeftModel`` names.
    """

    Options: ClassVar[type] = LoraOptions
    has_masks: ClassVar[bool] = False
    summary: ClassVar[str] = (
        "LoRA (PEFT): trains low-rank adapters on the linear layers and merges them at the "
        "end; no per-weight mask."
    )

    def __init__(self, model: nn.Module, options: Any | None = None):
        import peft  # imported here: listing the methods should not pay for PEFT

        options = options if options is not None else self.Options()
        names = target_modules(model, options.target)
        self.base_model = model
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        config = peft.LoraConfig(
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")",  # fullmatch
            bias="none",
        )
        super().__init__(peft.get_peft_model(model, config), options)
        self.finalized = False
        self.targets = names  # adapted nn.Linear modules, by their names in the base model

    restores_weights = False  # the adapters are the trained tensors, kept in extra_state

    @torch.no_grad()
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Each adapted weight with its adapter merged in (W + scale * B @ A), base names."""
        if self.finalized:
            return {f"{n}.weight": self.model.get_submodule(n).weight.detach()
                    for n in self.targets}
        peft_root = self.model.base_model.model
        out = {}
        for n in self.targets:
            layer = peft_root.get_submodule(n)
            base = layer.get_base_layer().weight
            out[f"{n}.weight"] = base.detach() + layer.get_delta_weight("default").to(base.dtype)
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def finalize(self) -> None:
        if self.finalized:
            return
        self._unwrap(self.model.merge_and_unload())

    def _unwrap(self, base: nn.Module) -> None:
        """Make the plain base model current again, with its original ``requires_grad``."""
        for name, p in base.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self.model = base
        self.params = {}
        self.finalized = True

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        adapters = {name: p.detach() for name, p in self.params.items()}
        return {FINALIZED_KEY: flag(self.finalized), **pack("adapter", adapters)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        finalized = take_flag(tensors)
        adapters = take_group(tensors, "adapter")
        reject_leftovers(tensors, self.name)
        if finalized:
            if adapters:
                raise ValueError("a finalized lora state has no adapter tensors")
            # The weights given with a finalized state are already merged: drop the adapters.
            if not self.finalized:
                self._unwrap(self.model.unload())
            return
        if self.finalized:
            raise ValueError("cannot load an unfinalized lora state into a finalized method")
        load_group({n: p.data for n, p in self.params.items()}, adapters, "adapter")
