"""Learning without Forgetting: distil the pre-trained model's answers while learning new ones.

Why: LwF (Li & Hoiem, 2016) is the classic data-free regulariser in output space: on the new
task's own batches, the model is asked to keep predicting what the pre-trained model
predicted, so the output distribution drifts less. It is one of the baselines of "How to
Teach Large Multimodal Models New Skills" (Zhu et al. 2025; summary in
``/work/shared/papers/lmm-new-skills-summary.md``), whose released trainer this follows.

Rule (ARCHITECTURE.md, "Methods"), per micro-batch, with ``z`` the model's logits and ``z0``
the logits of the model at theta0 on the same inputs::

    loss <- loss + lam * T^2 * mean over answer tokens of KL(softmax(z0/T) || softmax(z/T))

(``lam = 1``, ``T = 2``). Answer tokens are those whose label is not -100: the logits at
position t predict the label at t + 1, as in the model's own loss; with no labels every
position counts. The KL is computed in float32. The term comes through the ``Method``
protocol's ``output_penalty(batch, outputs)``, which the loop (``spider.loop.train_loop``)
and ``SpiderTrainer`` call with each micro-batch and the model's outputs on it. Nothing is
masked: ``masks()`` is all ones.

The teacher z0, ``teacher`` option:

* ``swap`` (default): theta0 of the trained tensors is kept (one copy, like L2) and swapped
  in for one no-grad forward pass with ``torch.func.functional_call``; the frozen tensors are
  shared with the model being trained.
* ``copy``: a frozen deep copy of the whole model at theta0 is kept and run.

Both give the same z0 (tested). Measured by ``bench/bench_dowser_lwf.py`` on a 7.1M-parameter
LLaVA built from configs (5.3M trained: LLM + projector; CPU, float32, 2 busy shared cores,
batch 8 x (64 image + 32 text) tokens, medians of 7 interleaved steps): kept memory beyond
full fine-tuning 4.00 bytes per trained parameter for swap (theta0 in float32) against 5.38
for copy (the whole model, frozen parts included); a training step 1.05x full fine-tuning's
for swap and 0.94x for copy in that run. The machine's load made that noise larger than the
extra no-grad forward pass itself (about a third of a step; Dowser's step, which adds next
to nothing, measured 0.91x), so only "about the same for both" is established. Swap is the
default: no slower, and for a model whose trained part is smaller than the whole
(``--train attn``, ``--train-last-layers``, a frozen vision tower) much less memory. The
teacher runs in eval mode (no dropout) either way.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from spider.methods._baseline_utils import (
    load_group,
    number_option,
    pack,
    reject_leftovers,
    take_group,
)
from spider.methods.base import MethodBase, choice, register, snapshot

IGNORE_INDEX = -100


@dataclasses.dataclass
class LwfOptions:
    lam: float = dataclasses.field(default=1.0, metadata={
        "help": "weight lambda of the distillation term lambda * T^2 * KL"})
    temperature: float = dataclasses.field(default=2.0, metadata={
        "help": "softmax temperature T of teacher and student"})
    teacher: str = dataclasses.field(default="swap", metadata={
        "help": "how the theta0 model runs: swap (theta0 of the trained tensors swapped in "
                "for a no-grad forward) or copy (a frozen copy of the whole model); same "
                "result, different memory"})

    def __post_init__(self) -> None:
        self.lam = number_option(self.lam, "lam", "lwf", 0.0)
        self.temperature = number_option(self.temperature, "temperature", "lwf", 0.0,
                                         low_open=True)
        choice(self.teacher, ("swap", "copy"), "teacher", "lwf")


def answer_logits(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The logits that predict answer tokens, (N x V): position t predicts label t + 1."""
    if labels is None or logits.dim() < 3:
        return logits.reshape(-1, logits.shape[-1])
    keep = labels[..., 1:] != IGNORE_INDEX
    return logits[..., :-1, :][keep.to(logits.device)]


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """``T^2 * mean_rows KL(softmax(teacher/T) || softmax(student/T))`` in float32."""
    if student.numel() == 0:
        return student.float().sum() * 0.0
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return kl * temperature ** 2


@register("lwf")
class LearningWithoutForgetting(MethodBase):
    """Adds ``lam * T^2 * KL(softmax(z0/T) || softmax(z/T))`` over the answer tokens of each
    batch, ``z0`` from the model at theta0; no mask.

    Attributes:
        theta0: the trained tensors at the start, in their dtype.
        teacher: the frozen copy (``teacher=copy``), else None.
    """

    Options: ClassVar[type] = LwfOptions
    summary: ClassVar[str] = (
        "Learning without Forgetting: adds lam * T^2 * KL(theta0 model's answers || the "
        "model's) on each batch's answer tokens; no mask.")

    def __init__(self, model: nn.Module, options: Any | None = None):
        super().__init__(model, options)
        self.theta0 = snapshot(self.params)
        self.teacher: nn.Module | None = None
        if self.options.teacher == "copy":
            self.teacher = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def teacher_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """z0: the logits of the model at theta0 on ``inputs`` (eval mode, no grad)."""
        if hasattr(getattr(self.model, "config", None), "use_cache"):
            inputs = {"use_cache": False, **inputs}  # no key/value cache to keep
        if self.teacher is not None:
            out = self.teacher(**inputs)
        else:
            was_training = self.model.training
            self.model.eval()
            try:
                out = torch.func.functional_call(self.model, self.theta0, args=(),
                                                 kwargs=inputs, strict=False)
            finally:
                self.model.train(was_training)
        return getattr(out, "logits", out)

    def output_penalty(self, batch: dict, outputs: Any) -> torch.Tensor | None:
        if self.options.lam == 0:
            return None
        labels = batch.get("labels")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student = getattr(outputs, "logits", outputs)
        teacher = self.teacher_logits(inputs)
        term = distillation(answer_logits(student, labels), answer_logits(teacher, labels),
                            self.options.temperature)
        return self.options.lam * term

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict[str, torch.Tensor]:
        return pack("theta0", self.theta0)

    def analysis_state(self) -> dict[str, torch.Tensor]:
        return {}  # theta0 is the base model's: the analysis reads it from there

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        load_group(self.theta0, take_group(tensors, "theta0"), "theta0")
        reject_leftovers(tensors, self.name)
        if self.teacher is not None:  # resumed on the step-k weights: the teacher is theta0
            params = dict(self.teacher.named_parameters())
            with torch.no_grad():
                for name, t in self.theta0.items():
                    params[name].copy_(t)
