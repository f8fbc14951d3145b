"""Fine-tune with a method, evaluating as it goes, into a run directory (``python -m spider.train``).

    python -m spider.train --model DIR --data SPEC --method NAME --output-dir RUN [flags]

What happens, in order:

1. The config is assembled: defaults <- ``--config FILE.json`` <- flags given. ``--resume``
   takes the config stored in ``RUN/run.json``; a flag that contradicts it is an error.
2. The model is loaded (any local image-text-to-text directory, or a run checkpoint), the
   parts named by ``--train`` are unfrozen, and the method wraps the model.
3. Step 0 is evaluated (the base model's upstream, downstream and 2x2 cell scores), then the
   project's one loop (``spider.loop.train_loop``) trains; every ``--log-every`` steps the
   method's per-tensor statistics go to ``layers.jsonl``, every ``--eval-every`` steps an
   evaluation goes to ``metrics.jsonl``, every ``--save-every`` steps a checkpoint is written.
4. At the end the method finalizes (DARE, WiSE-FT, Tailor act here; LoRA merges), the
   fine-tuned model is evaluated and checkpointed, and ``run.json`` gets the summary
   (U, D, H, E, F, O) and status ``done``.

SIGTERM saves and ends with status ``cancelled``; an error ends with status ``failed`` and its
reason; a run killed outright continues with ``--resume`` exactly as if never interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spider.distributed import (
    Dist,
    gather_full,
    is_sharded,
    local,
    setup,
    shard_of,
    sum_across,
    wrap_model,
)
from spider.errors import UserError, cli_main
from spider.importance import sum_of_squares
from spider.loop import BatchSampler, LoopConfig, LoopHooks, make_optimizer, train_loop
from spider.rundir import WEIGHTS_GROUP, RunDir, model_reference

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "sample_checkpoints" / "tiny-llava-base")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class RunConfig:
    """Everything that determines a run (stored whole in run.json)."""

    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={
        "help": "local model directory or run checkpoint (default: the bundled tiny LLaVA)"})
    data: str = dataclasses.field(default="builtin:counting", metadata={
        "help": "downstream data: builtin:NAME or a LLaVA-style JSON file"})
    eval_data: str = dataclasses.field(default="", metadata={
        "help": "downstream evaluation data (default: the test split of --data)"})
    upstream: str = dataclasses.field(default="builtin:upstream", metadata={
        "help": "upstream (pre-training) data, evaluated for forgetting and mixed in by "
                "--hybrid-ratio"})
    method: str = dataclasses.field(default="spider", metadata={
        "help": "fine-tuning method (see README, 'The methods library')"})
    options: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "method option NAME=VALUE (repeatable)"})
    output_dir: str = dataclasses.field(default="", metadata={"help": "the run directory"})
    steps: int = dataclasses.field(default=150, metadata={"help": "optimizer steps"})
    lr: float = dataclasses.field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "examples per micro-batch"})
    grad_accum: int = dataclasses.field(default=1, metadata={
        "help": "micro-batches per optimizer step"})
    warmup_steps: int = dataclasses.field(default=10, metadata={
        "help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    clip: float = dataclasses.field(default=1.0, metadata={
        "help": "max gradient norm (0: no clipping)"})
    train: str = dataclasses.field(default="llm,projector", metadata={
        "help": "parts that train: comma-separated llm, projector, vision"})
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
    seed: int = dataclasses.field(default=0, metadata={"help": "seed for data, order and method"})


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


# ------------------------------------------------------------------------------- the run
class Runner(LoopHooks):
    """Owns one run: its directory, model, method, data and the hooks the loop calls."""

    def __init__(self, cfg: RunConfig, dist: Dist | None = None,
                 device: torch.device | None = None):
        from spider.data import cells as builtin_cells
        from spider.data import load_dataset
        from spider.data.collate import TrainCollator
        from spider.methods import build_method, method_class
        from spider.models import load_model, resolve_device, select_trainable

        self.cfg = cfg
        self.run = RunDir(cfg.output_dir)
        self.dist = dist or Dist()
        self.device = device or resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model, self.processor = load_model(
            cfg.model, device=str(self.device), dtype=None if cfg.dtype == "auto" else cfg.dtype)
        parts = [p.strip() for p in cfg.train.split(",") if p.strip()]
        self.trainable = select_trainable(self.model, parts, cfg.train_last_layers or None)
        if self.dist.mode == "fsdp":
            try:
                shardable = method_class(cfg.method).shardable
            except ValueError as err:
                raise UserError(str(err)) from None
            if not shardable:
                raise UserError(f"--parallel fsdp: method '{cfg.method}' does not support "
                                "sharded parameters; use spider or full, or --parallel ddp")
            # the method must see the sharded parameters: shard first, then build it
            self.model = wrap_model(self.model, self.dist, self.device)
        try:
            self.method = build_method(cfg.method, self.model, **cfg.options)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.model = self.method.model  # LoRA wraps the model
        # what the loop trains: the DDP wrapper, or the model itself (FSDP2 shards in place)
        self.train_model = (wrap_model(self.model, self.dist, self.device)
                            if self.dist.mode == "ddp" else self.model)
        # theta0 of every trained tensor, for update norms (effective weights: LoRA merged).
        self.theta0 = {n: t.detach().clone() for n, t in self.method.effective_weights().items()}

        self.train_data = load_dataset(cfg.data, "train", seed=cfg.seed,
                                       size=cfg.train_size or None)
        self.upstream_train = (load_dataset(cfg.upstream, "train", seed=cfg.seed)
                               if cfg.hybrid_ratio > 0 else None)
        self.eval_sets = {
            "upstream": load_dataset(cfg.upstream, "test", seed=cfg.seed),
            "downstream": load_dataset(cfg.eval_data or cfg.data, "test", seed=cfg.seed),
        }
        if cfg.data.startswith("builtin:") and not cfg.eval_data:
            for cell in builtin_cells(cfg.data.split(":")[1]):
                if cell != "idimg-idq":  # that cell is the downstream test split itself
                    self.eval_sets[cell] = load_dataset(f"{cfg.data.split(':')[0]}:"
                                                        f"{cfg.data.split(':')[1]}:{cell}",
                                                        "test", seed=cfg.seed)
        self.collate = TrainCollator(self.processor)
        self.sampler = BatchSampler(len(self.train_data), cfg.batch_size, cfg.grad_accum,
                                    cfg.seed, len(self.upstream_train or []), cfg.hybrid_ratio,
                                    rank=self.dist.rank, world=self.dist.world)
        self.loop_cfg = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                   batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                   clip=cfg.clip, weight_decay=cfg.weight_decay, seed=cfg.seed)
        self.optimizer = make_optimizer(list(self.method.trainable_parameters()), self.loop_cfg)
        self.save_pattern = re.compile(cfg.save_tensors) if cfg.save_tensors else None
        self.stop_requested = False
        self.started = time.perf_counter()
        self.start_step = 0
        self.pending: list[dict] = []
        self.info: dict[str, Any] = {}
        self._fsdp_ready = False

    # -- data
    def get_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        main, mixed = self.sampler.indices(step, micro)
        examples = [self.train_data[i] for i in main]
        examples += [self.upstream_train[i] for i in mixed] if mixed else []
        return {k: v.to(self.device) for k, v in self.collate(examples).items()}

    # -- run.json
    def write_info(self, **changes: Any) -> None:
        self.info.update(changes, updated=time.time())
        if self.dist.is_main:  # process 0 alone writes the run directory
            self.run.write_run(self.info)

    def begin(self) -> None:
        import peft
        import transformers

        from spider.models import resolve_model_path

        self.info = {
            "config": dataclasses.asdict(self.cfg),
            "method": self.cfg.method,
            "options": dataclasses.asdict(self.method.options),
            "model": {**model_reference(resolve_model_path(self.cfg.model), self.run.path),
                      "given": self.cfg.model},
            "seed": self.cfg.seed,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "python": platform.python_version()},
            "device": str(self.device),
            "parallel": {"mode": self.dist.mode, "world_size": self.dist.world},
            "trainable": self.trainable,
            "status": "running", "pid": os.getpid(), "created": time.time(),
            "progress": {"step": 0, "steps": self.cfg.steps},
        }
        self.write_info()

    # -- evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        from spider.evaluate import evaluate

        if not self.dist.sees_whole_model:
            # DDP: process 0 evaluates its full copy of the model while the others wait;
            # FSDP2: every process takes part in every forward pass, on the same examples.
            self.dist.barrier()
            return {}
        self.model.eval()
        if self.dist.mode == "fsdp":
            # generate() reaches submodules without the root's forward, whose hook would
            # gather the root's own parameters (embeddings, norms, head): gather them here.
            if not self._fsdp_ready:
                # FSDP2 sets its hooks up on the root's first forward: one without gradients
                with torch.no_grad():
                    self.model(**self.get_batch(0, 0))
                self._fsdp_ready = True
            self.model.unshard()
        scores, events = {}, []
        try:
            for split, data in self.eval_sets.items():
                result = evaluate(self.model, self.processor, data, batch_size=64,
                                  limit=self.cfg.eval_limit)
                scores[split] = result["score"]
                events.append({"event": "eval", "step": step, "split": split,
                               "metric": "score", "value": result["score"], "n": result["n"]})
                for task, entry in result["tasks"].items():
                    events.append({"event": "eval", "step": step, "split": split,
                                   "metric": f"task:{task}", "value": entry["score"]})
        finally:
            self.model.train()
            if self.dist.mode == "fsdp":
                self.model.reshard()
        if self.dist.is_main:
            self.run.append_events(events)
            line = "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
            print(f"eval step {step}: {line}", file=sys.stderr)
        if self.dist.mode == "ddp":
            self.dist.barrier()
        return scores

    # -- statistics
    @torch.no_grad()
    def layer_rows(self, step: int) -> list[dict]:
        stats = self.method.statistics()
        weights = self.method.effective_weights()
        # squared norms of theta0 and of the update, per tensor (of this process's shards,
        # summed over processes under FSDP2 in one all-reduce)
        squares = torch.tensor([
            [float(sum_of_squares(local(self.theta0[name]).float().reshape(-1))),
             float(sum_of_squares((local(weight).float() - local(self.theta0[name])).reshape(-1)))]
            for name, weight in weights.items()], dtype=torch.float64).reshape(-1, 2)
        if self.dist.mode == "fsdp":
            squares = sum_across(squares.to(self.device)).cpu()
        rows = []
        for (name, weight), (base_sq, update_sq) in zip(weights.items(), squares.tolist()):
            base_norm, update = base_sq ** 0.5, update_sq ** 0.5
            row = {"step": step, "param": name, "numel": weight.numel()}
            row.update(stats.get(name, {}))
            row.update(update_norm=update, update_rel_norm=update / base_norm if base_norm else
                       float("nan"), theta0_norm=base_norm)
            rows.append(row)
        return rows

    # -- checkpoints
    def _cast(self, tensors: dict[str, torch.Tensor], key_name=lambda k: k) -> dict:
        """Tensors cast to ``--save-dtype`` and filtered by ``--save-tensors``; ``key_name``
        gives the parameter a key belongs to (None for a method's own flags, always kept)."""
        dtype = SAVE_DTYPES[self.cfg.save_dtype]
        return {k: t.detach().to(dtype) if t.is_floating_point() else t.detach()
                for k, t in tensors.items()
                if self.save_pattern is None or key_name(k) is None
                or self.save_pattern.search(key_name(k))}

    def save(self, step: int) -> None:
        """An analysis checkpoint of ``step`` and, replacing the last one, the resume state.

        Both hold whole tensors; under FSDP2 they are gathered one at a time (every process
        takes part) and process 0 writes them.
        """
        if not self.dist.sees_whole_model:
            return  # DDP: every process holds the same state; process 0 writes it
        state = self.method.state_dict()
        analysis = {
            WEIGHTS_GROUP: self._cast(gather_full(self.method.effective_weights(),
                                                  to_cpu=self.dist.mode == "fsdp")),
            "method": self._cast(gather_full(self.method.analysis_state(),
                                             to_cpu=self.dist.mode == "fsdp"),
                                 lambda k: k.split("/", 1)[1] if "/" in k else None),
        }
        if self.dist.is_main:
            self.run.write_checkpoint(step, analysis, {
                "method": state["meta"], "save_dtype": self.cfg.save_dtype,
                "save_tensors": self.cfg.save_tensors})
        del analysis
        optimizer = self.optimizer.state_dict()
        opt_tensors, opt_meta = {}, {}
        for index, entry in optimizer["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    opt_tensors[f"{index}/{key}"] = value
                else:
                    opt_meta[f"{index}/{key}"] = value
        weights = ({n: p.detach() for n, p in self.method.params.items()}
                   if self.method.restores_weights else {})
        groups = {"weights": weights, "method": state["tensors"], "optimizer": opt_tensors}
        if self.dist.mode == "fsdp":
            groups = {g: gather_full(tensors) for g, tensors in groups.items()}
        if self.dist.is_main:
            self.run.write_resume(step, groups, {
                "method": state["meta"], "optimizer_groups": optimizer["param_groups"],
                "optimizer_scalars": opt_meta})

    def restore(self) -> int:
        """Load the resume state; drop every event, statistic and checkpoint after it."""
        found = self.run.read_resume()
        if found is None:
            return 0
        meta, groups = found
        step = int(meta["step"])
        with torch.no_grad():
            for name, tensor in groups.get("weights", {}).items():
                if name not in self.method.params:
                    raise UserError(f"{self.run.resume_dir}: tensor {name} is not a trained "
                                    "parameter of this run's model")
                param = self.method.params[name]
                local(param).copy_(shard_of(tensor, param))
        try:
            self.method.load_state_dict({"meta": meta["method"],
                                         "tensors": groups.get("method", {})})
        except ValueError as err:
            raise UserError(f"{self.run.resume_dir} does not match this run: {err}") from None
        state: dict[int, dict[str, Any]] = {}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for key, tensor in groups.get("optimizer", {}).items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = _like_param(tensor.to(self.device),
                                                                 params[int(index)])
        for key, value in meta.get("optimizer_scalars", {}).items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": meta["optimizer_groups"]})
        if self.dist.is_main:
            self.run.truncate_events(step)
            self.run.truncate_layers(step)
            self.run.remove_checkpoints_after(step)
        self.dist.barrier()
        return step

    # -- loop hooks
    def after_step(self, step: int, record: dict) -> None:
        cfg = self.cfg
        self.pending.append({"event": "train", **record})
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        if log_now:
            if self.dist.sees_whole_model:
                rows = self.layer_rows(step)
            if self.dist.is_main:
                self.run.append_events(self.pending)
                self.run.append_layers(rows)
            self.pending = []
            done = step - self.start_step
            elapsed = time.perf_counter() - self.started
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = (cfg.steps - step) / rate if rate > 0 else None
            eta_text = f"{eta:.0f}s" if eta is not None else "?"
            if self.dist.is_main:
                print(f"step {step}/{cfg.steps}  loss {record['loss']:.4f}  "
                      f"lr {record['lr']:.2e}  {rate:.2f} it/s  ETA {eta_text}", file=sys.stderr)
            self.write_info(progress={"step": step, "steps": cfg.steps, "loss": record["loss"],
                                      "it_per_s": rate, "eta_s": eta})
        # Statistics come out of the update itself on the steps that are logged.
        self.method.collect_statistics = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        if step < cfg.steps and step % cfg.eval_every == 0:
            self.evaluate(step)
        if step < cfg.steps and step % cfg.save_every == 0:
            self.save(step)

    def should_stop(self) -> bool:
        # all processes stop at the same step, whichever of them got the signal
        return self.dist.any(self.stop_requested)

    # -- the whole run
    def execute(self, resume: bool) -> dict:
        if resume:
            made = self.run.read_run().get("parallel", {}).get("world_size", 1)
            if made != self.dist.world:
                raise UserError(f"--resume: the run in {self.run.path} was made with {made} "
                                f"process(es), not {self.dist.world}; resume it with as many "
                                "(the global batch depends on it)")
        self.start_step = self.restore() if resume else 0
        if resume:
            self.info = self.run.read_run()
            self.write_info(status="running", pid=os.getpid(), resumed_at_step=self.start_step)
        else:
            self.begin()
        self.dist.barrier()  # nobody trains before process 0 has set the run directory up
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.start_step == 0:
                self.evaluate(0)
            self.started = time.perf_counter()
            self.method.collect_statistics = (self.start_step + 1) % self.cfg.log_every == 0
            self.model.train()
            step = train_loop(self.train_model, self.method, self.optimizer, self.get_batch,
                              self.loop_cfg, self, start_step=self.start_step,
                              device=self.device, dist=self.dist)
            if self.pending and self.dist.is_main:
                self.run.append_events(self.pending)
            self.pending = []
            if step < self.cfg.steps:  # stopped by SIGTERM
                self.save(step)
                self.write_info(status="cancelled", ended=time.time(),
                                progress={**self.info.get("progress", {}), "step": step})
                return self.info
            self.method.finalize()
            self.model = self.method.model
            final = self.evaluate(self.cfg.steps)
            self.save(self.cfg.steps)
            if self.dist.is_main:
                self.write_info(status="done", ended=time.time(), summary=self.summary(final))
                self.run.remove_resume()  # a finished run is never resumed: free the space
            self.dist.barrier()
            return self.info
        except BaseException as err:
            if self.pending and self.dist.is_main:
                self.run.append_events(self.pending)
            reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            status = "cancelled" if isinstance(err, KeyboardInterrupt) else "failed"
            self.write_info(status=status, ended=time.time(), error=reason)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True  # the loop ends after this step; then save + "cancelled"

    def summary(self, final: dict[str, float]) -> dict[str, float]:
        from spider.metrics import summary

        base = {e["split"]: e["value"] for e in self.run.read_events()
                if e.get("event") == "eval" and e["step"] == 0 and e["metric"] == "score"}
        return summary(base["upstream"], base["downstream"], final["upstream"],
                       final["downstream"])


def _like_param(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """An optimizer state tensor read whole from disk, laid out like its parameter's state
    (sharded like the parameter under FSDP2; scalars such as ``step`` stay as they are)."""
    if is_sharded(param) and tensor.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return tensor


# ------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spider.train", description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS)
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"]
        if field.name == "options":
            parser.add_argument("--option", dest="options", action="append", metavar="NAME=VALUE",
                                help=help_text)
        elif field.type in ("int", int):
            parser.add_argument(flag, type=int, help=help_text)
        elif field.type in ("float", float):
            parser.add_argument(flag, type=float, help=help_text)
        else:
            parser.add_argument(flag, help=help_text)
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
    return cfg, resume


@cli_main
def main(argv: list[str] | None = None) -> dict:
    from spider.models import resolve_device

    cfg, resume = build_config(argv)
    run = RunDir(cfg.output_dir)
    dist, device = setup(cfg.parallel, resolve_device(cfg.device))
    try:
        # every process checks before any of them writes, so all agree
        if not resume and run.path.exists() and any(run.path.iterdir()):
            raise UserError(f"--output-dir {run.path} is not empty; pass --resume to continue "
                            "the run there, or choose another folder")
        if resume and run.read_run().get("status") == "done":
            raise UserError(f"the run in {run.path} is already done")
        dist.barrier()
        runner = Runner(cfg, dist, device)
        info = runner.execute(resume)
    finally:
        dist.shutdown()
    if dist.is_main:
        print(json.dumps({"output_dir": str(run.path), "status": info["status"],
                          **({"summary": info["summary"]} if "summary" in info else {})}))
    return info


if __name__ == "__main__":
    main()
