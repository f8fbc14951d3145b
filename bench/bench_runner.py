"""The training runner's own overhead, measured: what ``spider.train`` adds to the loop.

The runner's own work is the per-parameter statistics (``layers.jsonl`` every
``--log-every`` steps), the events and ``run.json`` progress, and checkpoints plus resume
state every ``--save-every`` steps. Evaluation is reported apart: it is work the user asks
for (``--eval-every``), not overhead.

Side by side in one process, on the bundled model and ``builtin:counting`` at the runner's
default settings (SPIDER, batch 16, log every 10 steps, checkpoint every 50), in interleaved
rounds of 50 steps:

* ``bare``: the project's loop with no-op hooks (SPIDER collects no statistics);
* ``runner``: the same loop with the runner as its hooks (evaluation switched off).

Overhead = (runner time - bare time) / runner time, from the medians over rounds; the time
spent inside the runner's own writers is printed too (target: <= 10 %).

Usage: ``python bench/bench_runner.py [--rounds 3] [--steps-per-round 50] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spider import train as recipe
from spider.distributed import Dist
from spider.hooks import Checkpointer, Evaluator, ProgressReporter, StatisticsLogger
from spider.loop import LoopHooks, make_optimizer, train_loop
from spider.models import resolve_device
from spider.recorder import RunRecorder
from spider.rundir import RunDir, RunInfoWriter
from spider.train import RunConfig


class Timed:
    """Wraps a bound method and adds its wall time to a counter."""

    def __init__(self, func, totals: dict, key: str):
        self.func, self.totals, self.key = func, totals, key

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.func(*args, **kwargs)
        finally:
            self.totals[self.key] = self.totals.get(self.key, 0.0) + time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=50)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        defaults = RunConfig()
        cfg = RunConfig(output_dir=str(Path(tmp) / "run"), device=args.device,
                        steps=10**6, eval_every=10**9)  # no evaluation inside the rounds
        # the pieces spider.train.train composes, built the same way
        dist, device = Dist(), resolve_device(cfg.device)
        run = RunDir(cfg.output_dir)
        model = recipe.load_model_and_method(cfg, dist, device)
        method = model.method
        data = recipe.load_data(cfg)
        get_batch = recipe.batches(cfg, data, model.processor, dist, device)
        optimizer = make_optimizer(list(method.trainable_parameters()), cfg)
        theta0 = {n: t.detach().clone() for n, t in method.effective_weights().items()}
        info = RunInfoWriter(run, {})
        recorder = RunRecorder(run, method, theta0, info)
        recorder.start(**recipe.new_run_info(cfg, model, run, dist, device))
        evaluator = Evaluator(method, model.processor, data.eval_sets, cfg.eval_limit,
                              cfg.eval_every, cfg.steps, run, info, dist)
        stats_logger = StatisticsLogger(method, recorder, cfg.log_every, cfg.save_every,
                                        cfg.steps, run, dist)
        checkpointer = Checkpointer(method, optimizer, cfg.save_every, cfg.steps,
                                    cfg.save_dtype, cfg.save_tensors, run, dist, device)
        progress = ProgressReporter(cfg.log_every, cfg.steps, 0, info, evaluator, dist)
        totals: dict[str, float] = {}
        stats_logger._write_rows = Timed(stats_logger._write_rows, totals, "statistics rows")
        checkpointer.save = Timed(checkpointer.save, totals, "checkpoint + resume state")
        run.append_events = Timed(run.append_events, totals, "events")
        run.append_layers = Timed(run.append_layers, totals, "layers.jsonl")
        run.write_run = Timed(run.write_run, totals, "run.json")
        runner = [stats_logger, evaluator, checkpointer, progress]
        loop_cfg = dataclasses.replace(cfg)
        bare = LoopHooks()
        times: dict[str, list[float]] = {"bare": [], "runner": []}
        step = 0
        n = args.steps_per_round
        print(f"device {device}, method {cfg.method}, batch {cfg.batch_size}, "
              f"log every {cfg.log_every}, checkpoint every {cfg.save_every}, "
              f"{sum(p.numel() for p in method.params.values()):,} trained parameters, "
              f"torch threads {torch.get_num_threads()}")
        # warm-up (allocator, first-call costs) before anything is timed
        loop_cfg.steps = step + 3
        step = train_loop(model.train_model, method, optimizer, get_batch, loop_cfg, bare,
                          start_step=step, device=device)
        for _ in range(args.rounds):
            for name, hooks in (("bare", bare), ("runner", runner)):
                # align rounds to the log/save grid so each runner round logs n/10 times and
                # checkpoints n/50 times, as a default run does
                step = -(-step // n) * n
                method.collect_statistics = False
                loop_cfg.steps = step + n  # the loop's end; the hooks keep the run's
                t0 = time.perf_counter()
                step = train_loop(model.train_model, method, optimizer, get_batch, loop_cfg,
                                  hooks, start_step=step, device=device)
                times[name].append(time.perf_counter() - t0)
        bare_s, runner_s = statistics.median(times["bare"]), statistics.median(times["runner"])
        # one evaluation as the runner does it (5 splits x --eval-limit examples), for scale
        t0 = time.perf_counter()
        evaluator.evaluate(step)
        eval_s = time.perf_counter() - t0

    rounds = args.rounds
    print(f"\nrounds of {n} steps, median of {rounds}:")
    print(f"  bare loop        {bare_s:7.2f} s   {n / bare_s:6.2f} steps/s")
    print(f"  with the runner  {runner_s:7.2f} s   {n / runner_s:6.2f} steps/s")
    overhead = (runner_s - bare_s) / runner_s
    inside = sum(totals.values()) / rounds
    print(f"  runner overhead  {100 * overhead:6.1f} % of step time (difference of medians; "
          "target <= 10 %)")
    print(f"  inside the runner's writers: {inside:.3f} s per round = "
          f"{100 * inside / runner_s:.1f} % of the round")
    for key, value in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {key:28s} {value / rounds:.3f} s per round")
    per_step = runner_s / n
    share = eval_s / (eval_s + defaults.eval_every * per_step)
    print(f"\n  one evaluation ({len(data.eval_sets)} splits x {cfg.eval_limit} examples): "
          f"{eval_s:.2f} s = {share * 100:.0f} % of wall time at --eval-every "
          f"{defaults.eval_every} (not overhead: asked for)")


if __name__ == "__main__":
    main()
