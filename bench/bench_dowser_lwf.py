"""Model-Dowser's and LwF's cost, measured side by side against full fine-tuning, as ratios.

Prints what it measured, on a LlavaForConditionalGeneration built from configs (vision tower
frozen, LLM + projector trained), batch 8 x (image tokens + 32 text tokens):

  1. Dowser's one-time scoring (self-generated prompts + probes; defaults N = 64, R = 8,
     64 tokens) against one training step of full fine-tuning;
  2. kept memory per trained parameter beyond full fine-tuning: Dowser's masks and score
     factors (goal <= 1.1 bytes: one bool per masked entry), LwF's theta0 (swap) or whole
     frozen copy (copy);
  3. a training step (forward, backward, clip, AdamW, hooks) against full fine-tuning:
     Dowser (goal <= 1.02x), LwF with theta0 swapped in, LwF with a frozen copy.

Timings are medians of interleaved repeats (A, B, A, B, ...). On a CUDA machine the same runs
there in bf16 (``--device cuda``), with memory also read from the allocator. Usage:
``python bench/bench_dowser_lwf.py [--repeats N] [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from bench._llava import freeze_vision, llava_from_configs, n_params, random_batch
from spider.methods import build_method


def _interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _step_fn(model, method, optimizer, batch, autocast):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with autocast():
            outputs = model(**batch)
            loss = outputs.loss
            extra = method.output_penalty(batch, outputs)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kept_bytes(method) -> int:
    """Bytes the method keeps across steps beyond full fine-tuning."""
    if method.name == "dowser":
        return _bytes(list(method.frozen.values())) + _bytes(
            t for f in method.factors.values() for t in (f.psi, f.act, f.weight))
    if method.name == "lwf":
        if method.teacher is not None:
            return _bytes(list(method.teacher.parameters()) + list(method.teacher.buffers()))
        return _bytes(method.theta0.values())
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per side")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="AdamW weight decay of every side (the project's default: 0)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda
                else (lambda: torch.autocast("cpu", enabled=False)))
    size = (dict(text_hidden=1024, text_layers=8, vision_hidden=512, vision_layers=6,
                 vocab=32000, image_size=224, patch=14) if cuda and not args.quick
            else dict(text_layers=3 if args.quick else 6))
    dowser_options = (dict(samples=8, text_len=32, probes=4) if args.quick else {})
    os.environ["SPIDERSCOPE_CACHE"] = tempfile.mkdtemp(prefix="bench-dowser-")
    print(f"device {device}{' ' + torch.cuda.get_device_name() if cuda else ''}, "
          f"{torch.get_num_threads()} threads")

    sides, kept, allocated = {}, {}, {}
    scoring = None
    for label in ("full", "dowser", "lwf-swap", "lwf-copy"):
        model = llava_from_configs(**size, dtype=dtype).to(device)
        freeze_vision(model)
        before = torch.cuda.memory_allocated() if cuda else 0
        t = time.perf_counter()
        name, options = {"full": ("full", {}), "dowser": ("dowser", dowser_options),
                         "lwf-swap": ("lwf", {}), "lwf-copy": ("lwf", {"teacher": "copy"})
                         }[label]
        method = build_method(name, model, **options)
        sync()
        if label == "dowser":
            scoring = time.perf_counter() - t
        allocated[label] = (torch.cuda.memory_allocated() - before) if cuda else None
        kept[label] = kept_bytes(method)
        trainable = n_params(model, trainable_only=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                weight_decay=args.weight_decay)
        batch = random_batch(model, batch=8, text_len=32, device=device, dtype=dtype)
        sides[label] = _step_fn(model, method, opt, batch, autocast)
    total = n_params(model)
    times = _interleaved(sides, args.repeats, sync)
    full = times["full"]
    opts = ", ".join(f"{k}={v}" for k, v in dowser_options.items()) or "defaults"
    print(f"model: {total / 1e6:.2f}M params, {trainable / 1e6:.2f}M trained (LLM + projector)"
          f", AdamW weight decay {args.weight_decay:g}")
    print(f"[dowser scoring] {scoring:.2f} s ({opts}) = {scoring / full:.0f} full-FT steps "
          f"of {full * 1e3:.0f} ms")
    for label in ("dowser", "lwf-swap", "lwf-copy"):
        extra = (f", allocator {allocated[label] / trainable:.2f} B/param"
                 if allocated[label] is not None else "")
        print(f"[memory] {label}: {kept[label] / trainable:.3f} bytes per trained param kept "
              f"beyond full FT{extra}" + (" (goal <= 1.1)" if label == "dowser" else ""))
    for label in ("dowser", "lwf-swap", "lwf-copy"):
        print(f"[step] {label}: {times[label] * 1e3:.1f} ms vs full {full * 1e3:.1f} ms -> "
              f"{times[label] / full:.3f}x" + (" (goal <= 1.02x)" if label == "dowser" else ""))


if __name__ == "__main__":
    main()
