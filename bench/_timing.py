"""Timing shared by the benchmarks: sides timed round by round, so that a ratio of two
sides compares calls made under the same machine state."""

from __future__ import annotations

import time


def interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict[str, list[float]]:
    """Per side, the times of ``repeats`` calls, run round by round after one warm-up call
    each: every side once a round, the order reversed every other round, so neighbouring
    calls of two sides see the same machine state and no side always runs right after the
    same other one. ``sync`` waits for queued device work (CUDA) before and after a call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    order = list(fns)
    for i in range(repeats):
        for name in (order if i % 2 == 0 else order[::-1]):
            sync()
            t = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    return times
