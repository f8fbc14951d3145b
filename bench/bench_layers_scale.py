"""Per-tensor statistics at 7B scale: loading ``Run.layers`` of a 7B-shaped run against one
raw scan of its statistics as JSON lines, its size on disk, and the Layers page on it
(issue 24, "Statistics at 7B scale").

:func:`make_run` writes a run directory shaped like a LLaVA-1.5-7B fine-tune: the language
model's 32 decoder layers x 7 linear weights (q, k, v, o, gate, up, down) + 2 norms, the
2-layer projector (weights and biases), optionally the 24-layer CLIP-L vision tower; one
statistics row per tensor per logged step (1,000 by default) with the columns of
``spider.statistics`` (``spider.rundir.STATISTICS_COLUMNS``), written through
``spider.rundir`` as the run recorder writes them (one append per logged step: for a model
this size, one Parquet part per step, small parts merged as they pile up), and a few
evaluation events so that the run lists as a finished one.

The benchmark writes the same rows twice, as a run writes them now (Parquet parts) and as
runs wrote them before (``layers.jsonl``, which still loads), and times (best of
``--repeat``, page cache warm):

* the raw scan: reading ``layers.jsonl`` and splitting it into lines (the floor any reader
  of the log pays);
* ``load_run(path).layers`` from ``layers.jsonl`` (parsed in bulk);
* ``load_run(path).layers`` from the Parquet parts, as a reader sees the run while it
  writes;
* ``RunDir.compact_layers`` (what the run recorder does when the run ends: one file);
* ``load_run(path).layers`` from ``layers.parquet``;
* the Layers page (``app/views/layers.py`` in Streamlit's AppTest) on the finished run:
  cold, warm (rendered again) and moved (the step slider moved);

and prints the ratios to the scan (goal: at most 3x), the sizes (goal: Parquet at most 1/5
of the log) and the page's times (goal: warm at most 2 s).

    python -m bench.bench_layers_scale [--steps 1000] [--vision] [--keep DIR] [--no-page]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics as stats_
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


VOCAB = 32064  # LLaVA-1.5's vocabulary (with the image token and padding)


def make_base_model(path: Path) -> Path:
    """A base model folder shaped like LLaVA-1.5-7B for the readers that only look at it:
    ``config.json`` and a ``model.safetensors`` whose header names every tensor with its
    real shape (the language model, its embeddings and head, the projector and the vision
    tower) over a sparse data region: gigabytes long, nothing written, no value read."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llava",
                                                  "architectures": ["LlavaForConditionalGeneration"]}))
    shapes = {name: [numel] for name, numel in llava_7b_tensors(vision=True)}
    shapes.update({"model.language_model.embed_tokens.weight": [VOCAB, HIDDEN],
                   "lm_head.weight": [VOCAB, HIDDEN],
                   "model.language_model.norm.weight": [HIDDEN]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)  # F16
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file = path / "model.safetensors"
    with open(file, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(8 + len(text) + offset)  # sparse: the values are never read
    return path


def make_run(path: Path, steps: int = 1000, vision: bool = False, log_every: int = 10,
             seed: int = 0, jsonl: bool = False, model: Path | None = None) -> Path:
    """A finished-looking run directory at ``path`` whose statistics are ``steps`` logged
    steps of the tensors of :func:`llava_7b_tensors` (values random but in range: shares in
    [0, 1], norms positive; ``mask_churn`` NaN at the first logged step, as a run logs it),
    written one append per step as the run recorder writes them (Parquet parts), or with
    ``jsonl`` as runs wrote them before (``layers.jsonl``). The same seed gives the same
    rows either way. ``model``: a base model folder for run.json to name (for the readers
    that want one: listing, the Layers page; see :func:`make_base_model`)."""
    rng = np.random.default_rng(seed)
    tensors = llava_7b_tensors(vision)
    run = rundir.RunDir(path)
    path.mkdir(parents=True, exist_ok=True)
    train = "llm,projector" + (",vision" if vision else "")
    run.write_run({"config": {"steps": steps * log_every, "log_every": log_every,
                              "method": "spider", "model": "llava-1.5-7b (synthetic)",
                              "train": train},
                   **({"model": rundir.model_reference(model, path)} if model else {}),
                   "method": "spider", "status": rundir.DONE,
                   "progress": {"step": steps * log_every, "steps": steps * log_every}})
    last = steps * log_every
    run.append_events([rundir.TrainEvent(s, 2.0 / s, 1e-4, 1.0, 0.5)
                       for s in range(log_every, last + 1, log_every)])
    run.append_events([rundir.EvalEvent(s, split, "score", score, 100)
                       for s in (0, last) for split, score in
                       (("upstream", 0.6 - 0.05 * (s > 0)), ("downstream", 0.2 + 0.4 * (s > 0)))])
    columns = statistics.METHOD_COLUMNS
    theta0 = rng.uniform(10, 200, len(tensors))
    thresholds = rundir.LAYERS_PARTS_MIN_ROWS, rundir.LAYERS_PARQUET_MIN_BYTES
    if jsonl:  # as a run wrote before the parts: never switch
        rundir.LAYERS_PARTS_MIN_ROWS = rundir.LAYERS_PARQUET_MIN_BYTES = 1 << 62
    try:
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
    finally:
        rundir.LAYERS_PARTS_MIN_ROWS, rundir.LAYERS_PARQUET_MIN_BYTES = thresholds
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


def _size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def bench(path: Path, legacy: Path, repeat: int = 3) -> dict:
    """Time the raw scan of ``legacy``'s ``layers.jsonl``, ``load_run(...).layers`` from it
    and from ``path``'s Parquet parts (the same rows), then compact ``path`` (as the run
    recorder does when a run ends) and time ``.layers`` again; sizes of every form."""
    run, old = rundir.RunDir(path), rundir.RunDir(legacy)
    jsonl_bytes = old.layers_file.stat().st_size
    parts = run.layers_files()
    assert parts and all(p.parent == run.layers_parts_dir for p in parts), parts
    parts_bytes = _size(parts)
    scan, lines = best(lambda: raw_scan([old.layers_file]), repeat)
    from_jsonl, frame = best(lambda: load_run(legacy).layers, repeat)
    from_parts, live = best(lambda: load_run(path).layers, repeat)
    assert live.drop(columns="run").equals(frame.drop(columns="run")), \
        "the frame from the Parquet parts differs from the frame from JSON lines"
    start = time.perf_counter()
    assert run.compact_layers(), "the parts could not be compacted"
    compact = time.perf_counter() - start
    parquet_bytes = run.layers_parquet_file.stat().st_size
    from_parquet, again = best(lambda: load_run(path).layers, repeat)
    assert again.equals(live), "the frame from layers.parquet differs from the parts'"
    result = {"rows": len(frame), "tensors": int(frame["param"].nunique()),
              "parts": len(parts), "jsonl_bytes": jsonl_bytes, "parts_bytes": parts_bytes,
              "parquet_bytes": parquet_bytes, "size_ratio": parquet_bytes / jsonl_bytes,
              "parts_size_ratio": parts_bytes / jsonl_bytes, "raw_scan_s": scan,
              "layers_from_jsonl_s": from_jsonl, "layers_from_parts_s": from_parts,
              "layers_from_parquet_s": from_parquet, "compact_s": compact,
              "ratio_jsonl": from_jsonl / scan, "ratio_parts": from_parts / scan,
              "ratio_parquet": from_parquet / scan}
    print(f"statistics: {len(frame):,} rows ({result['tensors']} tensors x "
          f"{frame['step'].nunique()} steps)")
    print(f"raw scan of layers.jsonl ({jsonl_bytes / 1e6:.1f} MB, {lines:,} lines): "
          f"{scan:.3f} s")
    print(f"load_run(...).layers from layers.jsonl (runs written before; bulk JSON parse): "
          f"{from_jsonl:.3f} s = {from_jsonl / scan:.2f}x the scan")
    print(f"load_run(...).layers from {len(parts)} Parquet parts (the run while it writes; "
          f"{parts_bytes / 1e6:.1f} MB = 1/{jsonl_bytes / parts_bytes:.1f} of the jsonl): "
          f"{from_parts:.3f} s = {from_parts / scan:.2f}x the scan")
    print(f"compact_layers (parts -> layers.parquet, once at the end of a run): {compact:.3f} s")
    print(f"load_run(...).layers from layers.parquet ({parquet_bytes / 1e6:.1f} MB = "
          f"1/{jsonl_bytes / parquet_bytes:.1f} of the jsonl): {from_parquet:.3f} s "
          f"= {from_parquet / scan:.2f}x the scan (goal <= 3x; size goal <= 1/5)")
    return result


TARGET_PAGE_WARM_S = 2.0


def bench_page(runs: Path, run: Path, repeat: int = 3) -> dict:
    """The Layers page on ``run`` (in the runs folder ``runs``) in Streamlit's AppTest:
    cold (every cache cleared), warm (rendered again: median of ``repeat``) and moved (the
    step slider moved to a step not shown before: median)."""
    os.environ["SPIDERSCOPE_RUNS"] = str(runs)
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=600)
    at.run()  # the imports happen here, outside every timing
    at.switch_page("views/layers.py")
    at.run()
    labels = list(at.selectbox[0].options)  # "<id> (<method>)", the id ending in its name
    at.selectbox[0].select_index(next(i for i, label in enumerate(labels)
                                      if label.split(" (")[0].endswith(run.name)))
    at.run()
    assert Path(at.selectbox[0].value).name == run.name, at.selectbox[0].value
    at.selectbox[1].set_value(at.selectbox[1].options[0])  # (none): the run alone
    at.run()
    assert not at.exception, at.exception
    st.cache_data.clear()
    st.cache_resource.clear()
    start = time.perf_counter()
    at.run()
    cold = time.perf_counter() - start
    assert not at.exception, at.exception
    warm = []
    for _ in range(repeat):
        start = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - start)
    moved = []
    steps = list(at.select_slider[0].options)
    for i in range(repeat):
        at.select_slider[0].set_value(steps[(i * 7919) % len(steps)])
        start = time.perf_counter()
        at.run()
        moved.append(time.perf_counter() - start)
    assert not at.exception, at.exception
    result = {"page_cold_s": cold, "page_warm_s": stats_.median(warm),
              "page_moved_s": stats_.median(moved),
              "charts": len(at.get("plotly_chart"))}
    print(f"Layers page on the run (AppTest, {result['charts']} charts): cold {cold:.2f} s, "
          f"warm {result['page_warm_s']:.2f} s, step moved {result['page_moved_s']:.2f} s "
          f"(goal: warm <= {TARGET_PAGE_WARM_S:.0f} s)")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="logged steps")
    parser.add_argument("--vision", action="store_true", help="also the 24-layer vision tower")
    parser.add_argument("--repeat", type=int, default=3, help="timings: best (or median) of")
    parser.add_argument("--keep", type=Path, help="write the runs in this folder and keep them")
    parser.add_argument("--no-page", action="store_true", help="skip the Layers page timing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        root = args.keep or Path(tmp)
        path, legacy = root / "run-7b", root / "legacy" / "run-7b-jsonl"
        model = make_base_model(root / "base-llava-7b")
        start = time.perf_counter()
        make_run(path, args.steps, args.vision, model=model)
        written = time.perf_counter() - start
        print(f"wrote the run (Parquet parts, one append per step) in {written:.1f} s "
              f"({1000 * written / args.steps:.1f} ms a step)")
        make_run(legacy, args.steps, args.vision, jsonl=True, model=model)
        result = bench(path, legacy, args.repeat)
        if not args.no_page:
            result.update(bench_page(root, path, args.repeat))
        return result


if __name__ == "__main__":
    json.dumps(main())
