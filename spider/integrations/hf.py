"""SPIDER (or any registered method) inside a stock Hugging Face ``Trainer``.

::

    from spider.integrations.hf import SpiderCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate,
                      callbacks=[SpiderCallback("spider", run_dir="runs/hf-spider")])
    trainer.train()

Where the method's hooks run. In transformers 5.23 ``Trainer._run_epoch`` does, per
optimizer step (read in its source)::

    for each micro-batch:  forward, backward     (gradients add up; DDP syncs on the last one)
    clip_grad_norm_(model.parameters(), max_grad_norm)
    on_pre_optimizer_step  -> method.before_optimizer_step()   clipped gradients present
    optimizer.step()
    on_optimizer_step      -> method.after_optimizer_step()    gradients still present
    lr_scheduler.step();  model.zero_grad()
    global_step += 1;  on_step_end -> per-parameter statistics (run directory)
    log / evaluate / save  -> on_log (events), on_save (method state into checkpoint-N/)
    ...
    on_train_end -> method.finalize()

``on_pre_optimizer_step`` and ``on_optimizer_step`` fire once per optimizer step, after the
last micro-batch of a gradient accumulation, so the order is exactly that of the methods'
plain loop (ARCHITECTURE.md, "Methods"; a Trainer with this callback trains like that loop:
tested). The method is built at ``on_train_begin`` on the model's trainable parameters, after
the Trainer has created the optimizer and (when resuming) loaded the checkpoint; its state,
and the trained tensors, are then restored from that checkpoint's ``METHOD_STATE_FILE``, so
theta0 stays the pre-trained weights.

Methods that need more than hooks:

* a loss penalty (``l2``): a stock Trainer cannot add it. Use :class:`SpiderTrainer`, or
  :func:`with_loss_penalty` on your own Trainer class (``with_loss_penalty(SFTTrainer)``).
  The callback stops at the first optimizer step with a message if nobody added the penalty.
* a different model (``lora``): PEFT wraps the model *before* the Trainer is built (the
  Trainer's optimizer must hold the adapters). Pass ``build_method("lora", model).model`` to
  the Trainer and that method to the callback, or wrap the model with ``peft.get_peft_model``
  yourself (TRL's ``peft_config`` does) and give ``SpiderCallback("lora")``, which then takes
  the adapters PEFT made. The model stays PEFT-wrapped after training (``merge_and_unload()``
  it yourself); the run directory's checkpoints hold the merged weights.

With ``run_dir`` the callback writes the run directory of ``python -m spider.train``
(run info, the Trainer's logged losses and evaluation metrics as events, per-parameter
statistics every ``logging_steps``, checkpoints with the method's tensors at the Trainer's
saves and at the end), through :mod:`spider.rundir`; ``analysis.load_run`` reads it like any
other run. Process 0 alone writes it.

Parallel set-ups (checked at ``on_train_begin``, which names what is supported otherwise):

* one process, and DDP (every process holds whole tensors and the same averaged gradients);
* FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``: accelerate's
  ``fully_shard``): the trained parameters are DTensors and each process holds a shard. The
  method is built on the shards after the Trainer sharded the model and, as under
  ``python -m spider.train --parallel fsdp``, all-reduces the per-tensor sums behind every rank
  (``spider.importance``), so a shard gets exactly the mask of the whole tensor. Statistics
  are measured on every process and reduced the same way; checkpoints gather whole tensors
  (every process takes part) and process 0 writes them. Only methods marked ``shardable``
  (``spider``, ``full``) run on shards;
* refused: FSDP1 (flat parameters hide the tensors SPIDER ranks) and DeepSpeed (ZeRO keeps
  gradients and weights in its own partitioned buffers, out of the hooks' reach).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from spider.distributed import as_logical, full, is_sharded, local, shard_of, sum_across
from spider.methods import (
    MethodBase,
    available_methods,
    build_method,
    make_options,
    method_class,
)
from spider.recorder import RunRecorder, run_summary
from spider.rundir import (
    EvalEvent,
    RunDir,
    RunInfoWriter,
    TrainEvent,
    atomic_write_bytes,
    model_reference,
)

#: The method's state in a Trainer checkpoint folder (``checkpoint-N/``), next to the
#: Trainer's own files: safetensors, the method's JSON meta in the file's metadata.
METHOD_STATE_FILE = "spider_method.safetensors"
_META_KEY = "spider_method"
# Keys of the state file that hold, for the run directory's update norms, the weights the
# run started from (what ``effective_weights`` was at step 0).
_START_PREFIX = "start_weights/"
# Keys of the state file that hold the trained parameters themselves. Needed because
# transformers 5.23's Trainer saves a LLaVA model under its legacy key names
# (``language_model.model.*``) and loads it back on resume with ``strict=False``: no key
# matches, and the model silently keeps the weights it was built with (found by this
# module's resume test). Methods whose trained tensors live in their own state (LoRA's
# adapters) need no copy.
_TRAINED_PREFIX = "trained/"
# Trainer metrics that describe speed, not the model: not turned into eval events.
_SPEED_METRICS = ("runtime", "samples_per_second", "steps_per_second",
                  "model_preparation_time")

LORA_HELP = (
    "method 'lora' changes the model, so PEFT must wrap it before the Trainer is built: "
    "pass lora = build_method('lora', model) as SpiderCallback(lora) and lora.model as the "
    "Trainer's model, or wrap the model with peft.get_peft_model first (TRL: peft_config)")


#: The parallel set-ups the callback supports, named in every refusal.
SUPPORTED_SETUPS = ("supported: one process, DDP, or FSDP2 (TrainingArguments(fsdp=True, "
                    "fsdp_config={'version': 2}))")


# ------------------------------------------------------------------------------ helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers (accelerate's ``prepare`` adds them)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a requirement
        return False
    return isinstance(model, PeftModel)


def _has_penalty(method: MethodBase) -> bool:
    return (type(method).loss_penalty is not MethodBase.loss_penalty
            or _has_output_penalty(method))


def _has_output_penalty(method: MethodBase) -> bool:
    return type(method).output_penalty is not MethodBase.output_penalty


def _adopt_peft_lora(model: nn.Module) -> MethodBase:
    """The ``lora`` method on adapters PEFT already put on ``model`` (a ``PeftModel``)."""
    from peft.tuners.lora import LoraLayer

    from spider.methods.lora import Lora, LoraOptions

    adapter = getattr(model, "active_adapter", "default")
    config = model.peft_config.get(adapter)
    if adapter != "default" or config is None or getattr(config, "peft_type", None) is None \
            or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError("SpiderCallback('lora') takes a PeftModel with one LoRA adapter named "
                         f"'default'; this one has {sorted(model.peft_config)} "
                         f"(active: {adapter!r})")
    root = model.base_model.model
    targets = [name for name, module in root.named_modules() if isinstance(module, LoraLayer)]
    options = LoraOptions(r=int(config.r), alpha=float(config.lora_alpha),
                          dropout=float(config.lora_dropout), target=",".join(targets))

    class AdoptedLora(Lora):
        """Lora over the adapters PEFT made before the Trainer was built."""

        def __init__(self) -> None:
            MethodBase.__init__(self, model, options)
            self.base_model = root
            self._requires_grad = {}
            self.finalized = False
            self.targets = targets

    return AdoptedLora()


def _deepspeed_stage(args) -> int | str | None:
    """The ZeRO stage when the Trainer runs under DeepSpeed (``"?"`` when it cannot be told),
    else None. Read from the arguments (``deepspeed=``, the config transformers parsed) and
    from accelerate's process-wide state, which a launcher (``accelerate launch``) may have
    set without either."""
    config = getattr(args, "hf_deepspeed_config", None)
    config = getattr(config, "config", None)
    if config is None and isinstance(getattr(args, "deepspeed", None), dict):
        config = args.deepspeed
    if isinstance(config, dict):
        stage = (config.get("zero_optimization") or {}).get("stage")
        return stage if stage is not None else "?"
    if getattr(args, "deepspeed", None):
        return "?"  # a config file transformers has not parsed (yet)
    try:
        from accelerate.state import PartialState
    except ImportError:  # pragma: no cover - accelerate comes with the Trainer
        return None
    kind = PartialState._shared_state.get("distributed_type")
    return "?" if str(getattr(kind, "value", kind)).upper() == "DEEPSPEED" else None


def _is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def parallel_mode(args, model: nn.Module, method_name: str) -> str:
    """``none``, ``ddp`` or ``fsdp`` (FSDP2: the trainable parameters are DTensors) for the
    Trainer's set-up, or a ``ValueError`` of one line naming what is supported."""
    stage = _deepspeed_stage(args)
    if stage is not None:
        zero = f" ZeRO-{stage}" if stage != "?" else ""
        raise ValueError(f"SpiderCallback: DeepSpeed{zero} is not supported (ZeRO keeps "
                         "gradients and weights in its own partitioned buffers, out of the "
                         f"method's hooks); {SUPPORTED_SETUPS}")
    if _is_fsdp1(model):
        raise ValueError("SpiderCallback: FSDP1 (fsdp_config version 1) is not supported "
                         "(its flat parameters hide the tensors the method ranks); "
                         f"{SUPPORTED_SETUPS}")
    if any(is_sharded(p) for p in model.parameters() if p.requires_grad):
        if not method_class(method_name).shardable:
            shardable = [n for n in available_methods() if method_class(n).shardable]
            raise ValueError(f"SpiderCallback: method '{method_name}' does not support "
                             "parameters sharded by FSDP2; use "
                             f"{' or '.join(shardable)}, or train with DDP or one process")
        return "fsdp"
    mode = "ddp" if int(getattr(args, "world_size", 1) or 1) > 1 else "none"
    if getattr(args, "fsdp", None):
        # accelerate turns FSDP on only where it supports it (not on CPU, for one): the
        # Trainer then trains unsharded without a word, and the run would seem to be FSDP's
        warnings.warn(f"SpiderCallback: TrainingArguments ask for FSDP ({args.fsdp}) but the "
                      f"trained parameters are not sharded; training runs as {mode} "
                      "(accelerate did not turn FSDP on for this device)", stacklevel=2)
    return mode


def _whole(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU, one at a time: a sharded one (FSDP2) is gathered, which every
    process must take part in; only a process that ``keep``s holds the results."""
    out = {}
    for name, t in tensors.items():
        whole = full(t.detach())
        if keep:
            out[name] = whole.contiguous().cpu().clone()
        del whole
    return out


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the tensors under ``prefix`` (keys without it)."""
    return {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}


def _json_safe(value: Any) -> Any:
    """TrainingArguments values as JSON (enums by their value)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(getattr(value, "value", value))


# ------------------------------------------------------------------------------ penalty
def with_loss_penalty(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` whose ``compute_loss`` adds the ``SpiderCallback`` method's loss
    penalty (L2) and output penalty (LwF: from the batch and the model's outputs on it) while
    training.

    The penalty enters each optimizer step once, as in the plain loop: when the Trainer scales
    the loss for gradient accumulation itself (the model normalises by the tokens of the whole
    accumulated batch), each micro-batch gets ``penalty / micro-batches``; otherwise the
    Trainer divides the sum by the micro-batches. Under DDP every process adds the same
    penalty, which the gradient average leaves unchanged.
    """

    class PenaltyTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            callback = next((c for c in self.callback_handler.callbacks
                             if isinstance(c, SpiderCallback)), None)
            # a method with an output penalty (LwF) needs the batch (taken before the Trainer
            # may pop its labels) and the model's outputs
            batch = (dict(inputs) if callback is not None and callback.method is not None
                     and model.training and _has_output_penalty(callback.method) else None)
            result = super().compute_loss(model, inputs,
                                          return_outputs=return_outputs or batch is not None,
                                          num_items_in_batch=num_items_in_batch)
            if batch is not None:
                extra = callback.method.output_penalty(batch, result[1])
                result = result if return_outputs else result[0]
            if callback is None or callback.method is None or not model.training:
                return result
            penalty = callback.method.loss_penalty()
            if batch is not None and extra is not None:
                penalty = extra if penalty is None else penalty + extra
            callback.penalty_added = True
            if penalty is None:
                return result
            if self.loss_is_scaled_for_ga is not None:
                scaled = self.loss_is_scaled_for_ga
            else:  # transformers 5.23 Trainer.training_step's rule
                scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                          or self.compute_loss_func is not None)
            if scaled:
                penalty = penalty / self.current_gradient_accumulation_steps
            if return_outputs:
                loss, outputs = result
                return loss + penalty.to(loss.dtype), outputs
            return result + penalty.to(result.dtype)

    PenaltyTrainer.__name__ = PenaltyTrainer.__qualname__ = f"Penalty{trainer_class.__name__}"
    return PenaltyTrainer


SpiderTrainer = with_loss_penalty(Trainer)
SpiderTrainer.__doc__ = "``transformers.Trainer`` that adds the SpiderCallback method's penalty."


# ------------------------------------------------------------------------------ the callback
class SpiderCallback(TrainerCallback):
    """Runs a Spiderscope method inside a Hugging Face ``Trainer``.

    Args:
        method: a registered method name (``spider.methods.available_methods()``), built at
            ``on_train_begin`` on the model's trainable parameters; or a method already
            built on the Trainer's model (needed for ``lora``: see the module docstring).
        run_dir: where to write the run directory (None: none). Must be empty or absent,
            unless the Trainer resumes a run that wrote it.
        **options: the method's options (``spider.methods.option_fields(name)``).

    Attributes:
        method: the method, once training has begun.
    """

    def __init__(self, method: str | MethodBase = "spider", run_dir: str | os.PathLike | None
                 = None, **options: Any):
        if isinstance(method, MethodBase):
            if options:
                raise ValueError("SpiderCallback: options belong to build_method when the "
                                 f"method is given built; got {sorted(options)}")
            self.method_name = method.name
            self.method: MethodBase | None = method
            self._given = method
        else:
            make_options(method, **options)  # unknown name or bad option: fail now, not later
            if method == "lora" and options:
                raise ValueError("SpiderCallback('lora'): the adapters' options (r, alpha, "
                                 "dropout, target) are PEFT's, set before the Trainer is built: "
                                 "give them to build_method('lora', model, ...) or LoraConfig")
            self.method_name = method
            self.method = None
            self._given = None
        self.options = options
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.penalty_added = False
        self._writer: _RunWriter | None = None
        #: none | ddp | fsdp, found at on_train_begin (``parallel_mode``)
        self.parallel = "none"

    # -- building the method
    def _build(self, model: nn.Module, resuming: bool = False) -> MethodBase:
        if self._given is not None:
            method = self._given
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            if trainable != {id(p) for p in method.params.values()}:
                raise ValueError(f"SpiderCallback: the given method '{method.name}' was built "
                                 "on another model than the Trainer's (its trained tensors "
                                 "are not the model's trainable parameters)")
            return method
        if self.method_name == "lora":
            if not _is_peft(model):
                raise ValueError(LORA_HELP)
            return _adopt_peft_lora(model)
        if _is_peft(model):
            raise ValueError(
                f"SpiderCallback('{self.method_name}'): the Trainer's model is wrapped by PEFT, "
                "so only its adapters train; use SpiderCallback('lora') to run it, or give "
                f"'{self.method_name}' an unwrapped model (it acts on the model's own weights)")
        cls = method_class(self.method_name)
        if resuming and getattr(cls, "builds_unscored", False):
            # the model holds the checkpoint's weights, not theta0: scoring them would miss
            # the score cache and be replaced by the saved mask (_load_state) anyway
            return cls(model, make_options(self.method_name, **self.options), scored=False)
        return build_method(self.method_name, model, **self.options)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model)
        self.parallel = parallel_mode(args, model, self.method_name)
        if self.parallel == "fsdp" and self._given is not None:
            raise ValueError("SpiderCallback: under FSDP2 the Trainer shards the model after "
                             "it is built, so the method must be built on the shards: give "
                             f"SpiderCallback('{self.method_name}') the method's name")
        self.method = self._build(model, resuming=state.global_step > 0)
        self.penalty_added = False
        start_weights = None
        if state.global_step > 0:  # resuming: the model holds the checkpoint's weights
            start_weights = self._load_state(args, state)
        if self.run is not None:
            self._writer = _RunWriter(self.run, self.method, model, args, state,
                                      start_weights, self.options, self.parallel)
        self._plan_statistics(state, state.global_step + 1)

    # -- the optimizer step
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if _has_penalty(self.method) and not self.penalty_added:
            raise RuntimeError(
                f"method '{self.method_name}' adds a loss penalty, which a stock Trainer does "
                "not compute: use spider.integrations.hf.SpiderTrainer, or "
                "with_loss_penalty(YourTrainerClass)")
        self.method.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            if self._statistics_due(state, state.global_step) \
                    and state.global_step < state.max_steps:  # the last step: after finalize
                self._writer.statistics(state.global_step)
            self._writer.beat()
        self._plan_statistics(state, state.global_step + 1)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.beat()  # a long evaluation is not a dead run

    def _statistics_due(self, state, step: int) -> bool:
        return step % max(1, int(state.logging_steps or 1)) == 0 or step >= state.max_steps

    def _plan_statistics(self, state, step: int) -> None:
        # statistics come out of the update itself on the steps that log them
        self.method.collect_statistics = self._writer is not None and \
            self._statistics_due(state, step)

    # -- events, checkpoints, the end
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._writer is not None and logs:
            self._writer.log(state.global_step, logs)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        writes = bool(args.should_save and folder.is_dir())
        if writes or self.parallel == "fsdp":  # every process gathers the shards
            self._save_state(folder, state.global_step, writes)
        if self._writer is not None:
            self._writer.checkpoint(state.global_step, finalized=False)

    def on_train_end(self, args, state, control, **kwargs):
        from spider.methods.lora import Lora

        if not isinstance(self.method, Lora):
            self.method.finalize()  # LoRA would merge and unwrap the Trainer's PeftModel
        if self._writer is not None:
            self._writer.finish(state.global_step)

    # -- the method's state in the Trainer's checkpoint folder
    def _save_state(self, folder: Path, step: int, writes: bool = True) -> None:
        """The method's state as whole tensors (gathered under FSDP2: every process calls
        this; the one that ``writes`` keeps them and writes the file)."""
        state = self.method.state_dict()
        tensors = dict(state["tensors"])
        if self.method.restores_weights:
            tensors.update({_TRAINED_PREFIX + n: p for n, p in self.method.params.items()})
        if self._writer is not None:  # what the update norms are measured from
            tensors.update({_START_PREFIX + k: v
                            for k, v in self._writer.start_weights.items()})
        tensors = _whole(tensors, keep=writes)
        if not writes:
            return
        meta = {_META_KEY: json.dumps({**state["meta"], "step": step})}
        atomic_write_bytes(folder / METHOD_STATE_FILE, safetensors_bytes(tensors, meta))

    def _load_state(self, args, state) -> dict[str, torch.Tensor] | None:
        """Restore the method from the checkpoint the Trainer resumes from; returns the start
        weights stored there (for update norms), if any."""
        step = state.global_step
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}")
        for folder in candidates:
            file = folder / METHOD_STATE_FILE
            if not file.is_file():
                continue
            with safe_open(str(file), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get(_META_KEY, "{}"))
                if meta.get("step") != step:
                    continue
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            start = _take(tensors, _START_PREFIX)
            trained = _take(tensors, _TRAINED_PREFIX)
            meta.pop("step")
            try:
                unknown = sorted(set(trained) - set(self.method.params))
                if unknown:
                    raise ValueError(f"tensor {unknown[0]} is not a trained parameter here")
                with torch.no_grad():
                    for name, tensor in trained.items():  # this process's shard under FSDP2
                        param = self.method.params[name]
                        local(param).copy_(shard_of(tensor, param))
                self.method.load_state_dict({"meta": meta, "tensors": tensors})
            except (ValueError, RuntimeError) as err:
                raise ValueError(f"SpiderCallback: {file} does not fit this run: {err}") from None
            # the start weights sharded like the weights they are compared with
            params = self.method.params
            start = {k: (as_logical(shard_of(v, params[k]), params[k])
                         if k in params and is_sharded(params[k]) else v)
                     for k, v in start.items()}
            return start or None
        raise ValueError(
            f"SpiderCallback: the Trainer resumes at step {step} but no {METHOD_STATE_FILE} of "
            f"that step is in {' or '.join(str(c) for c in candidates)}; resume from a "
            "checkpoint saved with this callback (trainer.train(resume_from_checkpoint=True) "
            "or a checkpoint-N folder of args.output_dir)")


# ------------------------------------------------------------------------------ run directory
class _RunWriter:
    """Writes the run directory of a Trainer run through ``spider.rundir``'s records and
    writers (process 0 only; every process keeps the start weights for its checkpoints).
    Under FSDP2 every process measures (statistics are reduced over the shards, checkpoints
    gathered) and process 0 writes."""

    def __init__(self, run: RunDir, method: MethodBase, model: nn.Module, args, state,
                 start_weights: dict[str, torch.Tensor] | None, options: dict,
                 parallel: str = "none"):
        self.run, self.method, self.parallel = run, method, parallel
        self.is_main = bool(state.is_world_process_zero)
        self.measures = self.is_main or parallel == "fsdp"
        self.last_log = (int(state.global_step), time.perf_counter())
        # a resumed Trainer with eval_on_start evaluates the resumed step again: its events
        # are in the log already
        self.resumed_at = int(state.global_step)
        # the update norms are measured from the weights the run started from
        if start_weights is None:
            if state.global_step > 0:
                raise ValueError(f"SpiderCallback: run_dir {run.path} is given, but the "
                                 "checkpoint it resumes from was saved without one")
            start_weights = {n: t.detach().clone() for n, t in method.effective_weights().items()}
        self.start_weights = start_weights
        self.info = RunInfoWriter(run, {}, enabled=self.is_main)
        # statistics rows, run.json and the summary: the same recorder as spider.train's
        reduce = None
        if parallel == "fsdp":  # the recorder's float64 sums, over the shards
            device = local(next(iter(method.params.values()))).device
            reduce = lambda sums: sum_across(sums.to(device)).cpu()  # noqa: E731
        self.recorder = RunRecorder(run, method, start_weights, self.info, writes=self.is_main,
                                    measures=self.measures, reduce=reduce)
        if not self.is_main:
            return
        if state.global_step == 0:
            if not run.is_empty():
                raise ValueError(f"SpiderCallback: run_dir {run.path} is not an empty folder; "
                                 "choose another (a run directory is never overwritten)")
            self.recorder.start(**self._new_info(model, args, state, options))
        else:
            step = int(state.global_step)
            run.truncate_events(step)
            run.truncate_layers(step)
            run.remove_checkpoints_after(step)
            self.recorder.resumed(step)
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        """Rewrite run.json's heartbeat when it is due. Called from the Trainer's own steps
        (training and evaluation) rather than from a thread: a Trainer that raised stops
        beating at once, even when its process (a notebook) lives on."""
        if self.is_main and time.monotonic() - self.last_beat >= self.info.interval:
            self.info.update()
            self.last_beat = time.monotonic()

    def _new_info(self, model: nn.Module, args, state, options: dict) -> dict:
        """The fields of the first run.json (``spider.recorder.run_info``'s)."""
        base = model.base_model.model if _is_peft(model) else model
        source = str(getattr(base, "name_or_path", "") or "")
        reference = (model_reference(source, self.run.path)
                     if source and (Path(source) / "config.json").is_file() else {})
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        world = int(getattr(args, "world_size", 1) or 1)
        config = {
            "method": self.method.name,
            "options": _json_safe(dict(options)),
            "model": source,
            "steps": int(state.max_steps),
            "lr": float(args.learning_rate),
            "batch_size": int(args.per_device_train_batch_size),
            "grad_accum": int(args.gradient_accumulation_steps),
            "warmup_steps": _json_safe(args.warmup_steps),
            "lr_scheduler": _json_safe(args.lr_scheduler_type),
            "weight_decay": float(args.weight_decay),
            "clip": float(args.max_grad_norm or 0.0),
            "log_every": int(state.logging_steps or 1),
            "save_every": int(state.save_steps or 0),
            "eval_every": int(state.eval_steps or 0),
            "seed": int(args.seed),
            "bf16": bool(args.bf16),
            "save_dtype": "float32",
            "save_tensors": "",
            "output_dir": str(self.run.path),
            "trainer_output_dir": str(args.output_dir),
        }
        return {
            "config": config,
            "options": _json_safe(dict(vars(self.method.options))),
            "model": {**reference, "given": source} if reference else None,
            "seed": int(args.seed),
            "device": str(args.device),
            "parallel": {"mode": self.parallel, "world_size": world},
            "trainable": {"total": {"trainable": trainable, "frozen": total - trainable}},
            "trainer": "transformers.Trainer",
            "steps": int(state.max_steps),
            "step": int(state.global_step),
        }

    # -- events
    def log(self, step: int, logs: dict[str, float]) -> None:
        if not self.is_main:
            return
        events: list[TrainEvent | EvalEvent] = []
        if "loss" in logs:
            last_step, last_time = self.last_log
            now = time.perf_counter()
            seconds = (now - last_time) / max(1, step - last_step)
            self.last_log = (step, now)
            events.append(TrainEvent(step, float(logs["loss"]),
                                     _number(logs.get("learning_rate")),
                                     _number(logs.get("grad_norm")), seconds))
            self.info.update_progress(step=step, loss=float(logs["loss"]),
                                      it_per_s=1.0 / seconds if seconds > 0 else None)
        if not (self.resumed_at and step <= self.resumed_at):
            events += eval_events(step, logs)
        self.run.append_events(events)

    # -- statistics
    @torch.no_grad()
    def statistics(self, step: int) -> None:
        """``layers.jsonl`` rows of ``step``: the method's statistics (from the update itself
        when it collected them, else one pass now) and the update norms."""
        if not self.measures or step in self.recorder.logged_steps:
            return
        method = self.method
        stats = (method.statistics() if method.collect_statistics
                 else method.compute_statistics())
        self.recorder.write_statistics(step, stats)

    # -- checkpoints
    def checkpoint(self, step: int, finalized: bool) -> None:
        if not self.measures:
            return
        if self.parallel == "fsdp":  # whole tensors, gathered one at a time
            weights = {k: v.float() for k, v in
                       _whole(self.method.effective_weights(), self.is_main).items()}
            state = _whole(self.method.analysis_state(), self.is_main)
        else:
            weights = {k: v.detach().float() for k, v in self.method.effective_weights().items()}
            state = {k: v.detach() for k, v in self.method.analysis_state().items()}
        if not self.is_main:
            return
        self.run.write_analysis_checkpoint(
            step, weights, state, finalized=finalized,
            method_meta=self.method.state_dict()["meta"])
        self.info.update_progress(saved_step=step)

    def finish(self, step: int) -> None:
        """After ``finalize``: the last statistics and checkpoint, status ``done``."""
        self.method.collect_statistics = False
        self.statistics(step)
        self.checkpoint(step, finalized=True)
        if self.is_main:
            self.recorder.done(step)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def eval_events(step: int, logs: dict[str, Any]) -> list[EvalEvent]:
    """The Trainer's evaluation metrics as eval events.

    The Trainer names them ``eval_METRIC`` for one evaluation dataset (split ``eval``) and
    ``eval_NAME_METRIC`` for a dict of them (split ``NAME``); every evaluation reports a
    ``loss``, whose keys tell the split names. Speed metrics are left out. Name the datasets
    ``upstream`` and ``downstream`` and return a ``score`` in [0, 1] from ``compute_metrics``
    to get the run's summary (U, D, H, E, F, O).
    """
    keys = [k for k in logs if k.startswith("eval_") and _number(logs[k]) is not None]
    splits = sorted({k[len("eval_"):-len("_loss")] for k in keys
                     if k.endswith("_loss") and k != "eval_loss"}, key=len, reverse=True)
    events = []
    for key in keys:
        rest = key[len("eval_"):]
        split = next((s for s in splits if rest.startswith(s + "_")), None)
        metric = rest[len(split) + 1:] if split else rest
        if metric in _SPEED_METRICS:
            continue
        events.append(EvalEvent(step, split or "eval", metric, float(logs[key])))
    return events


_summary = run_summary  # the one summary of a run's evaluation events (spider.recorder)


__all__ = ["LORA_HELP", "METHOD_STATE_FILE", "SUPPORTED_SETUPS", "SpiderCallback",
           "SpiderTrainer", "eval_events", "parallel_mode", "unwrap_model", "with_loss_penalty"]
