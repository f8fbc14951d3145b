"""Fine-tune with a method, evaluating as it goes, into a run directory (``python -m spider.train``).

    python -m spider.train --model DIR --data SPEC --method NAME --output-dir RUN [flags]

:func:`train` reads top to bottom:

1. **Check and load everything** — the config (defaults <- ``--config FILE.json`` <- flags;
   ``--resume`` takes the config stored in ``RUN/run.json``), ``--output-dir``, the model
   (any local image-text-to-text directory, or a run checkpoint) with the parts named by
   ``--train`` unfrozen, the method wrapped around it, the data (every image of a data file
   decoded once). Nothing is written before all of it succeeds, so a mistake leaves no run
   behind; a run that ended before its first step is started again in place.
2. **Open the run directory** — a new ``run.json`` (status ``running``, the process, a
   heartbeat kept fresh by a thread), or, with ``--resume``, the saved state.
3. **Train** with the project's one loop (``spider.loop.train_loop``) and four hooks
   (``spider.hooks``): the statistics logger (``layers.jsonl`` every ``--log-every`` steps),
   the evaluator (step 0, every ``--eval-every`` steps), the checkpointer (every
   ``--save-every`` steps) and the progress reporter; a fifth stops on SIGTERM (listening
   from phase 2 on, when there is something to keep whole).
4. **End** — the method finalizes (DARE, WiSE-FT, Tailor act here; LoRA merges), the last
   statistics, evaluation and checkpoint are taken after it, and ``run.json`` gets the
   summary (U, D, H, E, F, O) and status ``done``.

SIGTERM saves and ends ``cancelled`` (exit 130, with the ``--resume`` command to continue); a
run that cannot go on (non-finite loss, out of memory) ends ``failed`` (exit 1, saying what to
try); a run killed outright continues with ``--resume`` exactly as if never interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spider.distributed import Dist, setup, sum_across, wrap_model
from spider.errors import CliParser, RunCancelled, RunFailed, UserError, cli_main
from spider.hooks import (
    SAVE_DTYPES,
    Checkpointer,
    Evaluator,
    ProgressReporter,
    StatisticsLogger,
    StepsDone,
    StopOnSignal,
)
from spider.loop import BatchSampler, LoopConfig, add_config_flags, make_optimizer, train_loop
from spider.methods.base import Method
from spider.recorder import RunRecorder
from spider.rundir import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    RunDir,
    RunInfoWriter,
    effective_status,
    model_reference,
)

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "sample_checkpoints" / "tiny-llava-base")
BUILTIN = "builtin:"


@dataclasses.dataclass
class RunConfig(LoopConfig):
    """Everything that determines a run (stored whole in run.json): the loop's settings
    (``LoopConfig``) and these."""

    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={
        "help": "local model directory or run checkpoint (default: the bundled tiny LLaVA)"})
    data: str = dataclasses.field(default="builtin:counting", metadata={
        "help": "downstream data: builtin:NAME or a LLaVA-style JSON file"})
    eval_data: str = dataclasses.field(default="", metadata={
        "help": "downstream evaluation data (default: the test split of a builtin --data; "
                "for a JSON --data, 1 in 20 of its records, held out of training)"})
    image_folder: str = dataclasses.field(default="", metadata={
        "help": "folder that image paths in JSON data are relative to (LLaVA's "
                "--image-folder; default: each JSON file's own folder)"})
    upstream: str = dataclasses.field(default="builtin:upstream", metadata={
        "help": "upstream (pre-training) data, evaluated for forgetting and mixed in by "
                "--hybrid-ratio"})
    method: str = dataclasses.field(default="spider", metadata={
        "help": "fine-tuning method (see README, 'The methods library')"})
    options: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "method option NAME=VALUE (repeatable)"})
    output_dir: str = dataclasses.field(default="", metadata={"help": "the run directory"})
    train: str = dataclasses.field(default="llm,projector", metadata={
        "help": "parts that train: comma-separated llm, projector, vision, attn (q/k/v/o of "
                "every decoder layer), mlp_gate_up (gate and up; down frozen)"})
    train_last_layers: int = dataclasses.field(default=0, metadata={
        "help": "train only the last N decoder layers of the language model (0: all)"})
    hybrid_ratio: float = dataclasses.field(default=0.0, metadata={
        "help": "share of every batch drawn from --upstream (data-hybrid training)"})
    train_size: int = dataclasses.field(default=0, metadata={
        "help": "examples of --data to train on (0: the dataset's default size)"})
    eval_every: int = dataclasses.field(default=50, metadata={
        "help": "evaluate every N steps (and always at step 0 and at the end)"})
    eval_limit: int = dataclasses.field(default=100, metadata={
        "help": "test examples per evaluated split"})
    log_every: int = dataclasses.field(default=10, metadata={
        "help": "write per-parameter statistics every N steps"})
    save_every: int = dataclasses.field(default=50, metadata={
        "help": "write a checkpoint every N steps (and at the end)"})
    save_dtype: str = dataclasses.field(default="float32", metadata={
        "help": "dtype of checkpoint tensors kept for analysis: float32, bfloat16, float16"})
    save_tensors: str = dataclasses.field(default="", metadata={
        "help": "regex: keep only matching parameters' tensors in checkpoints "
                "(statistics still cover every parameter)"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda"})
    dtype: str = dataclasses.field(default="float32", metadata={
        "help": "parameter dtype while training: float32 (on CUDA the compute runs in bf16 "
                "autocast), bfloat16, or auto = as the model was saved (half the memory; "
                "AdamW rounds small updates away in bf16 and fails in float16)"})
    parallel: str = dataclasses.field(default="auto", metadata={
        "help": "with several processes (torchrun): ddp = data parallel, fsdp = parameters "
                "sharded (FSDP2); auto = ddp when launched on several processes, else none"})



POSITIVE = ("steps", "batch_size", "grad_accum", "eval_every", "eval_limit", "log_every",
            "save_every")
NON_NEGATIVE = ("warmup_steps", "train_last_layers", "train_size", "weight_decay", "clip", "lr")


def check_config(cfg: RunConfig) -> None:
    """Raise a UserError naming the first flag whose value cannot work."""
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
        if not math.isfinite(getattr(cfg, name)):  # nan passes every comparison above
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, not "
                            f"{getattr(cfg, name)}")
    if cfg.lr == 0:
        raise UserError("--lr must be positive")
    if not 0.0 <= cfg.hybrid_ratio < 1.0:
        raise UserError(f"--hybrid-ratio must be in [0, 1), not {cfg.hybrid_ratio}")
    if cfg.dtype not in ("float32", "bfloat16", "auto"):
        raise UserError(f"--dtype must be float32, bfloat16 or auto, not {cfg.dtype!r}")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise UserError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, "
                        f"not {cfg.save_dtype!r}")
    try:
        re.compile(cfg.save_tensors)
    except re.error as err:
        raise UserError(f"--save-tensors is not a valid regular expression: {err}") from None
    if not cfg.output_dir:
        raise UserError("--output-dir is required: where the run directory goes")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise UserError(f"--output-dir {cfg.output_dir} is a file, not a folder; choose a "
                        "folder for the run directory")


def check_output_dir(run: RunDir, resume: bool) -> None:
    """``--output-dir`` must be new, empty, or hold a run that never trained; with
    ``--resume``, a run that is not done and not still running."""
    if resume:
        status = effective_status(run.read_run())
        if status == DONE:
            # a kill after the end may have left the resume state or a temporary behind:
            # a done run is never resumed and nothing writes it, so they can go
            run.remove_resume()
            run.remove_temporaries()
            raise UserError(f"the run in {run.path} is already done")
        if status == RUNNING:
            info = run.read_run()
            raise UserError(f"the run in {run.path} is still running (pid {info.get('pid')} "
                            f"on {info.get('hostname', 'this machine')}); stop it first")
    elif not run.is_empty() and not run.never_trained():
        raise UserError(f"--output-dir {run.path} is not empty; pass --resume to continue "
                        "the run there, or choose another folder")


# ------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class RunData:
    """The run's datasets: what it trains on, and what it is evaluated on."""

    train: Any
    upstream_train: Any | None
    eval_sets: dict[str, Any]
    eval_source: dict = dataclasses.field(default_factory=dict)  # which downstream eval data


def load_data(cfg: RunConfig, report: bool = True) -> RunData:
    """Every dataset the run uses; the images of data files are decoded once here, so a
    damaged one is named before anything is written."""
    from spider.data import cells, describe_eval_source, downstream_data, load_dataset

    folder = cfg.image_folder or None
    train_data, downstream, eval_source = downstream_data(
        cfg.data, cfg.eval_data, cfg.seed, cfg.train_size or None, folder)
    if report:
        print(describe_eval_source(eval_source), file=sys.stderr)
    upstream_train = (load_dataset(cfg.upstream, "train", seed=cfg.seed, image_folder=folder)
                      if cfg.hybrid_ratio > 0 else None)
    eval_sets = {"upstream": load_dataset(cfg.upstream, "test", seed=cfg.seed,
                                          image_folder=folder),
                 "downstream": downstream}
    if cfg.data.startswith(BUILTIN) and not cfg.eval_data:
        name = cfg.data.split(":")[1]
        for cell in cells(name):
            if cell != "idimg-idq":  # that cell is the downstream test split itself
                eval_sets[cell] = load_dataset(f"{BUILTIN}{name}:{cell}", "test", seed=cfg.seed)
    checked = [(cfg.data, train_data, None)]
    if upstream_train is not None:
        checked.append((cfg.upstream, upstream_train, None))
    checked += [(split, data, cfg.eval_limit) for split, data in eval_sets.items()]
    for spec, dataset, limit in checked:
        decode_all(dataset, str(getattr(dataset, "name", spec)), limit, report)
    return RunData(train_data, upstream_train, eval_sets, eval_source)


def decode_all(dataset, name: str, limit: int | None = None, report: bool = True,
               every_s: float = 2.0) -> None:
    """Read every example (decoding its image) of a data file once; a progress line on
    stderr every ``every_s`` seconds. Built-in data is generated, never damaged: skipped."""
    if str(name).startswith(BUILTIN):
        return
    count = len(dataset) if limit is None else min(limit, len(dataset))
    last = time.perf_counter()
    for index in range(count):
        dataset[index]
        if report and time.perf_counter() - last > every_s:
            print(f"checking data {name}: {index + 1}/{count} examples", file=sys.stderr)
            last = time.perf_counter()


@dataclasses.dataclass
class Model:
    """The model as the run trains it, and the method around it."""

    method: Method
    processor: Any
    trainable: list[str]
    train_model: torch.nn.Module  # what the loop calls: a DDP wrapper, or the model itself


def check_finite_weights(model: torch.nn.Module, given: str) -> None:
    """A base model holding NaN or inf is the model's fault, not the run's: say so before
    anything is written (otherwise the first step's loss is not finite and --lr is blamed)."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise UserError(f"--model {given}: the weight {name} holds {bad} value(s) that "
                            "are not finite (NaN or inf); fine-tune a model with finite "
                            "weights")


def load_model_and_method(cfg: RunConfig, dist: Dist, device: torch.device) -> Model:
    from spider.methods import build_method, method_class
    from spider.models import load_model, select_trainable

    torch.manual_seed(cfg.seed)
    model, processor = load_model(cfg.model, device=str(device),
                                  dtype=None if cfg.dtype == "auto" else cfg.dtype)
    check_finite_weights(model, cfg.model)
    parts = [p.strip() for p in cfg.train.split(",") if p.strip()]
    trainable = select_trainable(model, parts, cfg.train_last_layers or None)
    try:
        cls = method_class(cfg.method)
    except ValueError as err:
        raise UserError(str(err)) from None
    if dist.mode == "fsdp":
        if not cls.shardable:
            raise UserError(f"--parallel fsdp: method '{cfg.method}' does not support "
                            "sharded parameters; use spider or full, or --parallel ddp")
        model = wrap_model(model, dist, device)  # the method must see the shards: shard first
    try:
        method = build_method(cfg.method, model, **cfg.options)
    except ValueError as err:
        raise UserError(str(err)) from None
    # LoRA wraps the model: method.model is what trains and is evaluated from here on
    train_model = wrap_model(method.model, dist, device) if dist.mode == "ddp" else method.model
    return Model(method, processor, trainable, train_model)


def new_run_info(cfg: RunConfig, model: Model, run: RunDir, dist: Dist,
                 device: torch.device) -> dict:
    """The fields of the first ``run.json`` of a run (``spider.recorder.run_info``'s)."""
    from spider.models import resolve_model_path

    return {
        "config": dataclasses.asdict(cfg),
        "model": {**model_reference(resolve_model_path(cfg.model), run.path),
                  "given": cfg.model},
        "seed": cfg.seed,
        "device": str(device),
        "parallel": {"mode": dist.mode, "world_size": dist.world},
        "trainable": model.trainable,
        "steps": cfg.steps,
    }


OOM_ADVICE = ("lower --batch-size (and raise --grad-accum to keep the batch), use --dtype "
              "bfloat16, train fewer parameters (--train-last-layers N, or --train llm), or "
              "lower --eval-limit if it happened while evaluating")


# ------------------------------------------------------------------------------- the run
def train(cfg: RunConfig, resume: bool = False, dist: Dist | None = None,
          device: torch.device | None = None) -> dict:
    """Run (or, with ``resume``, continue) the fine-tuning ``cfg`` describes; returns the
    final ``run.json``. Raises ``UserError`` before anything is written for bad input,
    ``RunFailed`` / ``RunCancelled`` when the run ends otherwise than ``done``."""
    from spider.models import resolve_device

    dist = dist or Dist()
    device = device or resolve_device(cfg.device)
    run = RunDir(cfg.output_dir)

    # -- 1. check and load everything; nothing is written before this succeeds
    check_config(cfg)
    check_output_dir(run, resume)
    dist.barrier()  # every process has looked before process 0 writes anything
    if resume:
        made = run.read_run().get("parallel", {}).get("world_size", 1)
        if made != dist.world:
            raise UserError(f"--resume: the run in {run.path} was made with {made} "
                            f"process(es), not {dist.world}; resume it with as many "
                            "(the global batch depends on it)")
    model = load_model_and_method(cfg, dist, device)
    method = model.method
    data = load_data(cfg, report=dist.is_main)
    get_batch = batches(cfg, data, model.processor, dist, device)
    optimizer = make_optimizer(list(method.trainable_parameters()), cfg)
    # theta0 of every trained tensor, for update norms (effective weights: LoRA merged)
    theta0 = {n: t.detach().clone() for n, t in method.effective_weights().items()}

    # -- 2. the run directory: a new run.json, or the saved state to continue from. From
    # here on SIGTERM asks the run to stop at its next safe point instead of killing it
    # mid-write; before, nothing is written and the default (exit at once) loses nothing.
    with StopOnSignal(dist) as stop:
        info = RunInfoWriter(run, {}, enabled=dist.is_main)
        recorder = RunRecorder(
            run, method, theta0, info, writes=dist.is_main, measures=dist.sees_whole_model,
            reduce=(lambda t: sum_across(t.to(device)).cpu()) if dist.mode == "fsdp" else None)
        checkpointer = Checkpointer(method, optimizer, cfg.save_every, cfg.steps,
                                    cfg.save_dtype, cfg.save_tensors, run, dist, device)
        start = checkpointer.restore() if resume else 0
        if start > 0:
            recorder.resumed(start)
        else:  # a new run, or one that never trained: (again) from the start, in place
            if dist.is_main and resume:
                # killed before its first resume state: what it wrote is re-made exactly
                print(f"{run.path} has no saved resume state yet; starting it again from "
                      "step 0", file=sys.stderr)
            if dist.is_main and not run.is_empty():
                run.clear()
            recorder.start(**new_run_info(cfg, model, run, dist, device),
                           downstream_eval=data.eval_source)
        dist.barrier()  # nobody trains before process 0 has set the run directory up
        with info.heartbeat():
            return _train_steps(TrainContext(cfg, model, data, get_batch, optimizer, recorder,
                                             checkpointer, stop, start, dist, device))


@dataclasses.dataclass
class TrainContext:
    """What phases 3 and 4 of :func:`train` work with, set up by phases 1 and 2."""

    cfg: RunConfig
    model: Model
    data: RunData
    get_batch: Callable[[int, int], dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    recorder: RunRecorder  # statistics rows, run.json (its info writer) and the summary
    checkpointer: Checkpointer
    stop: StopOnSignal
    start: int  # the step training starts from (0, or the resumed step)
    dist: Dist
    device: torch.device


def _train_steps(ctx: TrainContext) -> dict:
    """Phases 3 and 4 of :func:`train`: the loop with its hooks, then the end."""
    cfg, model, data, get_batch, optimizer = (ctx.cfg, ctx.model, ctx.data, ctx.get_batch,
                                              ctx.optimizer)
    checkpointer, stop, start, dist, device = (ctx.checkpointer, ctx.stop, ctx.start, ctx.dist,
                                               ctx.device)
    recorder = ctx.recorder
    run, info = recorder.run, recorder.info
    method: Method = model.method
    evaluator = Evaluator(method, model.processor, data.eval_sets, cfg.eval_limit,
                          cfg.eval_every, cfg.steps, run, info, dist, lambda: get_batch(0, 0))
    statistics = StatisticsLogger(method, recorder, cfg.log_every, cfg.save_every, cfg.steps,
                                  run, dist)
    progress = ProgressReporter(cfg.log_every, cfg.steps, start, info, evaluator, dist)
    done = StepsDone(start)
    try:
        if start == 0:
            evaluator.evaluate(0)
        step = start
        if not stop.should_stop():  # a SIGTERM while setting up: stop before the first step
            progress.start()
            method.collect_statistics = statistics.logs_at(start + 1)
            model.train_model.train()
            step = train_loop(model.train_model, method, optimizer, get_batch, cfg,
                              [done, statistics, evaluator, checkpointer, progress, stop],
                              start_step=start, device=device, dist=dist)
        statistics.flush()
        if step < cfg.steps:  # -- 4a. stopped by SIGTERM: save, say how to continue
            if step > start:
                checkpointer.save(step)
            info.update(status=CANCELLED, ended=time.time())
            info.update_progress(step=step, saved_step=checkpointer.last_saved)
            raise RunCancelled(f"stopped at step {step} of {cfg.steps}"
                               + (" and saved" if step > start else "")
                               + f"; continue with: {_resume_command(run)}")
        # -- 4b. the end: finalize, then the last statistics, evaluation and checkpoint
        method.finalize()
        statistics.log_final(step)
        evaluator.evaluate(step)
        checkpointer.save(step, finalized=True)
        if dist.is_main:
            recorder.done()
            run.remove_resume()  # a finished run is never resumed: free the space
        dist.barrier()
        return info.info
    except RunCancelled:
        raise
    except BaseException as err:
        failure = _as_failure(err, done.step, device)
        status = CANCELLED if isinstance(err, KeyboardInterrupt) else FAILED
        # on a full disk these writes may fail too: the error that ended the run is the
        # one to report (run.json then keeps "running", read as stopped unexpectedly)
        with contextlib.suppress(OSError):
            statistics.flush()
        with contextlib.suppress(OSError):
            info.update(status=status, ended=time.time(), error=str(failure or err) if
                        failure or isinstance(err, UserError)
                        else f"{type(err).__name__}: {err}")
            info.update_progress(step=done.step, saved_step=checkpointer.last_saved)
        if failure is not None:
            raise failure from None
        raise


def _as_failure(err: BaseException, step: int, device: torch.device
                ) -> RunFailed | RunCancelled | None:
    """The taxonomy's reading of an error that ended a run (None: a bug, or a UserError)."""
    if isinstance(err, KeyboardInterrupt):
        return RunCancelled(f"interrupted at step {step}; continue from the last saved step "
                            "with --resume")
    if isinstance(err, torch.OutOfMemoryError) or (
            isinstance(err, RuntimeError) and "out of memory" in str(err).lower()):
        return RunFailed(f"out of memory on {device} after step {step}; {OOM_ADVICE}")
    if isinstance(err, RunFailed):
        return err
    full = _disk_full(err)
    if full is not None:
        return RunFailed(f"the disk is full ({full}) after step {step}; the checkpoints saved "
                         "before are intact: free space and continue with --resume")
    return None


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXTS = tuple(os.strerror(e).lower() for e in DISK_FULL_ERRNOS)


def _disk_full(err: BaseException) -> str | None:
    """What a failed write says when the disk (or quota) is full, else None. safetensors
    wraps the operating system's error in its own exception, so its text is read too."""
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return f"{os.strerror(err.errno)} writing {err.filename}" if err.filename else \
            os.strerror(err.errno)
    text = str(err).lower()
    return next((os.strerror(e) for e, t in zip(DISK_FULL_ERRNOS, DISK_FULL_TEXTS)
                 if t in text), None)


def _resume_command(run: RunDir) -> str:
    return f"python -m spider.train --output-dir {run.path} --resume"


def batches(cfg: RunConfig, data: RunData, processor, dist: Dist, device: torch.device
            ) -> Callable[[int, int], dict[str, torch.Tensor]]:
    """``get_batch(step, micro)``: this process's micro-batch, a pure function of the seed."""
    from spider.data.collate import TrainCollator

    collate = TrainCollator(processor)
    sampler = BatchSampler(len(data.train), cfg.batch_size, cfg.grad_accum, cfg.seed,
                           len(data.upstream_train or []), cfg.hybrid_ratio,
                           rank=dist.rank, world=dist.world)

    def get_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        main, mixed = sampler.indices(step, micro)
        examples = [data.train[i] for i in main] + [data.upstream_train[i] for i in mixed]
        return {k: v.to(device) for k, v in collate(examples).items()}

    return get_batch


# ------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m spider.train", description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS)
    add_config_flags(parser, RunConfig)
    parser.add_argument("--option", dest="options", action="append", metavar="NAME=VALUE",
                        help=dataclasses.fields(RunConfig)[
                            [f.name for f in dataclasses.fields(RunConfig)].index("options")
                        ].metadata["help"])
    parser.add_argument("--config", type=Path, help="JSON file of settings (flags override it)")
    parser.add_argument("--resume", action="store_true", default=False,
                        help="continue the run in --output-dir from its last saved step")
    return parser


def _parse_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--option {item!r} must look like NAME=VALUE")
        name, value = item.split("=", 1)
        options[name.strip()] = value.strip()
    return options


def _config_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"config file {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a JSON object of settings")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config file {path} has unknown setting {unknown[0]!r}; "
                        f"known: {', '.join(sorted(known))}")
    return data


def build_config(argv: list[str] | None) -> tuple[RunConfig, bool]:
    args = vars(_parser().parse_args(argv))
    resume = args.pop("resume")
    settings: dict[str, Any] = {}
    if "config" in args:
        settings.update(_config_file(args.pop("config")))
    if "options" in args:
        args["options"] = _parse_options(args["options"])
    settings.update(args)
    if resume:
        if not settings.get("output_dir"):
            raise UserError("--resume needs --output-dir: the run to continue")
        if Path(settings["output_dir"]).is_file():
            raise UserError(f"--output-dir {settings['output_dir']} is a file, not a run folder")
        stored = RunDir(settings["output_dir"]).read_run().get("config", {})
        # the folder may have moved since: where it is now wins
        clashes = [k for k, v in settings.items()
                   if k in stored and stored[k] != v and k != "output_dir"]
        if clashes:
            k = clashes[0]
            raise UserError(f"--resume: the run in {settings['output_dir']} was made with "
                            f"{k}={stored[k]!r}, not {settings[k]!r}; resume with the same "
                            "settings or start a new run")
        settings = {**stored, "output_dir": settings["output_dir"]}
    try:
        cfg = RunConfig(**settings)
    except TypeError as err:
        raise UserError(f"bad settings: {err}") from None
    check_config(cfg)
    check_names(cfg)
    return cfg, resume


def check_names(cfg: RunConfig) -> None:
    """The method, its options and the built-in data names, checked before the model loads:
    a typo in a flag is one ``error:`` line, with no loading output before it."""
    from spider.data import is_builtin, load_dataset
    from spider.methods import make_options

    try:
        make_options(cfg.method, **cfg.options)
    except ValueError as err:
        raise UserError(str(err)) from None
    for spec in (cfg.data, cfg.eval_data, cfg.upstream):
        if spec and is_builtin(spec):
            load_dataset(spec, "train", seed=cfg.seed, size=1)  # lazy: nothing generated


@cli_main
def main(argv: list[str] | None = None) -> dict:
    from spider.models import resolve_device

    cfg, resume = build_config(argv)
    dist, device = setup(cfg.parallel, resolve_device(cfg.device))
    run = RunDir(cfg.output_dir)
    try:
        info = train(cfg, resume, dist, device)
    except RunCancelled:
        if dist.is_main:
            print(json.dumps({"output_dir": str(run.path), "status": CANCELLED}))
        raise
    finally:
        dist.shutdown()
    if dist.is_main:
        print(json.dumps({"output_dir": str(run.path), "status": info["status"],
                          **({"summary": info["summary"]} if "summary" in info else {})}))
    return info


if __name__ == "__main__":
    main()
