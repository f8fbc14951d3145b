"""parse_param_name on the names real LLaVA-family models (and their PEFT wrappers) produce."""

from __future__ import annotations

import re

import pytest
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from spider.naming import ParamName, parse_param_name

VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=24,
    patch_size=6,
)
TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=50,
)
BACKBONES = {
    "clip+llama": (CLIPVisionConfig, LlamaConfig),
    "siglip+qwen2": (SiglipVisionConfig, Qwen2Config),
    "siglip+mistral": (SiglipVisionConfig, MistralConfig),
}
# Parameters with no role of their own: SigLIP's attention-pooling head (unused by LLaVA).
ROLELESS = {
    "model.vision_tower.head.probe",
    "model.vision_tower.head.attention.in_proj_weight",
    "model.vision_tower.head.attention.in_proj_bias",
}


def _build(backbone: str) -> LlavaForConditionalGeneration:
    vision_cls, text_cls = BACKBONES[backbone]
    config = LlavaConfig(vision_config=vision_cls(**VISION), text_config=text_cls(**TEXT))
    return LlavaForConditionalGeneration(config)


@pytest.fixture(scope="module", params=list(BACKBONES))
def names(request) -> list[str]:
    return [name for name, _ in _build(request.param).named_parameters()]


def _expected_component(name: str) -> str:
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.multi_modal_projector."):
        return "projector"
    assert name.startswith(("model.language_model.", "lm_head.")), name
    return "llm"


def _expected_layer(name: str) -> int | None:
    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def test_every_real_name_gets_its_component_layer_and_module(names):
    seen_layers = {"vision": set(), "llm": set()}
    for name in names:
        parsed = parse_param_name(name)
        assert parsed.component == _expected_component(name), name
        assert parsed.layer == _expected_layer(name), name
        if name not in ROLELESS:
            assert parsed.module != "other", name
        if parsed.layer is not None:
            seen_layers[parsed.component].add(parsed.layer)
    assert seen_layers == {"vision": {0, 1, 2}, "llm": {0, 1, 2}}


def test_modules_of_a_decoder_and_an_encoder_block(names):
    llm = {
        parse_param_name(n).module for n in names if n.startswith("model.language_model.layers.1.")
    }
    assert llm == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "norm",
    }
    vision = {parse_param_name(n).module for n in names if ".encoder.layers.1." in n}
    assert vision == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "norm"}


def _as_transformers_4(name: str) -> str:
    """The same parameter's name under transformers 4.x LLaVA."""
    for new, old in [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]:
        if name.startswith(new):
            return old + name[len(new) :]
    raise AssertionError(name)


def test_transformers_4_names_parse_the_same(names):
    for name in names:
        assert parse_param_name(_as_transformers_4(name)) == parse_param_name(name), name


def test_peft_wrapped_names_parse_like_the_base_parameter():
    from peft import LoraConfig, get_peft_model

    model = _build("clip+llama")
    base = {parse_param_name(n) for n, _ in model.named_parameters()}
    wrapped = get_peft_model(
        model,
        LoraConfig(
            r=2,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            modules_to_save=["multi_modal_projector"],
        ),
    )
    lora_names = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert lora_names
    for name, _ in wrapped.named_parameters():
        assert name.startswith("base_model.model.")
        unwrapped = re.sub(
            r"\.(lora_[AB]|modules_to_save)\.default|\.base_layer|\.original_module",
            "",
            name[len("base_model.model.") :],
        )
        assert parse_param_name(name) == parse_param_name(unwrapped), name
        assert parse_param_name(name) in base


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight",
            ("vision", 3, "q_proj"),
        ),
        ("model.vision_tower.embeddings.patch_embedding.weight", ("vision", None, "embeddings")),
        ("model.vision_tower.embeddings.class_embedding", ("vision", None, "embeddings")),
        ("vision_tower.vision_model.pre_layrnorm.weight", ("vision", None, "norm")),
        ("model.vision_tower.post_layernorm.bias", ("vision", None, "norm")),
        ("model.vision_tower.encoder.layers.0.self_attn.out_proj.weight", ("vision", 0, "o_proj")),
        ("model.multi_modal_projector.linear_1.weight", ("projector", None, "linear_1")),
        ("multi_modal_projector.linear_2.bias", ("projector", None, "linear_2")),
        ("model.language_model.layers.2.mlp.gate_proj.weight", ("llm", 2, "gate_proj")),
        ("language_model.model.layers.2.input_layernorm.weight", ("llm", 2, "norm")),
        ("language_model.model.embed_tokens.weight", ("llm", None, "embeddings")),
        ("model.language_model.norm.weight", ("llm", None, "norm")),
        ("lm_head.weight", ("llm", None, "lm_head")),
        ("language_model.lm_head.weight", ("llm", None, "lm_head")),
        (
            "base_model.model.model.language_model.layers.7.self_attn.v_proj.lora_B.default.weight",
            ("llm", 7, "v_proj"),
        ),
        ("base_model.model.lm_head.weight", ("llm", None, "lm_head")),
        ("model.layers.1.mlp.down_proj.weight", ("llm", 1, "down_proj")),  # a bare causal LM
        ("model.visual.blocks.5.mlp.fc2.weight", ("vision", 5, "fc2")),  # Qwen2-VL tower
        ("model.visual.merger.mlp.0.weight", ("projector", None, "other")),
        ("model.image_newline", ("projector", None, "other")),  # LLaVA-NeXT
        ("logit_scale", ("other", None, "other")),
    ],
)
def test_known_names(name, expected):
    assert parse_param_name(name) == ParamName(*expected)
