"""Full fine-tuning: the reference every forgetting-mitigation method is judged against.

Rule: ``p <- optimizer(p)`` for every trainable tensor, nothing else (ARCHITECTURE.md,
"Methods"). It exists as a method so that runs, checkpoints and the app treat it like any
other: its keep-weight ``w`` is 1 everywhere, i.e. no entry is pulled back to ``theta0``.
"""

from __future__ import annotations

from typing import ClassVar

from spider.methods.base import MethodBase, NoOptions, register


@register("full")
class FullFineTuning(MethodBase):
    """Every trainable weight trains freely; ``masks()`` is all ones (the base behaviour)."""

    Options: ClassVar[type] = NoOptions
    shardable: ClassVar[bool] = True  # nothing per tensor to reduce
    summary: ClassVar[str] = (
        "Full fine-tuning: every trainable weight is updated; mask is 1 everywhere."
    )
