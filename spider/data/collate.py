"""Examples -> model inputs, the same prompt format for training and generation.

The format comes from the processor's own chat template (the image first in the first user
message), so any LLaVA-style processor that has a template works, and a model is always
asked questions the way it was trained.

Training sequences are cut into segments at the template's answer boundaries::

    [prompt 1 (with image tokens)] [answer 1 + eos] [prompt 2] [answer 2 + eos] ...
     labels -100                    trained          -100       trained

The first prompt goes through the processor (which expands ``<image>`` into image tokens and
makes ``pixel_values``); later segments through its tokenizer alone. A segment boundary is
found by rendering the conversation up to a question with the generation prompt and up to
its answer without, and taking the difference: that works for any template where earlier
turns render the same whatever follows them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spider.data.records import IMAGE_MARKER, Example, Turn
from spider.errors import UserError

# Processor outputs aligned with the text (rebuilt here) rather than with the images.
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}


def _strip_marker(text: str) -> str:
    """The human text without the ``<image>`` marker (the template places the image)."""
    return text.replace(IMAGE_MARKER, "").strip()


def _messages(turns: Sequence[Turn | tuple[str, str]], question: str | None) -> list[dict]:
    """Chat messages for ``turns`` (answered) and optionally a final unanswered question."""
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
        messages[0]["content"].insert(0, {"type": "image"})
    return messages


def _render(processor, messages: list[dict], generation_prompt: bool) -> str:
    template = getattr(processor, "chat_template", None)
    if template is None:  # some models keep it with the tokenizer only
        template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if template is None:
        raise UserError(
            f"the processor ({type(processor).__name__}) has no chat template, so prompts cannot "
            "be formatted; save the model directory with one (chat_template.jinja)."
        )
    return processor.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def prompt_text(processor, turns_before: Sequence[Turn | tuple[str, str]], question: str) -> str:
    """The text a model sees before answering ``question`` after ``turns_before``.

    Rendered with the processor's chat template and its generation prompt; the image goes
    first in the first user message, and any ``<image>`` marker in the texts is dropped.
    """
    return _render(processor, _messages(turns_before, question), generation_prompt=True)


def _segments(processor, example: Example) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of ``example``'s conversation, in order."""
    turns = example.turns
    full = _render(processor, _messages(turns, None), generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of ``full`` already assigned to a segment
    for i, turn in enumerate(turns):
        asked = prompt_text(processor, turns[:i], turn.human)
        answered = _render(processor, _messages(turns[: i + 1], None), generation_prompt=False)
        if not (
            asked.startswith(full[:done])
            and answered.startswith(asked)
            and full.startswith(answered)
        ):
            raise UserError(
                f"example '{example.id}': the chat template renders earlier turns differently "
                "once later ones follow, so answers cannot be located for training."
            )
        segments.append((asked[done:], False))
        segments.append((answered[len(asked) :], True))
        done = len(answered)
    return segments


def _check_batch(examples: Sequence[Example]) -> None:
    if not examples:
        raise UserError("cannot collate an empty batch of examples.")
    for example in examples:
        _check_image(example)


def _check_image(example: Example) -> None:
    from PIL import Image

    if not isinstance(example.image, Image.Image):
        raise UserError(
            f"example '{example.id}': image is a {type(example.image).__name__}, not a PIL image."
        )
    if example.image.mode != "RGB":
        raise UserError(
            f"example '{example.id}': image has mode '{example.image.mode}', but the processor "
            "takes RGB images."
        )
    if not example.turns:
        raise UserError(f"example '{example.id}' has no conversation turns.")


def _process(processor, examples: Sequence[Example], prompts: list[str], **kwargs):
    """Run the processor on a batch; on failure find and name the example it choked on."""
    images = [ex.image for ex in examples]
    try:
        return processor(text=prompts, images=images, return_tensors="pt", **kwargs)
    except Exception:  # any processor failure: find which example caused it
        for example, prompt in zip(examples, prompts):
            try:
                processor(text=[prompt], images=[example.image], return_tensors="pt")
            except Exception as err:
                reason = " ".join(str(err).split()) or type(err).__name__
                raise UserError(
                    f"example '{example.id}': the processor could not take it ({reason})."
                ) from None
        raise


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


def _image_inputs(encoded) -> dict[str, torch.Tensor]:
    return {k: v for k, v in encoded.items() if k not in _TEXT_KEYS}


class TrainCollator:
    """``list[Example]`` -> ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``.

    Trains on the answers only: every prompt token (template, question, image tokens) and
    every pad is -100 in ``labels``; each answer and the end-of-sequence token after it are
    trained, in every turn. Right padding. Sequences longer than ``max_length`` lose tokens
    from the end; the first prompt (with its image tokens) is never cut, and an example whose
    first prompt leaves no room for an answer token is an error.
    """

    def __init__(self, processor, max_length: int = 512):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        ensure_pad_token(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id

    def _answer_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.eos_id is not None and self.eos_id not in ids:
            ids = ids + [self.eos_id]  # the template does not end answers; teach stopping
        return ids

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        _check_batch(examples)
        segments = [_segments(self.processor, ex) for ex in examples]
        encoded = _process(
            self.processor, examples, [segs[0][0] for segs in segments], padding=True
        )

        rows, label_rows = [], []
        for i, (example, segs) in enumerate(zip(examples, segments)):
            prompt_ids = encoded["input_ids"][i][encoded["attention_mask"][i].bool()].tolist()
            if len(prompt_ids) >= self.max_length:
                raise UserError(
                    f"example '{example.id}': its image tokens and first question take "
                    f"{len(prompt_ids)} tokens, leaving no room for the answer within "
                    f"max_length={self.max_length}."
                )
            ids, labels = list(prompt_ids), [-100] * len(prompt_ids)
            for text, trained in segs[1:]:
                if trained:
                    piece = self._answer_ids(text)
                    labels += piece
                else:
                    piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    labels += [-100] * len(piece)
                ids += piece
            rows.append(ids[: self.max_length])
            label_rows.append(labels[: self.max_length])

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (ids, labs) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, : len(labs)] = torch.tensor(labs)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **_image_inputs(encoded),
            "labels": labels,
        }


class GenerationCollator:
    """``list[Example]`` -> left-padded prompts up to each example's last question.

    Left padding puts every prompt's last token in the last column, so batched generation
    appends the answers at the same position.
    """

    def __init__(self, processor):
        self.processor = processor
        ensure_pad_token(processor.tokenizer)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        _check_batch(examples)
        prompts = [
            prompt_text(self.processor, ex.turns[:-1], ex.turns[-1].human) for ex in examples
        ]
        encoded = _process(self.processor, examples, prompts, padding=True, padding_side="left")
        return dict(encoded)
