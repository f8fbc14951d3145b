"""The one record type every dataset yields, built-in or read from LLaVA-style JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Turn:
    """One exchange: the human's text and the answer the model should give."""

    human: str
    gpt: str


@dataclass
class Example:
    """A conversation about no, one or several images.

    Attributes:
        id: names the example in error messages (LLaVA's own files repeat some ids).
        image: the picture (RGB), a list of pictures for a multi-image example, or ``None``
            for a text-only example, which the language model alone sees.
        turns: at least one; the first human text holds one ``<image>`` marker per image
            and no other turn holds any.
        task: which task the example belongs to (``caption``, ``digit``, ``counting``...);
            per-task metrics are reported under this name.
        metric: how the last answer is scored: ``exact`` (normalised exact match) or
            ``cider`` (CIDEr-D against ``references``).
        references: acceptable answers for the last turn; defaults to its ``gpt`` text.
    """

    id: str
    image: Image.Image | list[Image.Image] | None
    turns: list[Turn]
    task: str = "vqa"
    metric: str = "exact"
    references: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.references and self.turns:
            self.references = [self.turns[-1].gpt]

    @property
    def images(self) -> list[Image.Image]:
        """The example's pictures in order: empty for a text-only example."""
        if self.image is None:
            return []
        if isinstance(self.image, (list, tuple)):
            return list(self.image)
        return [self.image]

    @property
    def question(self) -> str:
        """The last human text (what evaluation asks)."""
        return self.turns[-1].human

    @property
    def answer(self) -> str:
        """The last answer (what evaluation expects)."""
        return self.turns[-1].gpt
