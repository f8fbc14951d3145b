"""Analysis-layer speed and memory, measured and printed.

1. ``analysis.heatmaps.downsample`` of a 4096 x 11008 float32 tensor (an MLP matrix of a
   7B model) to at most 512 x 512 cells, both reductions (target: well under 1 s);
2. ``analysis.stats.stream_tensor_stats`` over a generated ~1 GB set of safetensors files,
   side by side with merely reading the same tensors (target: >= 0.5x the read speed), and
   its peak memory (target: <= 2x the largest tensor + 300 MB).

Reading baselines, both on the same files, with the page cache warm for every contender
(the files were just written, and the rounds are interleaved):

* ``read tensors (map -> buffer)``: ``safe_open`` + ``get_tensor`` and every byte of the
  tensor copied into one reused buffer (single-threaded memcpy): merely reading every
  tensor. (``get_tensor`` alone reads nothing in safetensors 0.8: it returns a view of the
  memory map.) The target is stated against this one.
* ``read bytes``: ``readinto`` of every file into one reused 64 MB buffer: the raw speed at
  which the kernel hands the files' bytes over; no tensor is built.
* ``get_tensor + clone``: every tensor copied into fresh memory, as a loader that keeps
  them does; it swings with how fast the kernel supplies zeroed pages (x5 between runs on a
  shared VM), so it is shown for information only.

Peak memory is sampled from ``/proc/self/status`` every millisecond during each phase and
reported above the level before it: ``anon`` is memory the process allocated (tensors,
buffers); ``file`` is page-cache pages of memory-mapped files resident in the process,
released when a map is closed; the limit is checked on the peak of their sum. ``ru_maxrss`` (lifetime peak) and tracemalloc's peak of
Python-level allocations are printed too.

Usage: ``python bench/bench_analysis.py [--gb 1.0] [--repeats 3] [--keep DIR]``; runs in
well under 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from analysis.heatmaps import downsample
from analysis.stats import stream_tensor_stats

MB = 1 << 20


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _status_kb(fields=("RssAnon", "RssFile")) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0])
    return out


class PeakMemory:
    """Samples RssAnon / RssFile every ``interval`` s; peaks above the starting level (MB)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.available = os.path.exists("/proc/self/status")

    def __enter__(self):
        self.base = _status_kb() if self.available else {}
        self.peak = dict(self.base)
        self.peak_total = sum(self.base.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.available:
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            now = _status_kb()
            for key, value in now.items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self.peak_total = max(self.peak_total, sum(now.values()))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def report(self) -> dict[str, float]:
        if not self.available:
            return {}
        return {
            "anon": (self.peak["RssAnon"] - self.base["RssAnon"]) / 1024,
            "file": (self.peak["RssFile"] - self.base["RssFile"]) / 1024,
            "total": (self.peak_total - sum(self.base.values())) / 1024,
        }


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# --------------------------------------------------------------------------------------------
# 1. downsample
# --------------------------------------------------------------------------------------------


def bench_downsample(repeats: int) -> None:
    print("== downsample: 4096 x 11008 float32 (180 MB) -> <= 512 x 512 cells ==")
    generator = torch.Generator().manual_seed(0)
    update = torch.randn(4096, 11008, generator=generator)
    mask = torch.rand(4096, 11008, generator=generator)
    for label, tensor, reduce in (
        ("update, reduce=maxabs", update, "maxabs"),
        ("update, reduce=auto (-> maxabs)", update, "auto"),
        ("mask,   reduce=mean", mask, "mean"),
        ("mask,   reduce=auto (-> mean)", mask, "auto"),
    ):
        downsample(tensor, reduce=reduce)  # warm-up
        median, times = _median_time(lambda t=tensor, r=reduce: downsample(t, reduce=r), repeats)
        shape = downsample(tensor, reduce=reduce).values.shape
        print(f"  {label:34s} median {median * 1e3:7.1f} ms  "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})  -> {shape}")


# --------------------------------------------------------------------------------------------
# 2. streaming statistics vs reading
# --------------------------------------------------------------------------------------------


def make_checkpoint(folder: Path, gigabytes: float) -> tuple[list[Path], int, int]:
    """A LLaMA-like sharded checkpoint of about ``gigabytes``: float32 shards and a bf16 one.

    Hidden 2048, MLP 5632 (203 MB of float32 per block), a 16000 x 2048 embedding (131 MB,
    the largest tensor). Returns (files, total bytes, largest tensor bytes).
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    hidden, mlp = 2048, 5632

    def block(index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        prefix = f"model.language_model.layers.{index}"
        shapes = {
            "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden, hidden),
            "self_attn.v_proj.weight": (hidden, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
            "mlp.down_proj.weight": (hidden, mlp),
        }
        out = {f"{prefix}.{k}": (0.02 * torch.randn(s, generator=generator)).to(dtype)
               for k, s in shapes.items()}
        out[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        out[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        return out

    budget = int(gigabytes * 1e9)
    shards: list[dict[str, torch.Tensor]] = []
    first = {"model.language_model.embed_tokens.weight":
             0.02 * torch.randn(16000, hidden, generator=generator)}
    first.update(block(0, torch.float32))
    shards.append(first)
    size = sum(t.numel() * t.element_size() for t in first.values())
    index = 1
    while size < 0.9 * budget:
        # every other shard in bf16 (how released checkpoints are stored), two blocks a shard
        dtype = torch.bfloat16 if len(shards) % 2 == 0 else torch.float32
        shard = {}
        for _ in range(2):
            shard.update(block(index, dtype))
            index += 1
        shards.append(shard)
        size += sum(t.numel() * t.element_size() for t in shard.values())
    files = []
    largest = 0
    for number, shard in enumerate(shards):
        path = folder / f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path))
        files.append(path)
        largest = max(largest, *(t.numel() * t.element_size() for t in shard.values()))
    return files, sum(p.stat().st_size for p in files), largest


def read_tensors(files: list[Path]) -> None:
    """Every tensor's bytes read through safetensors' memory map into one reused buffer."""
    from safetensors import safe_open

    buffer = np.empty(0, dtype=np.uint8)
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                data = handle.get_tensor(name).reshape(-1).view(torch.uint8).numpy()
                if buffer.size < data.size:
                    buffer = np.empty(data.size, dtype=np.uint8)
                np.copyto(buffer[: data.size], data)


def read_and_allocate(files: list[Path]) -> None:
    """Every tensor copied into a fresh tensor (what keeping them all in memory costs)."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name).clone()


def read_bytes(files: list[Path]) -> None:
    buffer = memoryview(bytearray(64 * MB))
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def bench_stream(gigabytes: float, repeats: int, keep: str | None) -> None:
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_analysis_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        files, total, largest = make_checkpoint(folder, gigabytes)
        print(f"\n== streaming tensor statistics over {len(files)} safetensors files, "
              f"{total / 1e9:.2f} GB (largest tensor {largest / MB:.0f} MB); "
              f"generated in {time.perf_counter() - start:.1f} s ==")

        contenders = {
            "read bytes (readinto)": lambda: read_bytes(files),
            "read tensors (map -> buffer)": lambda: read_tensors(files),
            "read tensors (get_tensor + clone)": lambda: read_and_allocate(files),
            "stream_tensor_stats": lambda: stream_tensor_stats(files),
        }
        for fn in contenders.values():  # warm-up: page cache, allocator, thread pool
            fn()
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(repeats):  # interleaved, so every contender sees the same machine
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in times.items()}
        for name, values in times.items():
            print(f"  {name:34s} median {median[name]:6.3f} s  "
                  f"{total / median[name] / 1e9:6.2f} GB/s   (runs: "
                  + ", ".join(f"{v:.3f}" for v in values) + ")")
        stats_time = median["stream_tensor_stats"]
        for name in contenders:
            if name == "stream_tensor_stats":
                continue
            ratio = median[name] / stats_time
            verdict = ("  (target >= 0.5x) -> " + ("OK" if ratio >= 0.5 else "BELOW TARGET")
                       if name == "read tensors (map -> buffer)" else "")
            print(f"  speed of stream_tensor_stats / {name:34s} {ratio:5.2f}x{verdict}")

        limit = 2 * largest / MB + 300
        tracemalloc.start()
        with PeakMemory() as memory:
            frame = stream_tensor_stats(files)
        _, python_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        with PeakMemory() as reading:
            read_and_allocate(files)
        peak, peak_read = memory.report(), reading.report()
        if peak:
            print(f"  peak memory above start, stream_tensor_stats: anon {peak['anon']:.0f} MB, "
                  f"mapped file pages {peak['file']:.0f} MB, peak of the sum {peak['total']:.0f} MB "
                  f"(limit 2x largest + 300 MB = {limit:.0f} MB) -> "
                  f"{'OK' if peak['total'] <= limit else 'ABOVE LIMIT'}")
            print(f"  peak memory above start, get_tensor + clone:  anon {peak_read['anon']:.0f} MB, "
                  f"mapped file pages {peak_read['file']:.0f} MB, peak of the sum {peak_read['total']:.0f} MB")
        print(f"  tracemalloc peak (Python objects) during stream_tensor_stats: "
              f"{python_peak / MB:.1f} MB; ru_maxrss of this process (lifetime, incl. the "
              f"generator and downsample inputs): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        print(f"  {len(frame)} tensors summarised, e.g.:")
        print(frame.loc[:2, ["param", "dtype", "numel", "mean", "std", "norm", "frac_nonzero"]]
              .to_string(index=False))
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the generated checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per contender")
    parser.add_argument("--keep", default=None,
                        help="write the checkpoint to this folder and keep it (default: temp dir)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    bench_downsample(max(args.repeats, 5))
    bench_stream(args.gb, args.repeats, args.keep)


if __name__ == "__main__":
    main()
