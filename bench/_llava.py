"""LLaVA models built from configs for benchmarks (no weights to download)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration


def llava_from_configs(
    text_hidden: int = 256, text_layers: int = 6, vision_hidden: int = 192, vision_layers: int = 4,
    vocab: int = 1000, image_size: int = 64, patch: int = 8, dtype=torch.float32,
) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 64),
        image_size=image_size, patch_size=patch, projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden, intermediate_size=int(text_hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=text_layers, num_attention_heads=max(1, text_hidden // 64),
        num_key_value_heads=max(1, text_hidden // 64), vocab_size=vocab + 1,
        max_position_embeddings=1024,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab,
        image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).to(dtype)


def freeze_vision(model: torch.nn.Module) -> None:
    """The authors' LLaVA setting: the vision tower is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad = "vision_tower" not in name


def random_batch(model, batch: int = 8, text_len: int = 32, device="cpu", dtype=torch.float32):
    cfg = model.config
    n_img = cfg.image_seq_length
    vocab = cfg.image_token_index
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, vocab, (batch, text_len), generator=gen)
    image_tokens = torch.full((batch, n_img), cfg.image_token_index)
    input_ids = torch.cat([image_tokens, text], dim=1)
    labels = input_ids.clone()
    labels[:, :n_img] = -100
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen).to(dtype)
    return {
        "input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixels.to(device), "labels": labels.to(device),
    }


def n_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
