"""The fine-tuning run's loop hooks: steps done, evaluator, statistics logger, checkpointer,
progress, stop.

``spider.train`` composes these around the project's one loop (``spider.loop.train_loop``);
each does one job and writes through :mod:`spider.rundir`. Under several processes they
follow one rule (``Dist.sees_whole_model``): whole-model work (evaluation, statistics,
checkpoints) is done by process 0 under DDP and by every process under FSDP2 (each holds a
shard the others need); process 0 alone writes.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from spider.distributed import Dist, gather_full, is_sharded, local, shard_of
from spider.errors import UserError
from spider.loop import LoopHooks
from spider.methods.base import Method
from spider.recorder import RunRecorder
from spider.rundir import (
    EvalEvent,
    ResumeState,
    RunDir,
    RunInfoWriter,
    TrainEvent,
    optimizer_groups,
    split_state_key,
)

DRIFT_SPLIT = "upstream"  # the split whose answers the drift metrics describe
# kl_to_base is measured on the first 32 of them: one teacher-forced forward pass of a
# prompt full of image tokens costs nearly a generation, and 32 keep drift <= 15 % of an
# evaluation's time (the answer forms are read off every evaluated answer, for free)
DRIFT_KL_EXAMPLES = 32
PROGRESS_INTERVAL_S = 0.5
"""Least seconds between two progress writes to run.json (every step when steps are slower)."""
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _every(step: int, every: int, steps: int) -> bool:
    """A periodic step strictly before the end (the end is handled once, after finalize)."""
    return step < steps and step % every == 0


class Evaluator(LoopHooks):
    """Scores the model on every evaluation split at step 0, every ``every`` steps and at the
    end; marks ``progress.evaluating`` in run.json meanwhile (an ETA leaves the pause out).

    On the ``upstream`` split it also logs the output drift: ``kl_to_base``
    (``spider.drift``, on the first :data:`DRIFT_KL_EXAMPLES` examples; the step-0
    distributions are kept in the run directory, so a resumed run compares with the same
    base), ``format_errors``, ``content_errors`` and
    ``answer_type_drift`` (``spider.answer_forms``; the downstream form is the downstream
    split's answers'). Their time is in ``drift_durations``."""

    def __init__(self, method: Method, processor, eval_sets: dict, limit: int, every: int, steps: int,
                 run: RunDir, info: RunInfoWriter, dist: Dist,
                 warm_batch: Callable[[], dict] | None = None):
        self.method, self.processor, self.eval_sets = method, processor, eval_sets
        self.limit, self.every, self.steps = limit, every, steps
        self.run, self.info, self.dist, self.warm_batch = run, info, dist, warm_batch
        self.durations: list[float] = []
        self.drift_durations: list[float] = []
        self._fsdp_ready = False
        self._upstream: list | None = None  # the upstream examples evaluated, made once
        self._base: tuple[torch.Tensor, torch.Tensor] | None = None  # step-0 log-probs, counts
        self._base_missing = False
        self._downstream_form: str | None = None  # "" when there is no downstream split

    def after_step(self, step: int, record: dict) -> None:
        if _every(step, self.every, self.steps):
            self.evaluate(step)

    def _upstream_examples(self, data) -> list:
        if self._upstream is None:
            self._upstream = [data[i] for i in range(min(self.limit, len(data)))]
        return self._upstream

    def drift(self, step: int, model, examples: list, predictions: list[str]) -> list[EvalEvent]:
        """The drift metrics of the upstream answers at ``step`` (see the class)."""
        from spider.answer_forms import dominant_form, form_metrics
        from spider.drift import answer_log_probs, kl_divergence

        t0 = time.perf_counter()
        if self._downstream_form is None:
            downstream = self.eval_sets.get("downstream")
            self._downstream_form = (dominant_form(
                [downstream[i] for i in range(min(self.limit, len(downstream)))])
                if downstream is not None else "")
        values = form_metrics(examples, predictions, self._downstream_form or None)
        events = [EvalEvent(step, DRIFT_SPLIT, name, float(value), len(examples))
                  for name, value in values.items()]
        probed = examples[:DRIFT_KL_EXAMPLES]
        tuned = answer_log_probs(model, self.processor, probed)
        base = self._base_log_probs(step, tuned)
        if base is not None:
            events.append(EvalEvent(step, DRIFT_SPLIT, "kl_to_base",
                                    kl_divergence(base[0], tuned[0], base[1]), len(probed)))
        self.drift_durations.append(time.perf_counter() - t0)
        return events

    def _base_log_probs(self, step: int, tuned: tuple[torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step-0 model's: ``tuned`` itself at step 0 (kept, and written to the run
        directory), else those kept or stored (a resumed run); None when there are none."""
        if self._base is not None or self._base_missing:
            return self._base
        if step == 0:
            self._base = tuned
            if self.dist.is_main:
                self.run.write_drift_base({"log_probs": tuned[0], "counts": tuned[1]},
                                          {"examples": str(len(tuned[1]))})
            return self._base
        stored = self.run.read_drift_base()
        if (stored is not None and stored[0].get("log_probs") is not None
                and stored[0]["log_probs"].shape == tuned[0].shape
                and torch.equal(stored[0]["counts"], tuned[1])):
            self._base = stored[0]["log_probs"], stored[0]["counts"]
        else:
            self._base_missing = True
            print(f"{self.run.drift_base_file} is missing or was made on other examples: "
                  "kl_to_base is not logged", file=sys.stderr)
        return self._base

    def evals_left(self, step: int) -> int:
        """Evaluations after ``step``: the periodic ones still to come, and the final one."""
        return len(range((step // self.every + 1) * self.every, self.steps, self.every)) + 1

    @property
    def seconds(self) -> float:
        return sum(self.durations)

    def evaluate(self, step: int) -> dict[str, float]:
        from spider.evaluate import evaluate

        if not self.dist.sees_whole_model:
            # DDP: process 0 evaluates its full copy of the model while the others wait;
            # FSDP2: every process takes part in every forward pass, on the same examples.
            self.dist.barrier()
            return {}
        t0 = time.perf_counter()
        # the step evaluated has been trained: the progress says so while it is scored
        self.info.update_progress(evaluating=True, eval_step=step, step=step)
        model = self.method.model
        model.eval()
        if self.dist.mode == "fsdp":
            # generate() reaches submodules without the root's forward, whose hook would
            # gather the root's own parameters (embeddings, norms, head): gather them here.
            if not self._fsdp_ready:
                # FSDP2 sets its hooks up on the root's first forward: one without gradients
                with torch.no_grad():
                    model(**self.warm_batch())
                self._fsdp_ready = True
            model.unshard()
        scores, events = {}, []
        try:
            for split, data in self.eval_sets.items():
                upstream = split == DRIFT_SPLIT
                if upstream:
                    data = self._upstream_examples(data)
                result = evaluate(model, self.processor, data, batch_size=64, limit=self.limit,
                                  keep_predictions=upstream)
                scores[split] = result["score"]
                events.append(EvalEvent(step, split, "score", result["score"], result["n"]))
                for task, entry in result["tasks"].items():
                    events.append(EvalEvent(step, split, f"task:{task}", entry["score"]))
                if upstream:
                    events += self.drift(step, model, data, result["predictions"])
                    if self.dist.mode == "fsdp":
                        model.unshard()  # the drift's forward resharded the root's parameters
        finally:
            model.train()
            if self.dist.mode == "fsdp":
                model.reshard()
            self.durations.append(time.perf_counter() - t0)
            self.info.update_progress(evaluating=False, eval_step=None,
                                      eval_seconds=self.seconds / len(self.durations),
                                      evals_left=self.evals_left(step) if step < self.steps
                                      else 0)
        if self.dist.is_main:
            self.run.append_events(events)
            line = "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
            print(f"eval step {step}: {line}", file=sys.stderr)
        if self.dist.mode == "ddp":
            self.dist.barrier()
        return scores


class StatisticsLogger(LoopHooks):
    """Train events to ``metrics.jsonl`` and per-parameter statistics to ``layers.jsonl``
    (through the run recorder, ``spider.recorder.RunRecorder``, as the HF callback does).

    Statistics of step k describe the state a checkpoint of step k holds: they come out of
    step k's update (the method collects them when asked before the step), and at the end
    they are taken after ``finalize`` (:meth:`log_final`), as the final checkpoint is.
    Pending train events are written at every log step and before every checkpoint, so a
    resumed run's events have no gap.
    """

    def __init__(self, method: Method, recorder: RunRecorder, every: int, save_every: int,
                 steps: int, run: RunDir, dist: Dist):
        self.method, self.recorder = method, recorder
        self.every, self.save_every, self.steps = every, save_every, steps
        self.run, self.dist = run, dist
        self.pending: list[TrainEvent] = []

    def logs_at(self, step: int) -> bool:
        return step % self.every == 0 or step == self.steps

    def after_step(self, step: int, record: dict) -> None:
        self.pending.append(TrainEvent(step, record["loss"], record["lr"], record["grad_norm"],
                                       record["seconds"]))
        if _every(step, self.every, self.steps):
            self._write_rows(step, self.method.statistics())
        if self.logs_at(step) or step % self.save_every == 0:
            self.flush()
        # statistics come out of the update itself on the steps that are logged
        self.method.collect_statistics = self.logs_at(step + 1)

    def flush(self) -> None:
        if self.pending and self.dist.is_main:
            self.run.append_events(self.pending)
        self.pending = []

    def log_final(self, step: int) -> None:
        """The last step's statistics, after ``finalize`` (post-hoc methods act there)."""
        from spider.methods.base import MethodBase

        acted = type(self.method).finalize is not MethodBase.finalize
        self._write_rows(step, self.method.compute_statistics() if acted
                         else self.method.statistics())

    def _write_rows(self, step: int, stats: dict[str, dict[str, float]]) -> None:
        self.recorder.write_statistics(step, stats)


class Checkpointer(LoopHooks):
    """Every ``every`` steps: an analysis checkpoint of the step and, replacing the last one,
    the resume state. Both hold whole tensors; under FSDP2 they are gathered one at a time
    (every process takes part) and process 0 writes them."""

    def __init__(self, method: Method, optimizer: torch.optim.Optimizer, every: int, steps: int,
                 save_dtype: str, save_tensors: str, run: RunDir, dist: Dist,
                 device: torch.device):
        self.method, self.optimizer, self.every, self.steps = method, optimizer, every, steps
        self.dtype = SAVE_DTYPES[save_dtype]
        self.save_dtype, self.save_tensors = save_dtype, save_tensors
        self.pattern = re.compile(save_tensors) if save_tensors else None
        self.run, self.dist, self.device = run, dist, device
        self.last_saved: int | None = None

    def after_step(self, step: int, record: dict) -> None:
        if _every(step, self.every, self.steps):
            self.save(step)

    def _kept(self, tensors: dict[str, torch.Tensor], by_param) -> dict[str, torch.Tensor]:
        """Tensors cast to ``--save-dtype`` and filtered by ``--save-tensors``; ``by_param``
        gives the parameter a key belongs to (None for a method's own flags, always kept)."""
        return {k: t.detach().to(self.dtype) if t.is_floating_point() else t.detach()
                for k, t in tensors.items()
                if self.pattern is None or by_param(k) is None
                or self.pattern.search(by_param(k))}

    def save(self, step: int, finalized: bool = False) -> None:
        if not self.dist.sees_whole_model:
            return  # DDP: every process holds the same state; process 0 writes it
        to_cpu = self.dist.mode == "fsdp"
        state = self.method.state_dict()
        weights = self._kept(gather_full(self.method.effective_weights(), to_cpu=to_cpu),
                             lambda k: k)
        method_state = self._kept(gather_full(self.method.analysis_state(), to_cpu=to_cpu),
                                  lambda k: split_state_key(k)[1])
        if self.dist.is_main:
            self.run.write_analysis_checkpoint(
                step, weights, method_state, finalized=finalized, method_meta=state["meta"],
                save_dtype=self.save_dtype, save_tensors=self.save_tensors)
        del weights, method_state
        if finalized:
            # The end writes no resume state: the end (finalize, the last statistics and
            # evaluation) is not idempotent, so a run killed before "done" must resume from
            # the last periodic state and redo the end once, not from here and redo it twice.
            self.last_saved = step
            return
        optimizer = self.optimizer.state_dict()
        opt_tensors, opt_scalars = optimizer_groups(optimizer)
        trained = ({n: p.detach() for n, p in self.method.params.items()}
                   if self.method.restores_weights else {})
        groups = [trained, state["tensors"], opt_tensors]
        if self.dist.mode == "fsdp":
            groups = [gather_full(tensors) for tensors in groups]
        if self.dist.is_main:
            self.run.write_resume_state(ResumeState(
                step, groups[0], {"meta": state["meta"], "tensors": groups[1]}, groups[2],
                opt_scalars, optimizer["param_groups"]))
        self.last_saved = step

    def restore(self) -> int:
        """Load the resume state; drop every event, statistic and checkpoint after it.
        Returns the step it holds (0 when the run never saved one)."""
        found = self.run.read_resume_state()
        if found is None:
            return 0
        with torch.no_grad():
            for name, tensor in found.weights.items():
                if name not in self.method.params:
                    raise UserError(f"{self.run.resume_dir}: tensor {name} is not a trained "
                                    "parameter of this run's model")
                param = self.method.params[name]
                local(param).copy_(shard_of(tensor, param))
        try:
            self.method.load_state_dict(found.method)
        except ValueError as err:
            raise UserError(f"{self.run.resume_dir} does not match this run: {err}") from None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.load_state_dict(found.optimizer_state(
            lambda index, tensor: _like_param(tensor.to(self.device), params[index])))
        if self.dist.is_main:
            self.run.remove_temporaries()  # of writes a kill cut short (they can be GBs)
            self.run.truncate_events(found.step)
            self.run.truncate_layers(found.step)
            self.run.remove_checkpoints_after(found.step)
        self.dist.barrier()
        self.last_saved = found.step
        return found.step


def _like_param(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """An optimizer state tensor read whole from disk, laid out like its parameter's state
    (sharded like the parameter under FSDP2; scalars such as ``step`` stay as they are)."""
    if is_sharded(param) and tensor.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return tensor


class ProgressReporter(LoopHooks):
    """``progress`` in run.json after every step (at most every :data:`PROGRESS_INTERVAL_S`
    seconds: a fast run rewrites one small file twice a second, not at every step), and the
    progress line on stderr every ``every`` steps. The Train page shows the step it reads
    there, so it follows the step trained, not the last logged one.

    Rates are measured on training time: wall time since the start minus the evaluations'
    time, so the ETA (of the training left) does not jump after each evaluation.
    """

    def __init__(self, every: int, steps: int, start_step: int, info: RunInfoWriter,
                 evaluator: Evaluator, dist: Dist, interval: float | None = None):
        self.every, self.steps, self.info, self.evaluator, self.dist = (
            every, steps, info, evaluator, dist)
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.start_step = self.step = start_step
        self.started = time.perf_counter()
        self.eval_seconds_before = 0.0
        self.written = -math.inf  # perf_counter() of the last progress write

    def start(self) -> None:
        """Start the clock (after the step-0 evaluation)."""
        self.started = time.perf_counter()
        self.eval_seconds_before = self.evaluator.seconds

    def after_step(self, step: int, record: dict) -> None:
        self.step = step
        now = time.perf_counter()
        logged = step % self.every == 0 or step == self.steps
        if not logged and now - self.written < self.interval:
            return
        elapsed = now - self.started - (self.evaluator.seconds - self.eval_seconds_before)
        done = step - self.start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.steps - step) / rate if rate > 0 else None
        if logged and self.dist.is_main:
            eta_text = f"{eta:.0f}s" if eta is not None else "?"
            print(f"step {step}/{self.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
                  f"  {rate:.2f} it/s  ETA {eta_text}", file=sys.stderr)
        self.info.update_progress(step=step, steps=self.steps, loss=record["loss"],
                                  it_per_s=rate, eta_s=eta)
        self.written = time.perf_counter()


class StepsDone(LoopHooks):
    """The steps trained so far. Listed first among the hooks, so that when a later hook
    fails (a checkpoint write on a full disk) the failure names the step the weights
    reached, not the one the progress line last reported."""

    def __init__(self, start_step: int):
        self.step = start_step

    def after_step(self, step: int, record: dict) -> None:
        self.step = step


class StopOnSignal(LoopHooks):
    """SIGTERM asks the loop to stop after the current step; all processes stop at the same
    step, whichever of them got the signal."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnSignal:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        return self.dist.any(self.requested)
