"""Tiny models of today's image-text-to-text families, built from ``transformers``' own config,
model and processor classes and saved with ``save_pretrained`` (random weights, no download).

Each family keeps what makes it differ from the bundled LLaVA, because that is where a
fine-tuning pipeline goes wrong: its placeholder tokens and how the processor expands them,
the extra tensors its processor makes (``image_grid_thw``, ``mm_token_type_ids``,
``token_type_ids``, ``pixel_attention_mask``, ``image_sizes``, ``num_crops`` ...), images as
one list per example, a chat template in the family's style (LLaVA-OneVision's renders the
answer turn differently from its generation prompt), or none at all (PaliGemma, which takes
a prompt and a ``suffix``). Processors are built from the family's PIL image processor and a
tokenizer without a video processor: the CPU build of torch has no working torchvision.

The vocabulary is the bundled tiny model's word-level one plus the family's special tokens,
so the built-in datasets tokenize without unknown words. The templates are written here in
each family's style, not copied.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from spider.models import image_only_processor_class

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "sample_checkpoints" / "tiny-llava-base"

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3",
            "smolvlm", "paligemma", "gemma3", "internvl", "mistral3")

HIDDEN, HEADS, LAYERS = 32, 2, 2
TINY_TEXT = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=512)
TINY_VISION = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=HEADS)


def _content(image_text: str, text_expr: str = "item['text']") -> str:
    """Jinja rendering one message's content list: images as ``image_text``, then the text."""
    return ("{% for item in message['content'] %}{% if item['type'] == 'image' %}"
            f"{image_text}"
            "{% endif %}{% endfor %}{% for item in message['content'] %}"
            "{% if item['type'] == 'text' %}{{ " + text_expr + " }}{% endif %}{% endfor %}")


# LLaVA-1.5 / NeXT style: "USER: <image>\nQ ASSISTANT: A " and no end-of-sequence token.
VICUNA = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
          + _content("<image>\n", "item['text'] + ' '") +
          "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# ChatML with the image placeholder given; the generation prompt is the answer's header.
def _chatml(image: str) -> str:
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            + _content(image) + "<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# LLaVA-OneVision: every header is "<|im_start|>ROLE " and texts follow a newline, so an
# answer renders as "<|im_start|>assistant \nA" although generation is prompted with
# "<|im_start|>assistant\n".
ONEVISION = ("{% for message in messages %}<|im_start|>{{ message['role'] }} "
             + _content("<image>", "'\\n' + item['text']") + "<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS = ("<|begin_of_text|>{% for message in messages %}"
           "{{ message['role'][0] | upper }}{{ message['role'][1:] }}:"
           + _content("<image>") + "<end_of_utterance>\n{% endfor %}"
           "{% if add_generation_prompt %}Assistant:{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
         "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
         + _content("<start_of_image>") + "<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "[INST]" + _content("[IMG]") + "[/INST]{% else %}" + _content("")
           + "{{ eos_token }}{% endif %}{% endfor %}")


def tokenizer_with(special: list[str], *, bos: str | None = "<s>", eos: str = "</s>",
                   pad: str | None = "<pad>", extra: dict[str, str] | None = None,
                   add_bos: bool = True):
    """The bundled word-level tokenizer with a family's special tokens (and its BOS habit)."""
    from tokenizers import AddedToken, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = copy.deepcopy(AutoTokenizer.from_pretrained(BASE).backend_tokenizer)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    if add_bos and bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>",
        pad_token=pad, extra_special_tokens=extra or {}, padding_side="right",
        model_max_length=1024)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_family(family: str, out: Path | None = None, seed: int = 0):
    """``(model, processor)`` of a tiny ``family`` model, saved to ``out`` when given."""
    import transformers as tf

    torch.manual_seed(seed)
    builder = globals()[f"_build_{family}"]
    model, processor = builder(tf)
    model.eval()
    eos = processor.tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id or eos
    model.generation_config.do_sample = False
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor


# ------------------------------------------------------------------------------ the families
def _clip(tf, image_size=32, patch=8):
    return tf.CLIPVisionConfig(**TINY_VISION, image_size=image_size, patch_size=patch,
                               projection_dim=HIDDEN)


def _siglip(tf, image_size=32, patch=8):
    return tf.SiglipVisionConfig(**TINY_VISION, image_size=image_size, patch_size=patch)


def _build_llava(tf):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tokenizer_with(["<image>"], extra={"image_token": "<image>"})
    config = tf.LlavaConfig(vision_config=_clip(tf), text_config=tf.LlamaConfig(
        **TINY_TEXT, **_text_ids(tok)), image_token_id=_ids(tok, "<image>")[0],
        vision_feature_select_strategy="default", vision_feature_layer=-2)
    size = {"height": 32, "width": 32}
    processor = tf.LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=VICUNA)
    return tf.LlavaForConditionalGeneration(config), processor


PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def _build_llava_next(tf):
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = tokenizer_with(["<image>"], extra={"image_token": "<image>"})
    config = tf.LlavaNextConfig(
        vision_config=_clip(tf), text_config=tf.MistralConfig(**TINY_TEXT, **_text_ids(tok)),
        image_token_index=_ids(tok, "<image>")[0], image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS)
    processor = tf.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=VICUNA)
    return tf.LlavaNextForConditionalGeneration(config), processor


def _build_llava_onevision(tf):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tokenizer_with(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], bos=None,
                         eos="<|im_end|>", extra={"image_token": "<image>",
                                                  "video_token": "<video>"}, add_bos=False)
    config = tf.LlavaOnevisionConfig(
        vision_config=_siglip(tf), text_config=tf.Qwen2Config(**TINY_TEXT, **_text_ids(tok)),
        image_token_index=_ids(tok, "<image>")[0], video_token_index=_ids(tok, "<video>")[0],
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1",
        vision_feature_select_strategy="full", tie_word_embeddings=True)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    processor = image_only_processor_class("LlavaOnevisionProcessor")(
        image_processor=image_processor, tokenizer=tok, video_processor=None,
        num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1", chat_template=ONEVISION)
    return tf.LlavaOnevisionForConditionalGeneration(config), processor


def _qwen_parts(tf, text_config_cls, vision_config):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tok = tokenizer_with(special, bos=None, eos="<|im_end|>", add_bos=False,
                         extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = dict(zip(("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id"),
                   _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                        "<|vision_end|>")))
    text = text_config_cls(**TINY_TEXT, **_text_ids(tok), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}, patch_size=8,
        temporal_patch_size=2, merge_size=2)
    return tok, dict(text_config=text, vision_config=vision_config, **ids), image_processor


def _build_qwen2_vl(tf):
    vision = tf.Qwen2VLConfig.sub_configs["vision_config"](
        depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, patch_size=8,
        spatial_merge_size=2, temporal_patch_size=2)
    tok, kwargs, image_processor = _qwen_parts(tf, tf.Qwen2VLConfig.sub_configs["text_config"],
                                               vision)
    processor = image_only_processor_class("Qwen2VLProcessor")(
        image_processor=image_processor, tokenizer=tok, video_processor=None,
        chat_template=_chatml("<|vision_start|><|image_pad|><|vision_end|>"))
    return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(**kwargs)), processor


def _build_qwen2_5_vl(tf):
    vision = tf.Qwen2_5_VLConfig.sub_configs["vision_config"](
        depth=2, hidden_size=HIDDEN, intermediate_size=64, num_heads=HEADS, patch_size=8,
        spatial_merge_size=2, temporal_patch_size=2, window_size=32, out_hidden_size=HIDDEN,
        fullatt_block_indexes=[1])
    tok, kwargs, image_processor = _qwen_parts(
        tf, tf.Qwen2_5_VLConfig.sub_configs["text_config"], vision)
    processor = image_only_processor_class("Qwen2_5_VLProcessor")(
        image_processor=image_processor, tokenizer=tok, video_processor=None,
        chat_template=_chatml("<|vision_start|><|image_pad|><|vision_end|>"))
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(**kwargs)), processor


IDEFICS_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                  "<|begin_of_text|>",
                  *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def _idefics_parts(tf, vision_cls, image_processor_cls, splitting: bool):
    tok = tokenizer_with(IDEFICS_TOKENS, bos="<|begin_of_text|>", eos="<end_of_utterance>",
                         add_bos=False, extra={"image_token": "<image>"})
    config = dict(vision_config=vision_cls(**TINY_VISION, image_size=32, patch_size=8),
                  text_config=tf.LlamaConfig(**TINY_TEXT, **_text_ids(tok)),
                  image_token_id=_ids(tok, "<image>")[0], scale_factor=2)
    image_processor = image_processor_cls(
        size={"longest_edge": 64 if splitting else 32}, max_image_size={"longest_edge": 32},
        do_image_splitting=splitting)
    return tok, config, image_processor


def _build_idefics3(tf):
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tok, config, image_processor = _idefics_parts(
        tf, tf.Idefics3VisionConfig, Idefics3ImageProcessorPil, splitting=True)
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                     image_seq_len=4, chat_template=IDEFICS)
    return tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(**config)), processor


def _build_smolvlm(tf):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    tok, config, image_processor = _idefics_parts(
        tf, tf.SmolVLMVisionConfig, SmolVLMImageProcessorPil, splitting=False)
    processor = image_only_processor_class("SmolVLMProcessor")(
        image_processor=image_processor, tokenizer=tok, video_processor=None, image_seq_len=4,
        chat_template=IDEFICS)
    return tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(**config)), processor


def _build_paligemma(tf):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tokenizer_with(["<image>"], extra={"image_token": "<image>"})
    image_token = _ids(tok, "<image>")[0]
    text = tf.GemmaConfig(**TINY_TEXT, head_dim=16, **_text_ids(tok))
    config = tf.PaliGemmaConfig(vision_config=_siglip(tf), text_config=text,
                                image_token_index=image_token, projection_dim=HIDDEN,
                                hidden_size=HIDDEN, vocab_size=len(tok))
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    return tf.PaliGemmaForConditionalGeneration(config), processor


def _build_gemma3(tf):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer_with(["<start_of_image>", "<end_of_image>", "<image_soft_token>",
                          "<start_of_turn>", "<end_of_turn>"], eos="<end_of_turn>",
                         extra={"image_token": "<image_soft_token>",
                                "boi_token": "<start_of_image>",
                                "eoi_token": "<end_of_image>"})
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = tf.Gemma3TextConfig(**TINY_TEXT, head_dim=16, **_text_ids(tok),
                               query_pre_attn_scalar=16, sliding_window=64)
    config = tf.Gemma3Config(text_config=text, vision_config=_siglip(tf),
                             mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi,
                             image_token_index=image)
    processor = tf.Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tok, image_seq_length=4, chat_template=GEMMA)
    return tf.Gemma3ForConditionalGeneration(config), processor


def _build_internvl(tf):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    tok = tokenizer_with(["<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>",
                          "<|im_end|>"], bos=None, eos="<|im_end|>", add_bos=False,
                         extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>",
                                "video_token": "<video>"})
    vision = tf.InternVLVisionConfig(**TINY_VISION, image_size=32, patch_size=8)
    config = tf.InternVLConfig(vision_config=vision,
                               text_config=tf.Qwen2Config(**TINY_TEXT, **_text_ids(tok)),
                               image_token_id=_ids(tok, "<IMG_CONTEXT>")[0], image_seq_length=4)
    processor = image_only_processor_class("InternVLProcessor")(
        image_processor=GotOcr2ImageProcessorPil(size={"height": 32, "width": 32},
                                                 crop_to_patches=False),
        tokenizer=tok, video_processor=None, image_seq_length=4,
        chat_template=_chatml("<IMG_CONTEXT>\n"))
    return tf.InternVLForConditionalGeneration(config), processor


def _build_mistral3(tf):
    from transformers.models.pixtral.image_processing_pil_pixtral import (
        PixtralImageProcessorPil,
    )

    tok = tokenizer_with(["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"],
                         pad=None, extra={"image_token": "[IMG]"})
    vision = tf.PixtralVisionConfig(**TINY_VISION, image_size=32, patch_size=8, head_dim=16)
    config = tf.Mistral3Config(vision_config=vision,
                               text_config=tf.MistralConfig(**TINY_TEXT, **_text_ids(tok)),
                               image_token_index=_ids(tok, "[IMG]")[0], spatial_merge_size=2,
                               vision_feature_layer=-1)
    processor = image_only_processor_class("PixtralProcessor")(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 32},
                                                 patch_size={"height": 8, "width": 8}),
        tokenizer=tok, patch_size=8, spatial_merge_size=2, chat_template=MISTRAL)
    return tf.Mistral3ForConditionalGeneration(config), processor
