"""Parameter names -> (component, layer, module): the one place that reads them.

Every view of a run groups parameters the same way: by *component* (vision tower, projector,
language model), by *layer* (the decoder/encoder block index) and by *module* (``q_proj``,
``fc1``, ``norm``...). Names come from ``model.named_parameters()`` and differ between
``transformers`` versions, backbones and PEFT wrapping, e.g. for the same weight::

    model.language_model.layers.2.mlp.gate_proj.weight               transformers 5.x
    language_model.model.layers.2.mlp.gate_proj.weight               transformers 4.x
    base_model.model.model.language_model.layers.2.mlp.gate_proj.lora_A.default.weight   PEFT

all of which parse to ``ParamName("llm", 2, "gate_proj")``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

COMPONENTS = ("vision", "projector", "llm", "other")
"""The components in model order (image in, text out): every listing, table and figure of
components follows it."""


def component_rank(component: str) -> int:
    """Position of ``component`` in :data:`COMPONENTS` (unknown ones after them)."""
    return COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)


class ParamName(NamedTuple):
    """What a parameter is.

    Attributes:
        component: ``vision`` | ``projector`` | ``llm`` | ``other``.
        layer: index of the transformer block it belongs to, ``None`` outside blocks
            (embeddings, final norms, ``lm_head``, the projector).
        module: ``q_proj`` ``k_proj`` ``v_proj`` ``o_proj`` ``gate_proj`` ``up_proj``
            ``down_proj`` ``fc1`` ``fc2`` ``embeddings`` ``norm`` ``lm_head``, a projector
            linear name (``linear_1``, ``linear_2``...), or ``other``.
    """

    component: str
    layer: int | None
    module: str


# Tokens (dot-separated name parts) that say which component a parameter lives in. Projector
# tokens win over vision ones because some towers nest their connector (Qwen2-VL's
# ``visual.merger``).
_PROJECTOR = {"multi_modal_projector", "mm_projector", "connector", "merger", "image_newline"}
_VISION = {"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"}
_LLM = {"language_model", "text_model", "lm_head", "embed_tokens"}
# A bare causal LM (``model.layers.0...``) has none of the above; its root is one of these.
_LLM_ROOTS = {"model", "transformer", "decoder"}
# Block containers: the integer right after one of these is the layer index.
_LAYER_CONTAINERS = {"layers", "layer", "blocks", "block", "h", "resblocks"}

_SAME_NAME = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "lm_head",
}
# Other spellings of the same role: CLIP/SigLIP call the attention output ``out_proj``.
_ALIASES = {"out_proj": "o_proj"}
_EMBEDDINGS = {
    "embed_tokens",
    "patch_embedding",
    "position_embedding",
    "class_embedding",
    "embeddings",
    "patch_embed",
    "pos_embed",
    "wte",
    "wpe",
    "word_embeddings",
}
_PROJECTOR_LINEAR = re.compile(r"linear_\d+")

# PEFT wrapping: markers whose own token and the adapter name after it are dropped, and
# markers dropped alone.
_PEFT_WITH_ADAPTER = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
}
_PEFT_ALONE = {"base_layer", "original_module"}


def _strip_peft(parts: list[str]) -> list[str]:
    """Remove ``base_model.model.`` prefixes and LoRA/modules_to_save markers."""
    while parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    kept: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:
            skip_next = False
        elif part in _PEFT_WITH_ADAPTER:
            skip_next = True
        elif part not in _PEFT_ALONE:
            kept.append(part)
    return kept


def _module_of(part: str) -> str | None:
    if part in _SAME_NAME:
        return part
    if part in _ALIASES:
        return _ALIASES[part]
    if part in _EMBEDDINGS:
        return "embeddings"
    if "norm" in part or "layrnorm" in part or re.fullmatch(r"ln(_\w+)?", part):
        return "norm"  # layer_norm1, input_layernorm, pre_layrnorm (CLIP's spelling), ln_f
    if _PROJECTOR_LINEAR.fullmatch(part):
        return part
    return None


def parse_param_name(name: str) -> ParamName:
    """Parse a ``named_parameters()`` name of a LLaVA-family model (or its PEFT wrapper).

    Component: the first projector, vision or LLM marker found in the name (projector wins);
    a bare causal-LM name (``model.layers.0...``) counts as ``llm``. Layer: the integer after
    ``layers``/``blocks``/``h``. Module: the rightmost name part with a known role, so that
    ``.weight``/``.bias`` and LoRA suffixes never matter.
    """
    if not isinstance(name, str):
        raise TypeError(f"a parameter name must be text, not {type(name).__name__}")
    parts = _strip_peft(name.split("."))
    tokens = set(parts)

    if tokens & _PROJECTOR:
        component = "projector"
    elif tokens & _VISION:
        component = "vision"
    elif tokens & _LLM or (parts and parts[0] in _LLM_ROOTS and len(parts) > 1):
        component = "llm"
    else:
        component = "other"

    layer = None
    for previous, part in zip(parts, parts[1:]):
        # isdigit() alone admits "²", which int() refuses
        if previous in _LAYER_CONTAINERS and part.isascii() and part.isdigit():
            layer = int(part)
            break

    module = "other"
    for part in reversed(parts):
        found = _module_of(part)
        if found is not None:
            module = found
            break
    return ParamName(component, layer, module)
