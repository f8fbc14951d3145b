"""Pre-train the bundled tiny LLaVA on ``builtin:upstream`` (``python -m spider.pretrain``).

Builds a fresh ``LlavaForConditionalGeneration`` (``spider.tiny_llava.build_tiny_llava``) with a
word-level tokenizer over the built-in vocabulary, trains every part of it (vision tower,
projector, language model) with the project's one training loop and the ``full`` method,
evaluates it on the test split of the upstream mixture, and saves it with ``save_pretrained``
plus a model card. Reproducible from ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from spider.data import IMAGE_SIZE, load_dataset, vocabulary
from spider.data.collate import TrainCollator
from spider.errors import CliParser, UserError, cli_main
from spider.loop import (
    BatchSampler,
    LoopConfig,
    LoopHooks,
    add_config_flags,
    config_field,
    make_optimizer,
    train_loop,
)
from spider.methods import build_method
from spider.models import resolve_device
from spider.rundir import swap_into_place
from spider.tiny_llava import build_tiny_llava

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "tiny-llava-base"


class _Progress(LoopHooks):
    """One readable line every ``every`` steps: step/total, loss, it/s, ETA; and, every
    ``eval_every`` steps, the upstream score on a few test examples."""

    def __init__(self, total: int, every: int, eval_every: int = 0, quick_eval=None):
        self.total, self.every = total, every
        self.eval_every, self.quick_eval = eval_every, quick_eval
        self.start = time.perf_counter()
        self.losses: list[float] = []

    def after_step(self, step: int, record: dict) -> None:
        self.losses.append(record["loss"])
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed
        recent = sum(self.losses[-self.every:]) / len(self.losses[-self.every:])
        print(f"step {step}/{self.total}  loss {recent:.4f}  lr {record['lr']:.2e}  "
              f"{rate:.2f} it/s  ETA {(self.total - step) / rate:.0f}s", file=sys.stderr)
        if self.eval_every and step % self.eval_every == 0 and step != self.total:
            scores = self.quick_eval()
            tasks = "  ".join(f"{k} {v['score']:.2f}" for k, v in sorted(scores["tasks"].items()))
            print(f"step {step}: upstream {scores['score']:.3f} on {scores['n']} test examples"
                  f"  ({tasks})", file=sys.stderr)


# Vision tower and projector train at this fraction of the language model's learning rate.
# At the full rate the CLIP residual stream grows to hundreds of times the scale of the word
# embeddings within a few hundred steps; behind the language model's first RMSNorm the image
# then barely moves the loss and the model never learns to look (measured: a batch of 32
# digit questions could not be memorised at 2e-3, and was at 1e-3 with this scale 0.3).
VISION_LR_SCALE = 0.3


@dataclasses.dataclass
class PretrainConfig(LoopConfig):
    """Everything that determines a pre-training: the loop's settings (pre-training's
    defaults) and these."""

    steps: int = config_field(9000, "optimizer steps")
    batch_size: int = config_field(32, "examples per step")
    lr: float = config_field(1e-3, "peak learning rate")
    warmup_steps: int = config_field(-1, "linear warm-up steps (-1: a twentieth of --steps)")
    weight_decay: float = config_field(0.01, "AdamW weight decay")
    seed: int = config_field(0, "seed for weights, data and order")
    min_lr_ratio: float = config_field(0.05)
    output_dir: Path = config_field(DEFAULT_OUT, "where to save the model (default: "
                                "sample_checkpoints/tiny-llava-base)")
    overwrite: bool = config_field(False, "replace the model already in --output-dir (e.g. the "
                               "bundled one)")
    vision_lr_scale: float = config_field(VISION_LR_SCALE, "vision tower and projector learn at "
                                      "this fraction of --lr")
    eval_every: int = config_field(0, "print the upstream score on 200 test examples every N steps")
    device: str = config_field("auto", "auto | cpu | cuda")
    train_size: int = config_field(20000, "examples generated for the training split")
    patch_size: int = config_field(16, "vision patch size in pixels (48x48 images: 16 gives 9 "
                               "image tokens, one per cell of the scenes' 3x3 grid)")
    eval_limit: int = config_field(0, "evaluate on only the first N test examples (0: all)")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.warmup_steps < 0:
            self.warmup_steps = max(1, self.steps // 20)


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Raise a UserError naming the first flag whose value cannot work."""
    for name in ("steps", "batch_size", "train_size", "patch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not "
                            f"{getattr(cfg, name)}")
    for name in ("eval_every", "eval_limit"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")


def pretrain(cfg: PretrainConfig) -> dict:
    """Pre-train the tiny LLaVA as ``cfg`` says and save it into ``cfg.output_dir``; returns
    the facts written to ``pretrain.json``."""
    check_pretrain_config(cfg)
    out_dir, seed, steps, batch_size = cfg.output_dir, cfg.seed, cfg.steps, cfg.batch_size
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise UserError(f"--output-dir {out_dir} is not empty; pass --overwrite to replace "
                        "what is there, or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dev = resolve_device(cfg.device)
    model, processor = build_tiny_llava(vocabulary(), image_size=IMAGE_SIZE,
                                        patch_size=cfg.patch_size, seed=seed)
    model.to(dev)
    method = build_method("full", model)  # every part trains during pre-training
    train = load_dataset("builtin:upstream", "train", seed=seed, size=cfg.train_size)
    collate = TrainCollator(processor)
    sampler = BatchSampler(len(train), batch_size, cfg.grad_accum, seed)

    def get_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        main, _ = sampler.indices(step, micro)
        return {k: v.to(dev) for k, v in collate([train[i] for i in main]).items()}

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    language = [p for n, p in named if "language_model" in n or n.startswith("lm_head")]
    visual = [p for n, p in named if not ("language_model" in n or n.startswith("lm_head"))]
    optimizer = make_optimizer([{"params": language},
                                {"params": visual, "lr_scale": cfg.vision_lr_scale}], cfg)
    from spider.evaluate import evaluate

    test = load_dataset("builtin:upstream", "test", seed=seed)

    def quick_eval() -> dict:
        model.eval()
        try:
            return evaluate(model, processor, test, batch_size=100, limit=200)
        finally:
            model.train()

    progress = _Progress(steps, 50, cfg.eval_every, quick_eval)
    started = time.perf_counter()
    train_loop(model, method, optimizer, get_batch, cfg, progress, device=dev)
    train_seconds = time.perf_counter() - started

    model.eval()
    scores = evaluate(model, processor, test, batch_size=64, limit=cfg.eval_limit or None)
    n_params = sum(p.numel() for p in model.parameters())
    facts = {
        "steps": steps, "batch_size": batch_size, "lr": cfg.lr,
        "vision_lr_scale": cfg.vision_lr_scale, "patch_size": cfg.patch_size, "seed": seed,
        "train_examples": cfg.train_size, "device": str(dev), "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1), "parameters": n_params,
        "upstream_test": scores, "torch": torch.__version__, "machine": platform.machine(),
    }
    # Write the whole folder under a temporary name, then swap it in: an interrupted save
    # never leaves a half-written model where a good one was.
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(model, facts))
    swap_into_place(tmp, out_dir)
    return facts


def model_card(model, facts: dict) -> str:
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    tasks = facts["upstream_test"].get("tasks", {})
    rows = "\n".join(
        f"| {name} | {info['metric']} | {info['value']:.3f} | {info['score']:.3f} | {info['n']} |"
        for name, info in sorted(tasks.items())
    )
    return f"""# tiny-llava-base

A `transformers` `LlavaForConditionalGeneration` small enough to fine-tune on a laptop CPU,
pre-trained by `python -m spider.pretrain` on Spiderscope's built-in upstream mixture
(`builtin:upstream`: captions of synthetic shape scenes, naming handwritten digits from
scikit-learn's `load_digits`, colour and shape questions). Load it offline with
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)`.

## Architecture ({facts['parameters'] / 1e6:.2f} M parameters)
- Vision tower: CLIP ViT, {v.image_size}x{v.image_size} input, {v.patch_size}x{v.patch_size} patches,
  hidden {v.hidden_size}, {v.num_hidden_layers} layers, {v.num_attention_heads} heads.
- Projector: 2-layer GELU MLP ({v.hidden_size} -> {t.hidden_size}).
- Language model: Llama, hidden {t.hidden_size}, {t.num_hidden_layers} layers,
  {t.num_attention_heads} heads, MLP {t.intermediate_size}, vocabulary {t.vocab_size} (word level).

## Training
- Data: {facts['train_examples']} examples of `builtin:upstream` (train split), seed {facts['seed']}.
- {facts['steps']} AdamW steps, batch {facts['batch_size']}, peak lr {facts['lr']} (vision tower and projector at
  {facts['vision_lr_scale']} of it), warm-up then cosine, clipping at 1.0, weight decay 0.01; every
  parameter trained.
- Prompt format (`chat_template.jinja`): `USER: <question>` then the image's
  {(v.image_size // v.patch_size) ** 2} tokens, then `ASSISTANT: <answer></s>`; the loss covers the answer only.
- {facts['train_seconds']:.0f} s on {facts['device']} ({facts['threads']} threads), torch {facts['torch']}.

## Scores on the upstream test split ({facts['upstream_test'].get('n', 0)} examples)
Upstream score (mean of the task scores): **{facts['upstream_test'].get('score', float('nan')):.3f}**.
Captions are scored by CIDEr-D relative to what the reference captions themselves earn
(the ceiling, {tasks.get('caption', {}).get('ceiling', float('nan')):.2f} here: each scene has four paraphrased references).

| task | metric | value | score in [0, 1] | n |
| --- | --- | --- | --- | --- |
{rows}

Reproduce (into a new folder; `--overwrite` replaces one): `python -m spider.pretrain --output-dir DIR --steps {facts['steps']} --batch-size {facts['batch_size']} --lr {facts['lr']} --vision-lr-scale {facts['vision_lr_scale']} --patch-size {facts['patch_size']} --seed {facts['seed']}`.
"""


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m spider.pretrain", description=__doc__,
                       argument_default=argparse.SUPPRESS)
    add_config_flags(parser, PretrainConfig)
    cfg = PretrainConfig(**vars(parser.parse_args(argv)))
    facts = pretrain(cfg)
    print(json.dumps({"output_dir": str(cfg.output_dir), **facts["upstream_test"],
                      "train_seconds": facts["train_seconds"]}))


if __name__ == "__main__":
    main()
