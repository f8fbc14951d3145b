"""Output drift: how far the fine-tuned model's answer distributions moved from the base's.

``kl_to_base`` is the mean over examples of the mean over answer tokens of
KL(p_base ‖ p_tuned), the next-token distributions at the answer positions with the
reference answer teacher-forced (the positions training's ``labels`` mark). The base
distributions are taken once, from the step-0 model, and kept whole (exact, not a top-k
sketch): ``positions × vocabulary`` float32 values, e.g. 100 examples of ~6 answer tokens
and an 88-word vocabulary: 0.2 MB; with a 150k-token vocabulary, ~360 MB (on the CPU).
The Evaluator stores them in the run directory (``spider.rundir``) so a resumed run
compares with the same base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spider.data.collate import TrainCollator
from spider.data.records import Example


@torch.no_grad()
def answer_log_probs(model, processor, examples: Sequence[Example], batch_size: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next token at every answer position of ``examples``
    (teacher-forced on the reference answer), as ``(log_probs [positions, vocab] float32 on
    the CPU, counts [examples] int64)``: rows in example order, ``counts[i]`` of them for
    example ``i``. The model's train/eval mode is restored afterwards."""
    collate = TrainCollator(processor)
    device = next(model.parameters()).device
    float_dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    rows, counts = [], []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(list(examples[start:start + batch_size]))
            labels = batch.pop("labels")
            inputs = {k: v.to(device, dtype=float_dtype if v.is_floating_point() else None)
                      if torch.is_tensor(v) else v for k, v in batch.items()}
            logits = model(**inputs).logits
            answer = (labels[:, 1:] != -100).to(logits.device)
            rows.append(logits[:, :-1][answer].float().log_softmax(-1).cpu())
            counts.append(answer.sum(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows), torch.cat(counts).to(torch.int64)


def kl_divergence(base: torch.Tensor, tuned: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean over examples (those with an answer token) of the mean over their positions of
    KL(p_base ‖ p_tuned), from log-probabilities as :func:`answer_log_probs` gives them."""
    if base.shape != tuned.shape:
        raise ValueError(f"base log-probs {tuple(base.shape)} and tuned {tuple(tuned.shape)} "
                         "differ in shape")
    p = base.exp()
    per_position = torch.where(p > 0, p * (base - tuned), torch.zeros_like(p)).sum(-1)
    per_example = [chunk.mean() for chunk in per_position.split(counts.tolist()) if len(chunk)]
    if not per_example:
        return 0.0
    return float(torch.stack(per_example).mean().clamp_min(0.0))
