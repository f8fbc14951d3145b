"""Per-tensor statistics at 7B scale: loading ``Run.layers`` of a 7B-shaped run against one
raw scan of its statistics file (issue 24, "Scale").

:func:`make_run` writes a run directory shaped like a LLaVA-1.5-7B fine-tune: the language
model's 32 decoder layers x 7 linear weights (q, k, v, o, gate, up, down) + 2 norms, the
2-layer projector (weights and biases), optionally the 24-layer CLIP-L vision tower; one
statistics row per tensor per logged step (1,000 by default) with the columns of
``spider.statistics`` (``spider.rundir.STATISTICS_COLUMNS``), written through
``spider.rundir`` as a run writes them (one append per logged step).

The benchmark times (best of ``--repeat``, page cache warm):

* the raw scan: reading ``layers.jsonl`` and splitting it into lines (the floor any reader
  of the log pays);
* ``load_run(path).layers`` from ``layers.jsonl`` (parsed in bulk);
* ``RunDir.compact_layers`` (what the run recorder does once a run with a large log ends);
* ``load_run(path).layers`` from ``layers.parquet``;

and prints them, the ratios to the scan (goal: at most 3x) and the sizes of the two files
(goal: the Parquet file at most 1/5 of the log).

    python -m bench.bench_layers_scale [--steps 1000] [--vision] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis import load_run  # noqa: E402
from spider import rundir, statistics  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32  # Vicuna/LLaMA-2-7B
VISION_HIDDEN, VISION_INTERMEDIATE, VISION_LAYERS = 1024, 4096, 24  # CLIP ViT-L/14


def llava_7b_tensors(vision: bool = False) -> list[tuple[str, int]]:
    """``(name, numel)`` of the trained tensors of a LLaVA-1.5-7B fine-tune."""
    tensors = [("model.multi_modal_projector.linear_1.weight", VISION_HIDDEN * HIDDEN),
               ("model.multi_modal_projector.linear_1.bias", HIDDEN),
               ("model.multi_modal_projector.linear_2.weight", HIDDEN * HIDDEN),
               ("model.multi_modal_projector.linear_2.bias", HIDDEN)]
    linear = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
              "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    for layer in range(LAYERS):
        prefix = f"model.language_model.layers.{layer}."
        tensors += [(prefix + name + ".weight", a * b) for name, (a, b) in linear.items()]
        tensors += [(prefix + "input_layernorm.weight", HIDDEN),
                    (prefix + "post_attention_layernorm.weight", HIDDEN)]
    if vision:
        v_linear = {"self_attn.q_proj": (VISION_HIDDEN, VISION_HIDDEN),
                    "self_attn.k_proj": (VISION_HIDDEN, VISION_HIDDEN),
                    "self_attn.v_proj": (VISION_HIDDEN, VISION_HIDDEN),
                    "self_attn.out_proj": (VISION_HIDDEN, VISION_HIDDEN),
                    "mlp.fc1": (VISION_INTERMEDIATE, VISION_HIDDEN),
                    "mlp.fc2": (VISION_HIDDEN, VISION_INTERMEDIATE)}
        for layer in range(VISION_LAYERS):
            prefix = f"model.vision_tower.vision_model.encoder.layers.{layer}."
            tensors += [(prefix + name + ".weight", a * b) for name, (a, b) in v_linear.items()]
            tensors += [(prefix + "layer_norm1.weight", VISION_HIDDEN),
                        (prefix + "layer_norm2.weight", VISION_HIDDEN)]
    return tensors


def make_run(path: Path, steps: int = 1000, vision: bool = False, log_every: int = 10,
             seed: int = 0) -> Path:
    """A finished-looking run directory at ``path`` whose statistics are ``steps`` logged
    steps of the tensors of :func:`llava_7b_tensors` (values random but in range: shares in
    [0, 1], norms positive; ``mask_churn`` NaN at the first logged step, as a run logs it)."""
    rng = np.random.default_rng(seed)
    tensors = llava_7b_tensors(vision)
    run = rundir.RunDir(path)
    path.mkdir(parents=True, exist_ok=True)
    run.write_run({"config": {"steps": steps * log_every, "log_every": log_every,
                              "method": "spider", "model": "llava-1.5-7b (synthetic)"},
                   "method": "spider", "status": rundir.DONE})
    columns = statistics.METHOD_COLUMNS
    theta0 = rng.uniform(10, 200, len(tensors))
    for index in range(steps):
        step = (index + 1) * log_every
        values = rng.uniform(0, 1, (len(tensors), len(columns)))
        update = theta0 * rng.uniform(1e-4, 1e-2, len(tensors))
        rows = []
        for t, (name, numel) in enumerate(tensors):
            stats = {c: float(values[t, k]) for k, c in enumerate(columns)}
            if index == 0:
                stats["mask_churn"] = math.nan
            rows.append(rundir.StatisticsRow(step, name, numel, stats, float(update[t]),
                                             float(theta0[t])))
        run.append_layers(rows)
    return path


def raw_scan(files: list[Path]) -> int:
    """Read the files and split them into lines: the floor of any reader."""
    lines = 0
    for file in files:
        with open(file, "rb") as handle:
            lines += len(handle.read().splitlines())
    return lines


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def bench(path: Path, repeat: int = 3) -> dict:
    """Time the raw scan of the run's ``layers.jsonl`` and ``load_run(path).layers`` from it,
    then compact the log to ``layers.parquet`` (as the run recorder does when a run ends)
    and time ``.layers`` again; sizes of both files."""
    run = rundir.RunDir(path)
    jsonl_bytes = run.layers_file.stat().st_size
    scan, lines = best(lambda: raw_scan([run.layers_file]), repeat)
    from_jsonl, frame = best(lambda: load_run(path).layers, repeat)
    start = time.perf_counter()
    assert run.compact_layers(min_bytes=0), "the log could not be compacted"
    compact = time.perf_counter() - start
    parquet_bytes = run.layers_parquet_file.stat().st_size
    from_parquet, again = best(lambda: load_run(path).layers, repeat)
    assert again.equals(frame), "the frame from Parquet differs from the frame from JSON lines"
    result = {"rows": len(frame), "tensors": int(frame["param"].nunique()),
              "jsonl_bytes": jsonl_bytes, "parquet_bytes": parquet_bytes,
              "size_ratio": parquet_bytes / jsonl_bytes, "raw_scan_s": scan,
              "layers_from_jsonl_s": from_jsonl, "layers_from_parquet_s": from_parquet,
              "compact_s": compact, "ratio_jsonl": from_jsonl / scan,
              "ratio_parquet": from_parquet / scan}
    print(f"statistics: {len(frame):,} rows ({result['tensors']} tensors x "
          f"{frame['step'].nunique()} steps)")
    print(f"raw scan of layers.jsonl ({jsonl_bytes / 1e6:.1f} MB, {lines:,} lines): "
          f"{scan:.3f} s")
    print(f"load_run(...).layers from layers.jsonl (bulk JSON parse): {from_jsonl:.3f} s "
          f"= {from_jsonl / scan:.1f}x the scan")
    print(f"compact_layers (jsonl -> parquet, once at the end of a run): {compact:.3f} s")
    print(f"load_run(...).layers from layers.parquet ({parquet_bytes / 1e6:.1f} MB = "
          f"1/{jsonl_bytes / parquet_bytes:.1f} of the jsonl): {from_parquet:.3f} s "
          f"= {from_parquet / scan:.2f}x the scan (goal <= 3x; size goal <= 1/5)")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--vision", action="store_true", help="also the 24-layer vision tower")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the run here and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        path = args.keep or Path(tmp) / "run-7b"
        start = time.perf_counter()
        make_run(path, args.steps, args.vision)
        print(f"wrote the run in {time.perf_counter() - start:.1f} s")
        return bench(path, args.repeat)


if __name__ == "__main__":
    json.dumps(main())
