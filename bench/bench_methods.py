"""SPIDER's cost, measured side by side against the plain transcription of its rule.

Prints what it measured:
  1. update alone: our ``after_optimizer_step`` (the default: on a CPU the fused passes of
     the C library) vs the transcription on ~8.4M float32 parameters in 64 tensors (target
     <= 0.40x, goal 0.15x); the eager update and the torch.compile'd kernels side by side in
     the same rounds; and the first update's time of each fused backend (building the C
     library or compiling the kernels, or loading them from their caches);
  2. a whole training step (forward, backward, clip, AdamW, hook) of a ~7M-parameter
     LlavaForConditionalGeneration built from configs: SPIDER vs full fine-tuning
     (target <= 1.10x, aim 1.05x), and the transcription for reference;
  3. kept memory per parameter: ours vs the transcription (target <= 10 bytes per float32
     parameter, aim 8), and for a bf16 model (theta0 kept in bf16);
  4. on a CUDA machine: the update's share of a step of a >=100M-parameter bf16 LLaVA.

Timings are interleaved round by round (A, B, then B, A, ...), so both sides see the same
machine state; ratios are given as the ratio of medians and as the median (and interquartile
range) of the per-round ratios. Usage: ``python bench/bench_methods.py [--repeats N] [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench._llava import freeze_vision, llava_from_configs, n_params, random_batch
from bench._timing import interleaved
from bench.spider_reference import ReferenceSpider
from spider.methods import build_method


def _interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in interleaved(fns, repeats, sync).items()}


def paired_ratio(side: list[float], base: list[float]) -> str:
    """Median of the per-round ratios ``side[i] / base[i]`` and their interquartile range:
    a load spike hits both calls of a round, so per-round ratios are steadier."""
    ratios = sorted(s / b for s, b in zip(side, base))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.3f}x (IQR {q[0]:.3f}-{q[-1]:.3f}x)"


def kept_bytes(method) -> tuple[int, int]:
    """(bytes kept across steps in theta0 and S, bytes of the per-device work buffers)."""
    kept = sum(t.numel() * t.element_size() for t in method.extra_state().values())
    work = sum(b.numel() * b.element_size() for pair in method._work.values() for b in pair)
    return kept, work


def bench_update(repeats: int, quick: bool) -> None:
    shape = (256, 256) if quick else (512, 256)

    def layers():
        torch.manual_seed(0)
        m = torch.nn.ModuleList(torch.nn.Linear(shape[1], shape[0], bias=False)
                                for _ in range(64))
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
        return m

    ours = build_method("spider", layers())
    eager = build_method("spider", layers())
    eager.fused = False
    compiled = build_method("spider", layers())
    compiled.fused, compiled.fused_backend = True, "compiled"  # whatever the device
    twin = layers()
    reference = ReferenceSpider(dict(twin.named_parameters()))
    n = n_params(twin)
    first = {}
    for label, method in (("ours", ours), ("compiled", compiled)):
        start = time.perf_counter()
        method.after_optimizer_step()  # builds or compiles the fused passes (or loads them)
        first[label] = time.perf_counter() - start
    runs = interleaved({"ours": ours.after_optimizer_step, "eager": eager.after_optimizer_step,
                        "compiled": compiled.after_optimizer_step,
                        "transcription": reference.after_optimizer_step}, repeats)
    t = {k: statistics.median(v) for k, v in runs.items()}
    device = next(iter(ours.params.values())).device
    n_fused = sum(ours._fused(name) for name in ours.params)
    backend = type(ours._kernels(device)).__name__.strip("_")
    print(f"[update] {n / 1e6:.2f}M float32 params in 64 tensors: ours ({n_fused} tensors "
          f"fused, {backend}) {t['ours'] * 1e3:.1f} ms, transcription "
          f"{t['transcription'] * 1e3:.1f} ms, ratio of medians "
          f"{t['ours'] / t['transcription']:.3f}x, per-round "
          f"{paired_ratio(runs['ours'], runs['transcription'])} (target <= 0.40x, goal 0.15x)")
    print(f"[update] same rounds: eager {t['eager'] * 1e3:.1f} ms "
          f"({paired_ratio(runs['eager'], runs['transcription'])} of the transcription), "
          f"torch.compile'd kernels {t['compiled'] * 1e3:.1f} ms "
          f"({paired_ratio(runs['compiled'], runs['transcription'])}); first update: ours "
          f"{first['ours']:.2f} s, compiled {first['compiled']:.1f} s (build or cache load)")
    kept, work = kept_bytes(ours)
    print(f"[memory] float32: ours keeps {kept / n:.2f} bytes/param (theta0 + S) plus "
          f"{work / 1e6:.1f} MB of work buffers ({work / n:.2f} bytes/param here, sized by the "
          f"largest tensor); transcription keeps {reference.kept_bytes() / n:.2f} bytes/param "
          f"(target <= 10, aim 8)")
    bf16 = torch.nn.ModuleList(torch.nn.Linear(shape[1], shape[0], bias=False) for _ in range(8))
    bf16 = bf16.to(torch.bfloat16)
    m = build_method("spider", bf16)
    kept, _ = kept_bytes(m)
    dtypes = {t.dtype for t in m.theta0.values()}
    print(f"[memory] bf16: ours keeps {kept / n_params(bf16):.2f} bytes/param; theta0 dtype "
          f"{', '.join(str(d) for d in dtypes)}")


def _step_fn(model, method, optimizer, batch, autocast=None):
    def step():
        ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(**batch).loss
        if method is not None and (pen := method.loss_penalty()) is not None:
            loss = loss + pen
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if method is not None:
            method.before_optimizer_step()
        optimizer.step()
        if method is not None:
            method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_step(repeats: int, quick: bool) -> None:
    threads = torch.get_num_threads()
    sides = {}
    for label in ("full", "spider", "transcription"):
        model = llava_from_configs(text_layers=3 if quick else 6)
        freeze_vision(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if label == "transcription":
            ref = ReferenceSpider({n: p for n, p in model.named_parameters() if p.requires_grad})

            class _Hook:
                def loss_penalty(self):
                    return None

                def before_optimizer_step(self):
                    pass

                after_optimizer_step = ref.after_optimizer_step

            method = _Hook()
        else:
            method = build_method(label, model)
        sides[label] = _step_fn(model, method, opt, random_batch(model))
        total, trainable = n_params(model), n_params(model, trainable_only=True)
    runs = interleaved(sides, repeats)
    t = {k: statistics.median(v) for k, v in runs.items()}
    print(f"[step] per-round spider/full {paired_ratio(runs['spider'], runs['full'])}, "
          f"transcription/full {paired_ratio(runs['transcription'], runs['full'])}")
    print(f"[step] LlavaForConditionalGeneration {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M "
          f"trainable: LLM + projector), batch 8 x 96 tokens, {threads} threads: "
          f"full {t['full'] * 1e3:.0f} ms, spider {t['spider'] * 1e3:.0f} ms "
          f"-> {t['spider'] / t['full']:.3f}x (target <= 1.10x, aim 1.05x); "
          f"transcription {t['transcription'] / t['full']:.3f}x")


def bench_cuda(repeats: int) -> None:
    if not torch.cuda.is_available():
        print("[cuda] no CUDA device: GPU benchmark skipped (not counted as measured)")
        return
    device = torch.device("cuda")
    model = llava_from_configs(text_hidden=1024, text_layers=8, vision_hidden=512,
                               vision_layers=6, vocab=32000, image_size=224, patch=14,
                               dtype=torch.bfloat16).to(device)
    freeze_vision(model)
    method = build_method("spider", model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = random_batch(model, batch=8, text_len=128, device=device, dtype=torch.bfloat16)
    step = _step_fn(model, method, opt, batch)
    for p in method.params.values():
        p.grad = torch.randn_like(p)
    t = _interleaved({"step": step, "update": method.after_optimizer_step}, repeats,
                     sync=torch.cuda.synchronize)
    print(f"[cuda] {torch.cuda.get_device_name()}: bf16 LLaVA {n_params(model) / 1e6:.0f}M params: "
          f"step {t['step'] * 1e3:.1f} ms, update {t['update'] * 1e3:.1f} ms "
          f"({100 * t['update'] / t['step']:.1f}% of a step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per side")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_update(args.repeats, args.quick)
    bench_step(max(5, args.repeats // 2), args.quick)
    bench_cuda(args.repeats)


if __name__ == "__main__":
    main()
