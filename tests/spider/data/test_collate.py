"""Prompt format and the training / generation collators, on the tiny LLaVA's processor."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from spider.data.collate import GenerationCollator, TrainCollator, prompt_text
from spider.data.records import Example, Turn
from spider.errors import UserError
from spider.tiny_llava import build_tiny_llava

WORDS = (
    "what color is the circle square ? red blue green how many shapes are there two three "
    "describe image . a and , left right of digit this seven"
).split()
IMAGE_TOKENS = 64  # 6x6 patches of 48x48 images: long prompts, to test truncation
IMAGE_ID = 4


@pytest.fixture(scope="module")
def processor():
    _, processor = build_tiny_llava(
        WORDS, patch_size=6, text_hidden=32, text_layers=1, vision_hidden=32, vision_layers=1
    )
    return processor


def _example(id_: str, turns: list[tuple[str, str]], mode: str = "RGB") -> Example:
    image = Image.new(mode, (48, 48))
    return Example(id=id_, image=image, turns=[Turn(h, g) for h, g in turns])


ONE = _example("one", [("<image>\nWhat color is the circle?", "red")])
CAPTION = _example(
    "caption",
    [("<image>\nDescribe the image.", "a red circle left of a blue square, and a green square.")],
)
CHAT = _example(
    "chat",
    [
        ("<image>\nHow many shapes are there?", "two"),
        ("What color is the square?", "blue"),
        ("What color is the circle?", "red"),
    ],
)


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- prompt_text


def test_prompt_text_places_the_image_once_and_ends_with_the_generation_prompt(processor):
    # The tiny model's template puts the image after the first question.
    assert prompt_text(processor, [], "<image>\nWhat color is the circle?") == (
        "USER: What color is the circle?\n<image>\nASSISTANT:"
    )
    text = prompt_text(processor, CHAT.turns[:2], CHAT.turns[2].human)
    assert text.count("<image>") == 1 and text.startswith("USER: How many")
    assert text.index("<image>") < text.index("ASSISTANT: two</s>")
    assert "ASSISTANT: two</s>" in text and "ASSISTANT: blue</s>" in text
    assert text.endswith("What color is the circle?\nASSISTANT:")
    assert prompt_text(processor, [("<image>\nhow many shapes?", "two")], "red?") == prompt_text(
        processor, [Turn("<image>\nhow many shapes?", "two")], "red?"
    )


# ---------------------------------------------------------------------------- TrainCollator


def test_labels_are_the_answer_and_eos_only(processor):
    batch = TrainCollator(processor)([ONE, CAPTION])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    assert batch["pixel_values"].shape == (2, 3, 48, 48)
    eos = processor.tokenizer.eos_token_id
    for row, example in enumerate([ONE, CAPTION]):
        labels = batch["labels"][row]
        trained = labels[labels != -100].tolist()
        assert trained == _ids(processor, example.answer) + [eos]
        # everything before the answer (bos, template, image tokens, question) is -100
        first = int((labels != -100).nonzero()[0])
        assert (labels[:first] == -100).all()
        ids = batch["input_ids"][row]
        assert int((ids[:first] == IMAGE_ID).sum()) == IMAGE_TOKENS
        assert ids[first - 2 : first].tolist() == _ids(processor, "ASSISTANT:")
        # the trained tokens are the input tokens at those positions (labels are not shifted)
        assert torch.equal(ids[labels != -100], labels[labels != -100])


def test_decoded_labels_read_as_the_answer(processor):
    batch = TrainCollator(processor)([CAPTION])
    labels = batch["labels"][0]
    decoded = processor.tokenizer.decode(labels[labels != -100], skip_special_tokens=True)
    assert decoded == CAPTION.answer


def test_right_padding_is_masked_and_not_trained(processor):
    batch = TrainCollator(processor)([ONE, CAPTION])
    short = batch["attention_mask"][0]
    length = int(short.sum())
    assert short[:length].all() and not short[length:].any()
    assert (batch["input_ids"][0, length:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, length:] == -100).all()
    assert batch["attention_mask"][1].all()  # the longest row has no padding


def test_every_answer_of_a_conversation_is_trained(processor):
    batch = TrainCollator(processor)([CHAT])
    labels = batch["labels"][0]
    eos = processor.tokenizer.eos_token_id
    expected = []
    for turn in CHAT.turns:
        expected += _ids(processor, turn.gpt) + [eos]
    assert labels[labels != -100].tolist() == expected
    # the second and third questions are context, not targets
    ids = batch["input_ids"][0].tolist()
    square = processor.tokenizer.convert_tokens_to_ids("square")
    assert labels[ids.index(square)] == -100
    assert int((batch["input_ids"][0] == IMAGE_ID).sum()) == IMAGE_TOKENS


def test_training_prompt_is_exactly_the_generation_prompt(processor):
    train = TrainCollator(processor)([CAPTION])
    generate = GenerationCollator(processor)([CAPTION])
    prompt = generate["input_ids"][0].tolist()
    assert train["input_ids"][0, : len(prompt)].tolist() == prompt
    assert train["labels"][0, len(prompt)] != -100  # the first answer token comes right after


def test_long_sequences_are_cut_from_the_end_keeping_the_image(processor):
    full = TrainCollator(processor)([CAPTION])
    prompt_length = int((full["labels"][0] != -100).nonzero()[0])
    max_length = prompt_length + 3
    batch = TrainCollator(processor, max_length=max_length)([CAPTION, ONE])
    assert batch["input_ids"].shape[1] == max_length
    assert torch.equal(batch["input_ids"][0], full["input_ids"][0, :max_length])
    assert int((batch["input_ids"][0] == IMAGE_ID).sum()) == IMAGE_TOKENS
    assert (
        batch["labels"][0][batch["labels"][0] != -100].tolist()
        == _ids(processor, CAPTION.answer)[:3]
    )


def test_a_prompt_longer_than_max_length_is_an_error_naming_the_example(processor):
    with pytest.raises(UserError, match="example 'caption'.*max_length=60"):
        TrainCollator(processor, max_length=60)([ONE, CAPTION][1:])
    with pytest.raises(UserError, match="'one'"):
        TrainCollator(processor, max_length=IMAGE_TOKENS)([ONE])


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_an_image_the_processor_cannot_take_is_an_error_naming_the_example(processor, mode):
    bad = _example("grey-7", [("<image>\nWhat color is the circle?", "red")], mode=mode)
    with pytest.raises(UserError, match="example 'grey-7'.*mode"):
        TrainCollator(processor)([ONE, bad])
    with pytest.raises(UserError, match="example 'grey-7'"):
        GenerationCollator(processor)([bad])


class _Picky:
    """A processor that refuses 7x7 images, as real ones refuse what they cannot resize."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.chat_template = inner, inner.tokenizer, inner.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def __call__(self, text, images, **kwargs):
        if any(image.size == (7, 7) for per_example in images for image in per_example):
            raise ValueError("unsupported image size")
        return self.inner(text=text, images=images, **kwargs)


def test_a_processor_failure_is_an_error_naming_the_example(processor):
    odd = Example(id="odd-3", image=Image.new("RGB", (7, 7)), turns=[Turn("<image>\nred?", "red")])
    with pytest.raises(UserError, match="example 'odd-3': the processor could not take it"):
        TrainCollator(_Picky(processor))([ONE, odd])
    with pytest.raises(UserError, match="example 'odd-3'"):
        GenerationCollator(_Picky(processor))([odd, ONE])


def test_a_template_without_eos_still_trains_stopping(processor):
    """LLaVA-1.5's own template ends answers with a space, not </s>."""
    import copy

    llava15 = copy.copy(processor)
    llava15.chat_template = (
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    batch = TrainCollator(llava15)([CHAT])
    labels = batch["labels"][0]
    eos = processor.tokenizer.eos_token_id
    assert labels[labels != -100].tolist() == [
        *_ids(processor, "two"),
        eos,
        *_ids(processor, "blue"),
        eos,
        *_ids(processor, "red"),
        eos,
    ]


# ---------------------------------------------------------------------------- GenerationCollator


def test_generation_batches_are_left_padded_prompts(processor):
    batch = GenerationCollator(processor)([ONE, CHAT])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[:, -1].all()  # every prompt ends in the last column
    short = int(mask[0].sum())
    assert not mask[0, : ids.shape[1] - short].any()
    assert (ids[0, : ids.shape[1] - short] == processor.tokenizer.pad_token_id).all()
    assert ids[:, -2:].tolist() == [_ids(processor, "ASSISTANT:")] * 2
    assert (ids == IMAGE_ID).sum(dim=1).tolist() == [IMAGE_TOKENS] * 2
    # the chat prompt holds the earlier answers but not the last one
    red = processor.tokenizer.convert_tokens_to_ids("red")
    blue = processor.tokenizer.convert_tokens_to_ids("blue")
    assert blue in ids[1].tolist() and red not in ids[1].tolist()
