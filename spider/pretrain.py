"""Pre-train the bundled tiny LLaVA on ``builtin:upstream`` (``python -m spider.pretrain``).

Builds a fresh ``LlavaForConditionalGeneration`` (``spider.models.build_tiny_llava``) with a
word-level tokenizer over the built-in vocabulary, trains every part of it (vision tower,
projector, language model) with the project's one training loop and the ``full`` method,
evaluates it on the test split of the upstream mixture, and saves it with ``save_pretrained``
plus a model card. Reproducible from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from spider.data import IMAGE_SIZE, load_dataset, vocabulary
from spider.data.collate import TrainCollator
from spider.errors import UserError, cli_main
from spider.loop import BatchSampler, LoopConfig, LoopHooks, make_optimizer, train_loop
from spider.methods import build_method
from spider.models import build_tiny_llava, resolve_device

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "tiny-llava-base"


class _Progress(LoopHooks):
    """One readable line every ``every`` steps: step/total, loss, it/s, ETA."""

    def __init__(self, total: int, every: int):
        self.total, self.every = total, every
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


def pretrain(out_dir: Path, steps: int, batch_size: int, lr: float, seed: int, device: str,
             eval_limit: int | None, train_size: int, patch_size: int = 8) -> dict:
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model, processor = build_tiny_llava(vocabulary(), image_size=IMAGE_SIZE,
                                        patch_size=patch_size, seed=seed)
    model.to(dev)
    method = build_method("full", model)  # every part trains during pre-training
    train = load_dataset("builtin:upstream", "train", seed=seed, size=train_size)
    collate = TrainCollator(processor)
    cfg = LoopConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.05,
                     batch_size=batch_size, clip=1.0, weight_decay=0.01, seed=seed)
    sampler = BatchSampler(len(train), batch_size, cfg.grad_accum, seed)

    def get_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        main, _ = sampler.indices(step, micro)
        return {k: v.to(dev) for k, v in collate([train[i] for i in main]).items()}

    optimizer = make_optimizer(list(method.trainable_parameters()), cfg)
    started = time.perf_counter()
    train_loop(model, method, optimizer, get_batch, cfg, _Progress(steps, 50), device=dev)
    train_seconds = time.perf_counter() - started

    from spider.evaluate import evaluate

    model.eval()
    test = load_dataset("builtin:upstream", "test", seed=seed)
    scores = evaluate(model, processor, test, batch_size=64, limit=eval_limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    facts = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_examples": train_size, "device": str(dev), "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1), "parameters": n_params,
        "upstream_test": scores, "torch": torch.__version__, "machine": platform.machine(),
    }
    (out_dir / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(model, facts))
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
- {facts['steps']} AdamW steps, batch {facts['batch_size']}, peak lr {facts['lr']}, warm-up then cosine,
  clipping at 1.0, weight decay 0.01; every parameter trained.
- {facts['train_seconds']:.0f} s on {facts['device']} ({facts['threads']} threads), torch {facts['torch']}.

## Scores on the upstream test split ({facts['upstream_test'].get('n', 0)} examples)
Upstream score (mean of the task scores): **{facts['upstream_test'].get('score', float('nan')):.3f}**

| task | metric | value | score in [0, 1] | n |
| --- | --- | --- | --- | --- |
{rows}

Reproduce: `python -m spider.pretrain --steps {facts['steps']} --batch-size {facts['batch_size']} --lr {facts['lr']} --seed {facts['seed']}`.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spider.pretrain", description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUT,
                        help="where to save the model (default: sample_checkpoints/tiny-llava-base)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data and order")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--train-size", type=int, default=20000,
                        help="examples generated for the training split")
    parser.add_argument("--patch-size", type=int, default=8,
                        help="vision patch size in pixels (48x48 images: 8 gives 36 image tokens)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on only the first N test examples")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    facts = pretrain(args.output_dir, args.steps, args.batch_size, args.lr, args.seed,
                     args.device, args.eval_limit, args.train_size, args.patch_size)
    print(json.dumps({"output_dir": str(args.output_dir), **facts["upstream_test"],
                      "train_seconds": facts["train_seconds"]}))


if __name__ == "__main__":
    cli_main(main)()
