"""Examples -> model inputs, the same prompt format for training and generation.

The whole batch goes through the model's own processor in one call, so every tensor the
processor makes reaches the model exactly as the processor makes it: ``pixel_values`` and
``input_ids`` as well as ``image_grid_thw``, ``mm_token_type_ids`` (Qwen2-VL's multimodal
rotary positions), ``token_type_ids`` (Gemma 3's and PaliGemma's bidirectional attention
over the image), ``pixel_attention_mask``, ``image_sizes``, ``num_crops``... Images go in as
one list per example (Gemma 3, SmolVLM and Idefics3 need that); a text-only example has an
empty list and the language model alone sees it.

Two prompt conventions:

- **Chat template** (most families). The conversation is rendered with the processor's
  template, images first in the first user message (the template places them, before or
  after the text, as the family does). The answers are located by rendering the same
  conversation with a unique stand-in for each answer: the text around the stand-ins is
  the template's, so this works for templates that render an answer turn differently from
  the generation prompt (LLaVA-OneVision prompts ``<|im_start|>assistant\\n`` but renders
  ``<|im_start|>assistant \\n`` before an answer). Each answer is trained together with the
  end-of-turn marker the template writes after it; a template that writes none (LLaVA-1.5
  ends answers with a space) gets the tokenizer's end-of-sequence token after each answer,
  so the model learns to stop. Everything else (template, questions, image tokens, pads) is
  -100 in ``labels``.
- **Prompt + suffix** (PaliGemma, which ships no chat template): the processor takes the
  question as the prompt and the answer as ``suffix`` and builds ``labels`` and
  ``token_type_ids`` itself. Earlier turns of a conversation become part of the prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spider.data.records import IMAGE_MARKER, Example, Turn
from spider.errors import UserError

# Processor outputs with one entry per token; truncation cuts them together.
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")
# Stands in for the i-th answer while rendering: private-use characters, never in real text,
# and untouched by the filters templates apply to content (trim, upper...).
_ANSWER_STAND_IN = "\ue000{}\ue001"


def _strip_marker(text: str) -> str:
    """The human text without ``<image>`` markers (the template places the images)."""
    return text.replace(IMAGE_MARKER, "").strip()


def _messages(
    turns: Sequence[Turn | tuple[str, str]], question: str | None, n_images: int
) -> list[dict]:
    """Chat messages for ``turns`` (answered) and optionally a final unanswered question;
    ``n_images`` image items open the first user message."""
    pairs = [(t.human, t.gpt) if isinstance(t, Turn) else (t[0], t[1]) for t in turns]
    messages: list[dict] = []
    for human, gpt in pairs:
        messages.append(
            {"role": "user", "content": [{"type": "text", "text": _strip_marker(human)}]}
        )
        messages.append({"role": "assistant", "content": [{"type": "text", "text": gpt}]})
    if question is not None:
        messages.append(
            {"role": "user", "content": [{"type": "text", "text": _strip_marker(question)}]}
        )
    if messages:
        messages[0]["content"][:0] = [{"type": "image"} for _ in range(n_images)]
    return messages


def chat_template(processor) -> str | None:
    """The processor's chat template, or its tokenizer's (some models keep it there)."""
    template = getattr(processor, "chat_template", None)
    if template is None:
        template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    return template


def takes_suffix(processor) -> bool:
    """Whether ``processor`` follows the prompt + ``suffix`` convention for training examples
    (PaliGemma, which ships no chat template): it then builds labels and token types itself."""
    try:
        return "suffix" in inspect.signature(type(processor).__call__).parameters
    except (TypeError, ValueError):
        return False


def uses_suffix(processor) -> bool:
    """Whether examples go to ``processor`` as prompt + ``suffix`` (no chat template)."""
    return chat_template(processor) is None and takes_suffix(processor)


def _render(processor, messages: list[dict], generation_prompt: bool) -> str:
    template = chat_template(processor)
    if template is None:
        raise UserError(
            f"the processor ({type(processor).__name__}) has no chat template, so prompts cannot "
            "be formatted; save the model directory with one (chat_template.jinja)."
        )
    kwargs = {"chat_template": template, "tokenize": False,
              "add_generation_prompt": generation_prompt}
    try:
        return processor.apply_chat_template(messages, **kwargs)
    except AttributeError:
        if getattr(processor, "video_processor", None) is not None:
            raise
        # A family's own apply_chat_template may read video defaults (SmolVLM's does); a
        # processor assembled without its video part renders with the common one.
        from transformers import ProcessorMixin

        return ProcessorMixin.apply_chat_template(processor, messages, **kwargs)


def prompt_text(
    processor, turns_before: Sequence[Turn | tuple[str, str]], question: str, n_images: int = 1
) -> str:
    """The text a model sees before answering ``question`` after ``turns_before``.

    Rendered with the processor's chat template and its generation prompt; ``n_images``
    images open the first user message, and any ``<image>`` marker in the texts is dropped.
    For a prompt + suffix processor: the earlier turns and the question, one per line.
    """
    if uses_suffix(processor):
        return _suffix_prompt(processor, turns_before, question, n_images)
    return _render(processor, _messages(turns_before, question, n_images), generation_prompt=True)


def _suffix_prompt(
    processor, turns_before: Sequence[Turn | tuple[str, str]], question: str, n_images: int
) -> str:
    """The family's own prompt: its image token once per image, then the text (the
    processor adds what follows the images, e.g. PaliGemma's BOS, and the newline)."""
    lines = []
    for turn in turns_before:
        human, gpt = (turn.human, turn.gpt) if isinstance(turn, Turn) else turn
        lines += [_strip_marker(human), gpt.strip()]
    image_token = getattr(processor, "image_token", None) or IMAGE_MARKER
    return image_token * n_images + "\n".join([*lines, _strip_marker(question)])


@dataclass(frozen=True)
class Rendered:
    """A conversation rendered for training: its text and the character spans trained
    (each answer with the end-of-turn marker after it)."""

    text: str
    trained: list[tuple[int, int]]


def render_for_training(processor, example: Example) -> Rendered:
    """The training text of ``example`` and where its answers are (see the module doc)."""
    turns = example.turns
    n_images = len(example.images)
    stand_ins = [_ANSWER_STAND_IN.format(i) for i in range(len(turns))]
    with_stand_ins = [(t.human, s) for t, s in zip(turns, stand_ins)]
    skeleton = _render(processor, _messages(with_stand_ins, None, n_images), False)
    pieces = []
    rest = skeleton
    for stand_in in stand_ins:
        before, found, rest = rest.partition(stand_in)
        if not found or stand_in in rest:
            raise UserError(
                f"example '{example.id}': the chat template does not render each answer exactly "
                "once, so answers cannot be located for training."
            )
        pieces.append(before)
    pieces.append(rest)

    eos_text = getattr(processor.tokenizer, "eos_token", None)
    text, plain, trained = pieces[0], pieces[0], []
    for i, turn in enumerate(turns):
        answer = turn.gpt.strip()
        # what the template writes right after this answer when it ends the conversation
        alone = _render(processor, _messages(with_stand_ins[: i + 1], None, n_images), False)
        marker = alone[alone.index(stand_ins[i]) + len(stand_ins[i]):].rstrip()
        start = len(text)
        if marker and pieces[i + 1].startswith(marker):
            text += answer
            trained.append((start, len(text) + len(marker)))
        elif eos_text:
            text += answer + eos_text  # the template ends no answer: teach stopping anyway
            trained.append((start, len(text)))
        else:
            text += answer
            trained.append((start, len(text)))
        text += pieces[i + 1]
        plain += answer + pieces[i + 1]

    real_turns = [(t.human, t.gpt.strip()) for t in turns]
    if _render(processor, _messages(real_turns, None, n_images), False) != plain:
        raise UserError(
            f"example '{example.id}': the chat template changes the answers' text, so answers "
            "cannot be located for training."
        )
    return Rendered(text, trained)


def _check_batch(examples: Sequence[Example]) -> None:
    from PIL import Image

    if not examples:
        raise UserError("cannot collate an empty batch of examples.")
    for example in examples:
        for image in example.images:
            if not isinstance(image, Image.Image):
                raise UserError(
                    f"example '{example.id}': image is a {type(image).__name__}, not a PIL image."
                )
            if image.mode != "RGB":
                raise UserError(
                    f"example '{example.id}': image has mode '{image.mode}', but the processor "
                    "takes RGB images."
                )
        if not example.turns:
            raise UserError(f"example '{example.id}' has no conversation turns.")


def _images_argument(examples: Sequence[Example]):
    """One list of images per example, or ``None`` for a batch without any image."""
    nested = [ex.images for ex in examples]
    return nested if any(nested) else None


def _process(processor, examples: Sequence[Example], texts: list[str], **kwargs):
    """Run the processor on a batch; on failure find and name the example it choked on."""
    try:
        return processor(text=texts, images=_images_argument(examples), return_tensors="pt",
                         **kwargs)
    except Exception as batch_error:  # any processor failure: find which example caused it
        suffixes = kwargs.get("suffix")
        for i, (example, text) in enumerate(zip(examples, texts)):
            one = {} if suffixes is None else {"suffix": suffixes[i:i + 1]}
            try:
                processor(text=[text], images=_images_argument([example]), return_tensors="pt",
                          **one)
            except Exception as err:
                raise UserError(_processor_refusal(processor, example, err)) from None
        reason = " ".join(str(batch_error).split()) or type(batch_error).__name__
        raise UserError(
            f"the processor ({type(processor).__name__}) could not take a batch mixing "
            f"examples {', '.join(repr(e.id) for e in examples[:3])}... ({reason})."
        ) from None


def _processor_refusal(processor, example: Example, err: Exception) -> str:
    name = type(processor).__name__
    n = len(example.images)
    if n == 0:
        return (f"example '{example.id}' is text-only, but the processor ({name}) does not take "
                "an example without an image.")
    if n > 1:
        return (f"example '{example.id}' has {n} images, but the processor ({name}) could not "
                f"take several images in one example ({_one_line(err)}).")
    return f"example '{example.id}': the processor could not take it ({_one_line(err)})."


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer that has no padding token its end-of-sequence (else unknown) token as one.

    Many LLaVA-style models (Mistral- and Llama-based ones among them) ship no pad token, and
    the processor refuses to pad a batch without one. Which token pads does not matter: the
    attention mask hides pads and their labels are -100. Changes ``tokenizer`` in place.
    """
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise UserError(
        f"the tokenizer ({type(tokenizer).__name__}) has no pad, end-of-sequence or unknown "
        "token, so batches cannot be padded; save the model directory with a pad_token."
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _trained_positions(tokenizer, rendered: Rendered) -> tuple[list[int], int]:
    """Indices of trained tokens in ``tokenizer(rendered.text)``, and that tokenization's
    length. A span's edge is where the tokenization of the text up to it stops agreeing
    with the whole text's: a token straddling an answer's start is trained, one straddling
    its end is not, and tokens a tokenizer appends (an end-of-sequence) never count."""
    whole = tokenizer(rendered.text)["input_ids"]
    positions: list[int] = []
    for start, end in rendered.trained:
        first = _common_prefix(tokenizer(rendered.text[:start])["input_ids"], whole)
        last = _common_prefix(tokenizer(rendered.text[:end])["input_ids"], whole)
        positions += range(first, last)
    return positions, len(whole)


class TrainCollator:
    """``list[Example]`` -> the processor's tensors for the whole conversations + ``labels``.

    Right padding. Sequences longer than ``max_length`` lose tokens from the end (every
    per-token tensor alike); an example whose first answer starts beyond ``max_length`` (so
    its image tokens or first question would be cut) is an error.
    """

    def __init__(self, processor, max_length: int = 2048):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.suffix = uses_suffix(processor)
        ensure_pad_token(self.tokenizer)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        _check_batch(examples)
        if self.suffix:
            batch = self._suffix_batch(examples)
        else:
            batch = self._chat_batch(examples)
        return self._truncate(examples, batch)

    def _suffix_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        prompts = [_suffix_prompt(self.processor, ex.turns[:-1], ex.turns[-1].human,
                                  len(ex.images)) for ex in examples]
        encoded = _process(self.processor, examples, prompts, padding=True,
                           padding_side="right", suffix=[ex.answer.strip() for ex in examples])
        batch = dict(encoded)
        labels = torch.as_tensor(batch["labels"]).clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch

    def _chat_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rendered = [render_for_training(self.processor, ex) for ex in examples]
        encoded = _process(self.processor, examples, [r.text for r in rendered], padding=True,
                           padding_side="right")
        batch = dict(encoded)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, -100)
        for row, (example, one) in enumerate(zip(examples, rendered)):
            positions, n_text = _trained_positions(self.tokenizer, one)
            length = int(mask[row].sum())
            # The processor expands image placeholders, all of them before the first answer:
            # past them its tokens are the tokenizer's, shifted by the expansion.
            shift = length - n_text
            text_ids = self.tokenizer(one.text)["input_ids"]
            tail = min(positions) if positions else n_text
            if shift < 0 or ids[row, shift + tail:length].tolist() != text_ids[tail:]:
                raise UserError(
                    f"example '{example.id}': the processor's tokens do not match the "
                    "conversation's text after the images, so answers cannot be located."
                )
            index = torch.tensor(positions, dtype=torch.long) + shift
            labels[row, index] = ids[row, index]
        batch["labels"] = labels
        return batch

    def _truncate(self, examples, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        for row, example in enumerate(examples):
            trained = (labels[row] != -100).nonzero()
            if len(trained) and int(trained[0]) >= self.max_length:
                raise UserError(
                    f"example '{example.id}': its image tokens and first question take "
                    f"{int(trained[0])} tokens, leaving no room for the answer within "
                    f"max_length={self.max_length}."
                )
        width = batch["input_ids"].shape[1]
        if width <= self.max_length:
            return batch
        shape = batch["input_ids"].shape
        return {k: v[:, : self.max_length]
                if k in _TOKEN_KEYS and torch.is_tensor(v) and v.shape == shape else v
                for k, v in batch.items()}


class GenerationCollator:
    """``list[Example]`` -> left-padded prompts up to each example's last question.

    Left padding puts every prompt's last token in the last column, so batched generation
    appends the answers at the same position. Every tensor the processor makes is kept.
    """

    def __init__(self, processor):
        self.processor = processor
        ensure_pad_token(processor.tokenizer)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        _check_batch(examples)
        prompts = [
            prompt_text(self.processor, ex.turns[:-1], ex.turns[-1].human, len(ex.images))
            for ex in examples
        ]
        encoded = _process(self.processor, examples, prompts, padding=True, padding_side="left")
        encoded.pop("labels", None)  # PaliGemma's processor labels every prompt it makes
        return dict(encoded)
