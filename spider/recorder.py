"""The one run recorder: what both runners write about a run besides checkpoints.

``spider.train`` (through its hooks, ``spider.hooks``) and the Hugging Face callback
(``spider.integrations.hf.SpiderCallback``) record a run through :class:`RunRecorder`:

* :meth:`RunRecorder.write_statistics` — the statistics rows of a step: the method's
  per-tensor statistics (``spider.statistics.METHOD_COLUMNS``) and the update norms the
  recorder measures from the weights the run started from (``RUNNER_COLUMNS``), written at
  once, one append per logged step (``RunDir.append_layers``: a line each in
  ``layers.jsonl``, or for a large model one Parquet part ``layers/part-F-L.parquet``
  renamed into place whole), so that a kill loses at most the step being written and a
  reader sees every step written so far;
* :meth:`RunRecorder.start` / :meth:`RunRecorder.resumed` — ``run.json`` of a new run (the
  fields every run has, :func:`run_info`, with the runner's own config) or of a resumed one;
* :meth:`RunRecorder.done` — status ``done`` and the summary (U, D, H, E, F, O) computed from
  the evaluation events in the log (:func:`run_summary`).

The format itself (file names, records, atomic writes) is ``spider.rundir``'s; liveness
(process record, heartbeat) is ``spider.liveness``'s.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from spider.distributed import local
from spider.importance import sum_of_squares
from spider.liveness import process_record
from spider.methods.base import Method
from spider.rundir import DONE, LISTING_KEY, RUNNING, RunDir, RunInfoWriter, StatisticsRow


def run_info(*, config: dict, method: Method, model: dict | None, seed: int, device: str,
             parallel: dict, trainable: Any, steps: int, step: int = 0,
             options: dict | None = None, **extra: Any) -> dict:
    """The first ``run.json`` of a run: the fields every run has, whichever runner made it
    (``options``: the method's options as JSON, by default its options dataclass;
    ``extra``: a runner's own fields, e.g. ``trainer``)."""
    import dataclasses

    import peft
    import transformers

    if options is None:
        options = dataclasses.asdict(method.options)
    return {
        "config": config,
        "method": method.name,
        "options": options,
        **({"model": model} if model else {}),
        "seed": seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "device": device,
        "parallel": parallel,
        "trainable": trainable,
        **extra,
        "status": RUNNING, **process_record(), "created": time.time(),
        "progress": {"step": step, "steps": steps},
    }


def run_summary(events: list[Mapping]) -> dict[str, float] | None:
    """U, D, H, E, F, O from the evaluation events: the upstream and downstream scores of
    step 0 (the base model) and of the last step that has both; None without them."""
    from spider.metrics import summary

    scores: dict[int, dict[str, float]] = {}
    for e in events:
        if e.get("event") == "eval" and e.get("metric") == "score" \
                and e.get("split") in ("upstream", "downstream"):
            scores.setdefault(int(e["step"]), {})[e["split"]] = float(e["value"])
    complete = sorted(s for s, v in scores.items() if len(v) == 2)
    if len(complete) < 2 or complete[0] != 0:
        return None
    first, last = scores[complete[0]], scores[complete[-1]]
    return summary(first["upstream"], first["downstream"], last["upstream"], last["downstream"])


def statistics_rows(step: int, stats: Mapping[str, Mapping[str, float]],
                    weights: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor],
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> list[StatisticsRow]:
    """The ``layers.jsonl`` rows of ``step``: ``stats`` (per tensor, from the method) and
    the norms of theta0 and of the update ``weights - theta0``. Sharded tensors (FSDP2) are
    measured on this process's shard and ``reduce`` sums the squares over processes (one
    all-reduce for every tensor)."""
    squares = []
    for name, weight in weights.items():
        mine = local(weight)
        start = local(theta0[name]).to(mine.device)
        squares.append([float(sum_of_squares(start.float().reshape(-1))),
                        float(sum_of_squares((mine.float() - start).reshape(-1)))])
    table = torch.tensor(squares, dtype=torch.float64).reshape(-1, 2)
    if reduce is not None:
        table = reduce(table)
    return [StatisticsRow(step, name, weight.numel(), stats.get(name, {}), update_sq ** 0.5,
                          base_sq ** 0.5)
            for (name, weight), (base_sq, update_sq) in zip(weights.items(), table.tolist())]


class RunRecorder:
    """Statistics rows, ``run.json`` and the summary of one run (see the module docstring).

    Args:
        run: the run directory.
        method: the method being trained.
        theta0: the weights the run started from (``method.effective_weights()`` before the
            first step, copied), for the update norms.
        info: the writer of ``run.json`` (its heartbeat too).
        writes: whether this process writes (process 0).
        measures: whether this process takes part in measuring statistics (process 0 under
            DDP; every process under FSDP2, each holding a shard).
        reduce: sums a float64 tensor over processes (FSDP2), else None.
    """

    def __init__(self, run: RunDir, method: Method, theta0: dict[str, torch.Tensor],
                 info: RunInfoWriter, writes: bool = True, measures: bool = True,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.run, self.method, self.theta0, self.info = run, method, theta0, info
        self.writes, self.measures, self.reduce = writes, measures, reduce
        self.logged_steps: set[int] = set()

    # -- run.json
    def start(self, **fields: Any) -> None:
        """A new run's ``run.json`` (``fields``: :func:`run_info`'s and any further ones)."""
        self.info.update(**run_info(method=self.method, **fields))

    def resumed(self, step: int) -> None:
        """``run.json`` of a run resumed at ``step``: running again, in this process."""
        self.info.info = {k: v for k, v in self.run.read_run().items()
                          if k not in ("error", "ended", LISTING_KEY)}
        # the progress restarts from the step the saved state holds (the cancelled run's
        # step may be later: the steps after its last checkpoint are trained again)
        progress = {**(self.info.info.get("progress") or {}), "step": step,
                    "evaluating": False, "eval_step": None}
        self.info.update(status=RUNNING, **process_record(), resumed_at_step=step,
                         progress=progress)

    def done(self, step: int | None = None) -> dict:
        """Status ``done``, the end time, the summary (when the log has the scores) and the
        listing record (``RunDir.listing_record``: the fingerprint of the files written, so
        that ``list_runs`` lists the finished run from run.json alone); the statistics of a
        large run (its Parquet parts, or a large log) are first compacted into one
        ``layers.parquet`` (``RunDir.compact_layers``). Called after the run's last write
        to its logs and checkpoints."""
        if self.writes:
            summary = run_summary(self.run.read_events())
            changes: dict[str, Any] = {"status": DONE, "ended": time.time()}
            if summary:
                changes["summary"] = summary
            if step is not None:
                changes["progress"] = {**(self.info.info.get("progress") or {}), "step": step}
            self.run.compact_layers()  # a large statistics log becomes layers.parquet
            self.info.update(**changes, **{LISTING_KEY: self.run.listing_record()})
        return self.info.info

    # -- the statistics (layers.jsonl, or Parquet parts for a large model)
    @torch.no_grad()
    def write_statistics(self, step: int, stats: Mapping[str, Mapping[str, float]]) -> None:
        """The statistics rows of ``step`` (once per step), on disk before returning: no
        buffering, so a checkpoint written after them never lacks its step's rows."""
        if not self.measures or step in self.logged_steps:
            return
        rows = statistics_rows(step, stats, self.method.effective_weights(), self.theta0,
                               self.reduce)
        if self.writes:
            self.run.append_layers(rows)
        self.logged_steps.add(step)


__all__ = ["RunRecorder", "run_info", "run_summary", "statistics_rows"]
