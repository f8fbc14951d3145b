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

Timings are interleaved round by round (every side once per round, the order reversed every
other round); a step ratio is the median of the per-round ratios, with their interquartile
range as the spread (``--sides`` narrows the run to some sides). On a CUDA machine the same runs
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
from bench._timing import interleaved
from spider.methods import build_method


def paired_ratio(side: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range (25th, 75th percentile) of the per-round ratios
    ``side[i] / base[i]``: a load spike hits both calls of a round, so the ratio of a round
    is steadier than the ratio of two medians."""
    ratios = sorted(s / b for s, b in zip(side, base))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(ratios), q[0], q[-1]


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
    parser.add_argument("--repeats", type=int, default=41, help="timed repeats per side")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sides", default="dowser,lwf-swap,lwf-copy",
                        help="comma-separated sides timed against full fine-tuning")
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

    labels = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(labels) - {"dowser", "lwf-swap", "lwf-copy"}
    if unknown or not labels:
        parser.error(f"--sides takes dowser, lwf-swap and lwf-copy, got {args.sides!r}")
    sides, kept, allocated = {}, {}, {}
    scoring = None
    for label in ["full", *labels]:
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
    runs = interleaved(sides, args.repeats, sync)
    times = {k: statistics.median(v) for k, v in runs.items()}
    full = times["full"]
    opts = ", ".join(f"{k}={v}" for k, v in dowser_options.items()) or "defaults"
    print(f"model: {total / 1e6:.2f}M params, {trainable / 1e6:.2f}M trained (LLM + projector)"
          f", AdamW weight decay {args.weight_decay:g}")
    if scoring is not None:
        print(f"[dowser scoring] {scoring:.2f} s ({opts}) = {scoring / full:.0f} full-FT steps "
              f"of {full * 1e3:.0f} ms")
    for label in labels:
        extra = (f", allocator {allocated[label] / trainable:.2f} B/param"
                 if allocated[label] is not None else "")
        print(f"[memory] {label}: {kept[label] / trainable:.3f} bytes per trained param kept "
              f"beyond full FT{extra}" + (" (goal <= 1.1)" if label == "dowser" else ""))
    for label in labels:
        ratio, low, high = paired_ratio(runs[label], runs["full"])
        print(f"[step] {label}: {times[label] * 1e3:.1f} ms vs full {full * 1e3:.1f} ms "
              f"(medians) -> per-round ratio median {ratio:.3f}x, IQR {low:.3f}-{high:.3f}x "
              f"over {args.repeats} rounds" + (" (goal <= 1.02x)" if label == "dowser" else ""))


if __name__ == "__main__":
    main()
