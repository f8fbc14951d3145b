"""The bundled tiny LLaVA: its tokenizer, chat format and architecture, built from scratch.

``spider.pretrain`` builds it (:func:`build_tiny_llava`) and pre-trains it into
``sample_checkpoints/tiny-llava-base``; a run loads the saved folder like any other model
(``spider.models.load_model``). Nothing here downloads anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from spider.errors import UserError
from spider.models import WORD_PATTERN

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

# The tiny model's chat format. ``<image>`` follows the question in the first user message, so
# the image tokens can already see what is asked: from scratch, a tiny model learns to look up
# "the blue shape" far sooner this way than with the image first. Answers end with ``</s>`` so
# a trained model learns to stop. A generation prompt ends in "ASSISTANT:".
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '\\n' }}<image>{% endif %}{% endfor %}"
    "{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_TEMPLATE_WORDS = ("user", "assistant", ":")



def _word_pieces(words: Iterable[str]) -> list[str]:
    """Every token the word-splitting rule makes of ``words``, sorted and unique."""
    pieces = set(_TEMPLATE_WORDS)
    for word in words:
        pieces.update(re.findall(WORD_PATTERN, str(word).lower()))
    return sorted(pieces - set(SPECIAL_TOKENS))


def build_tokenizer(words: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (plus the chat-template words).

    Ids: ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, ``<image>``=4, then the words sorted.
    Text is lowercased and split by ``WORD_PATTERN``; encoding adds ``<s>`` in front; decoding
    joins words with spaces and re-attaches punctuation (``"a red circle."``).
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *_word_pieces(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace split first, so the regex split below only ever sees non-space runs, where
    # WORD_PATTERN matches every character (no leftover pieces).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # join with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        clean_up_tokenization_spaces=True,
        padding_side="right",
    )


def build_tiny_llava(
    words: Sequence[str],
    out_dir: str | Path | None = None,
    *,
    image_size: int = 48,
    patch_size: int = 16,
    vision_hidden: int = 128,
    vision_layers: int = 3,
    text_hidden: int = 160,
    text_layers: int = 4,
    seed: int = 0,
):
    """Build (and optionally save) a LLaVA small enough to fine-tune on a laptop CPU.

    Architecture (defaults), a standard ``LlavaForConditionalGeneration``:

    - vision: CLIP ViT, 48x48 input, 16x16 patches -> 3x3 = 9 patch tokens, one per cell of
      the built-in scenes' grid (+ CLS, dropped by ``vision_feature_select_strategy=
      "default"``), hidden 128, 3 layers, 4 heads, MLP 512; features from the last layer
      (``vision_feature_layer=-1``, so no layer is dead weight). ~0.69 M parameters.
    - projector: LLaVA-1.5's 2-layer GELU MLP, 128 -> 160 -> 160. ~0.05 M.
    - language model: Llama, hidden 160, 4 layers, 4 heads (head dim 40), SwiGLU MLP 448,
      RoPE, untied ``lm_head``, vocabulary = special tokens + ``words``. ~1.3 M with the
      built-in vocabulary (88 tokens).

    About 2.04 M parameters in all (7.8 MiB of float32 safetensors). The processor expands
    ``<image>`` into 9 image tokens, so a question and a caption make ~40-token sequences;
    a training step on 32 of them (everything trainable) takes ~0.11 s on 2 CPU cores. The
    sizes trade the two goals: big enough to caption shape scenes and name digits, small
    enough to fine-tune many times on a laptop.
    Weights are random (seeded by ``seed``); pre-training is someone else's job. Saved with
    ``save_pretrained`` (safetensors, never pickle) so the Auto classes load ``out_dir``
    offline.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if image_size % patch_size:
        raise UserError(f"image_size {image_size} is not a multiple of patch_size {patch_size}.")
    tokenizer = build_tokenizer(words)
    vocab_size = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=int(2.8 * text_hidden) // 16 * 16,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids["<image>"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids["<s>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.do_sample = False
    model.eval()

    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)
    return model, processor
