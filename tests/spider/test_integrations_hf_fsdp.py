"""``SpiderCallback`` under the Trainer's parallel set-ups beyond DDP: FSDP2 runs (the ranks
of whole tensors from all-reduced shard sums), FSDP1 and DeepSpeed are refused in one line.

FSDP2 on CPU. transformers 5.23 hands ``TrainingArguments(fsdp=True, fsdp_config={"version":
2})`` to accelerate as an FSDP plugin, but accelerate 1.15's ``AcceleratorState`` switches to
``DistributedType.FSDP`` only in its branch for accelerator devices (CUDA, XPU, NPU, ...); on
CPU (``MULTI_CPU``, gloo) it drops the plugin and the Trainer silently trains with DDP (the
parameters stay whole: checked below). The worker therefore sets accelerate's state to FSDP
with the plugin the Trainer built (:func:`_accelerate_fsdp_on_cpu`, three assignments) before
``train()``; everything after that is the Trainer's and accelerate's own FSDP2 path
(``Accelerator._prepare_fsdp2``: ``fully_shard`` of every decoder and encoder layer and the
root, DTensor parameters, sharded AdamW state, clipping over shards).

In lockstep (``lockstep.py``), as the DDP test of ``test_integrations_hf.py``: one process
with two micro-batches of 2 records its state before every step; two gloo processes with
batch 2 each load that state into their shards at the start of each step and save the whole
tensors their step made; each step is checked against the plain loop's gradient on the
global batch and SPIDER's rule replayed on whole tensors (``check_spider_step``). A mask
taken from a shard's own statistics fails that replay (tried: with the reducer removed,
every tensor's step is flagged). The same run also writes a run directory (statistics
reduced over the shards, gathered checkpoints) and a Trainer checkpoint at step 2 from which
a second FSDP2 run resumes to the same steps 3 and 4, bit for bit.

Run as a script under torchrun (``python -m torch.distributed.run --nproc_per_node 2 THIS
OUT``), the file is the worker of the FSDP2 test.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_integrations_hf import (  # noqa: F401  (base: the shared fixture)
    STEPS,
    _base,
    assert_steps_like_the_plain_loop,
    base,
    run_trainer,
    trainer_args,
)

ROOT = Path(__file__).resolve().parents[2]
# FSDP2 units: the tiny LLaVA's decoder and vision-encoder layers (its _no_split_modules
# name CLIPTextEmbeddings, which it lacks, so accelerate's default policy fails)
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer",
                                                                "CLIPEncoderLayer"]}


# ------------------------------------------------------------------------------ refusals
def _fake_state():
    return SimpleNamespace(global_step=0, max_steps=4, logging_steps=1, save_steps=0,
                           eval_steps=0, is_world_process_zero=True)


def _fake_args(**fields):
    return SimpleNamespace(**{"deepspeed": None, "hf_deepspeed_config": None, "world_size": 1,
                              **fields})


@pytest.mark.parametrize("args, named", [
    (_fake_args(deepspeed={"zero_optimization": {"stage": 2}}), "DeepSpeed ZeRO-2"),
    (_fake_args(hf_deepspeed_config=SimpleNamespace(
        config={"zero_optimization": {"stage": 3}})), "DeepSpeed ZeRO-3"),
    (_fake_args(deepspeed="ds_config.json"), "DeepSpeed is"),
])
def test_deepspeed_in_the_arguments_is_refused_at_train_begin_in_one_line(args, named):
    """deepspeed is not installed here: the arguments the Trainer would carry are faked."""
    from spider.integrations.hf import SUPPORTED_SETUPS, SpiderCallback

    callback = SpiderCallback("spider")
    with pytest.raises(ValueError) as caught:
        callback.on_train_begin(args, _fake_state(), None, model=torch.nn.Linear(4, 4))
    message = str(caught.value)
    assert "\n" not in message and named in message and message.endswith(SUPPORTED_SETUPS)
    assert callback.method is None  # refused before anything was built


def test_deepspeed_set_by_a_launcher_in_accelerates_state_is_refused(monkeypatch):
    """``accelerate launch`` with a DeepSpeed config sets the process-wide state, not the
    arguments; the callback reads it there too."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from spider.integrations.hf import SpiderCallback

    monkeypatch.setitem(PartialState._shared_state, "distributed_type",
                        DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match=r"^SpiderCallback: DeepSpeed is not supported .*"
                                         r"supported: one process, DDP, or FSDP2"):
        SpiderCallback("spider").on_train_begin(_fake_args(), _fake_state(), None,
                                                model=torch.nn.Linear(4, 4))
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.NO)
    callback = SpiderCallback("spider")
    callback.on_train_begin(_fake_args(), _fake_state(), None, model=torch.nn.Linear(4, 4))
    assert callback.parallel == "none" and set(callback.method.params) == {"weight", "bias"}


def test_fsdp_asked_for_but_not_turned_on_is_said_in_one_warning():
    """On CPU accelerate leaves FSDP off and the Trainer trains unsharded: the callback says
    so, and records what really runs."""
    from spider.integrations.hf import SpiderCallback

    callback = SpiderCallback("spider")
    with pytest.warns(UserWarning, match=r"ask for FSDP .* not sharded; training runs as none"):
        callback.on_train_begin(_fake_args(fsdp=["full_shard"]), _fake_state(), None,
                                model=torch.nn.Linear(4, 4))
    assert callback.parallel == "none"


def test_fsdp1_is_refused_at_train_begin_in_one_line():
    """torch 2.13's FSDP1 cannot be built without an accelerator device, so the model is an
    instance of its class made without its ``__init__`` (the callback looks only at the
    class of the model's modules)."""
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel

    from spider.integrations.hf import SUPPORTED_SETUPS, SpiderCallback

    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped._modules["_fsdp_wrapped_module"] = nn.Linear(4, 4)  # where FSDP1 keeps it
    model = nn.Sequential(wrapped)
    callback = SpiderCallback("spider")
    with pytest.raises(ValueError) as caught:
        callback.on_train_begin(_fake_args(world_size=2), _fake_state(), None, model=model)
    assert str(caught.value) == ("SpiderCallback: FSDP1 (fsdp_config version 1) is not "
                                 "supported (its flat parameters hide the tensors the method "
                                 f"ranks); {SUPPORTED_SETUPS}")
    assert callback.method is None


# ------------------------------------------------------------------------------ FSDP2
def _torchrun(out: Path, *extra: str) -> None:
    """This file's worker on 2 gloo processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, str(out), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert done.returncode == 0, done.stderr[-3000:]


def _accelerate_fsdp_on_cpu(trainer) -> None:
    """Turn on the FSDP2 path accelerate 1.15 keeps for accelerator devices (module
    docstring): its state gets ``DistributedType.FSDP`` and the plugin the Trainer's
    arguments describe, as ``AcceleratorState.__init__`` does on CUDA."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    assert state.distributed_type == DistributedType.MULTI_CPU  # what it is without this
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = PartialState._shared_state["distributed_type"] = \
        DistributedType.FSDP
    trainer.is_fsdp_enabled = True


@pytest.mark.slow
def test_fsdp2_trainer_takes_the_step_of_one_process_with_masks_of_whole_tensors(
        base, tmp_path):  # noqa: F811
    from lockstep import rank_shift

    import analysis

    trainer, callback, collator, recorder = run_trainer(
        base, tmp_path / "one", "spider", record_steps=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2)
    out = tmp_path / "fsdp"
    out.mkdir()
    torch.save([{"weights": b["weights"], "sums": b["sums"],
                 "adam": {n: (a.exp_avg, a.exp_avg_sq, a.step) for n, a in b["adam"].items()}}
                for b in recorder.before], out / "states.pt")
    _torchrun(out)
    facts = json.loads((out / "facts.json").read_text())

    # the Trainer really sharded the trained tensors, and the method reduced over the shards
    assert facts["without_the_shim"] == {"distributed_type": "MULTI_CPU", "sharded": False}
    assert facts["parallel"] == "fsdp" and facts["reducer"]
    assert facts["sharded"] == facts["trained"] > 0
    assert 0 < facts["local_entries"] < facts["entries"]  # each process held a part

    # in lockstep: each FSDP2 step from the 1-process state, against the plain loop's step on
    # the same global batch and SPIDER's rule replayed on the whole tensors
    from safetensors.torch import load_file

    steps = [load_file(str(out / f"after-{k}.safetensors")) for k in range(STEPS)]
    other = copy.copy(recorder)
    other.after = [{"weights": {n: t for n, t in d.items() if not n.startswith("S/")},
                    "sums": {n[2:]: t for n, t in d.items() if n.startswith("S/")}}
                   for d in steps]
    assert_steps_like_the_plain_loop(base, other, collator.batches, grad_accum=2)

    # the run directory: written by process 0 from statistics reduced over the shards and
    # whole tensors gathered from them
    run = analysis.load_run(out / "run")
    assert run.status == "done" and run.steps == [2, STEPS]
    assert run.info["parallel"] == {"mode": "fsdp", "world_size": 2}
    theta0 = {n: t.detach() for n, t in base[0].named_parameters() if t.requires_grad}
    last = steps[-1]
    final = run.layers[run.layers["step"] == STEPS].set_index("param")
    assert set(final.index) == set(theta0)
    ties = 0
    for name, start in theta0.items():
        weight = run.tensor(STEPS, name, "weight")
        assert torch.equal(weight, last[name])  # the gathered tensor, whole and unchanged
        assert int(final.loc[name, "numel"]) == start.numel()
        assert final.loc[name, "theta0_norm"] == pytest.approx(float(start.double().norm()),
                                                               rel=1e-6)
        assert final.loc[name, "update_norm"] == pytest.approx(
            float((weight.double() - start.double()).norm()), rel=1e-5, abs=1e-9)
        # the density the method reported from ranks of sums reduced over the shards, against
        # the mask rebuilt on the whole tensor in one process: the sums were added in another
        # order, so only entries within that rounding of the tie I = G may take the other side
        mask = run.tensor(STEPS, name, "mask")
        pre, ft = (run.tensor(STEPS, name, kind) for kind in ("importance_pre", "importance_ft"))
        at_tie = int(((ft - pre).abs() <= rank_shift(last[f"S/{name}"]) + rank_shift(start)
                      ).sum())
        differ = abs(final.loc[name, "mask_density"] - float((mask > 0).double().mean()))
        assert differ * start.numel() <= at_tie + 0.5, name
        ties += at_tie
    assert ties <= 1e-3 * facts["entries"]  # the allowance is not a blank cheque

    # the method's state in the Trainer's checkpoint-2: whole tensors gathered from the shards
    from safetensors import safe_open

    from spider.integrations.hf import METHOD_STATE_FILE

    with safe_open(str(out / "trainer" / "checkpoint-2" / METHOD_STATE_FILE), "pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    assert len(saved) == 4 * len(theta0)
    for name, start in theta0.items():
        assert torch.equal(saved[f"trained/{name}"], steps[1][name])
        assert torch.equal(saved[f"grad_sum/{name}"], steps[1][f"S/{name}"])
        assert torch.equal(saved[f"theta0/{name}"], start)
        assert torch.equal(saved[f"start_weights/{name}"], start)

    # resumed under FSDP2 from checkpoint-2 (the Trainer's sharded model and optimizer, the
    # callback's whole tensors cut into this process's shards): steps 3 and 4, and the run
    # directory, exactly as never stopped (same processes, same order of every sum)
    again = tmp_path / "fsdp-resumed"
    shutil.copytree(out / "run", again / "run")
    shutil.copytree(out / "trainer" / "checkpoint-2", again / "trainer" / "checkpoint-2")
    shutil.copy(out / "states.pt", again / "states.pt")
    _torchrun(again, "resume")
    for k in (2, 3):
        after = load_file(str(again / f"after-{k}.safetensors"))
        assert sorted(after) == sorted(steps[k])
        assert all(torch.equal(after[n], steps[k][n]) for n in after), k
    resumed = analysis.load_run(again / "run")
    assert resumed.status == "done" and resumed.steps == [2, STEPS]
    columns = [c for c in run.layers.columns if c != "run"]
    assert resumed.layers[columns].sort_values(["step", "param"]).reset_index(drop=True).equals(
        run.layers[columns].sort_values(["step", "param"]).reset_index(drop=True))

    # on the sharded model, a method that cannot handle shards is refused
    assert facts["refused_l2"] == ("SpiderCallback: method 'l2' does not support parameters "
                                   "sharded by FSDP2; use full or spider, or train with DDP "
                                   "or one process")


def _fsdp_worker(out: Path, resume: bool = False) -> None:
    """One torchrun process: a Trainer with FSDP2 (batch 2 per process), each step from the
    1-process run's state (``states.pt``) loaded into this process's shards; rank 0 saves
    each step's whole weights and S, and ``facts.json``. ``resume``: resume from the Trainer
    checkpoint in ``OUT/trainer``."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    from spider.data.collate import TrainCollator
    from spider.distributed import full, is_sharded, local, shard_of
    from spider.integrations.hf import SpiderCallback

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, processor, data = _base()
    model.train()
    callback = SpiderCallback("spider", run_dir=out / "run")
    states = torch.load(out / "states.pt")
    facts: dict = {}

    class Lockstep(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            given = states[state.global_step]
            inner = getattr(optimizer, "optimizer", optimizer)
            method = callback.method
            with torch.no_grad():
                for name, p in method.params.items():
                    local(p).copy_(shard_of(given["weights"][name], p))
                    method.grad_sum[name].copy_(shard_of(given["sums"][name], p))
                    exp_avg, exp_avg_sq, step = given["adam"][name]
                    if exp_avg is not None:
                        st = inner.state[p]
                        local(st["exp_avg"]).copy_(shard_of(exp_avg, p))
                        local(st["exp_avg_sq"]).copy_(shard_of(exp_avg_sq, p))
                        st["step"].fill_(step)

        def on_step_end(self, args, state, control, **kwargs):
            method = callback.method  # gathering is collective: every process takes part
            whole = {n: full(p.detach()).contiguous() for n, p in method.params.items()}
            sums = {f"S/{n}": full(t).contiguous()
                    for n, t in method.analysis_state().items()}
            if state.is_world_process_zero:
                save_file({**whole, **{k.replace("grad_sum/", ""): v for k, v in sums.items()}},
                          str(out / f"after-{state.global_step - 1}.safetensors"))

    args = trainer_args(out / "trainer", ddp_backend="gloo", per_device_train_batch_size=2,
                        logging_steps=STEPS, save_strategy="steps", save_steps=2,
                        fsdp=True, fsdp_config=dict(FSDP_CONFIG))
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=TrainCollator(processor), callbacks=[callback, Lockstep()])
    facts["without_the_shim"] = {
        "distributed_type": trainer.accelerator.state.distributed_type.value,
        "sharded": any(is_sharded(p) for p in model.parameters())}
    _accelerate_fsdp_on_cpu(trainer)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if resume:
        return

    method = callback.method
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    facts.update(parallel=callback.parallel, reducer=method.reducer is not None,
                 trained=len(trained), sharded=sum(is_sharded(p) for p in trained),
                 entries=sum(p.numel() for p in trained),
                 local_entries=sum(local(p).numel() for p in trained))
    for name in ("l2",):  # a method without shard support, on the sharded model
        try:
            SpiderCallback(name).on_train_begin(args, trainer.state, None, model=trainer.model)
        except ValueError as err:
            facts[f"refused_{name}"] = str(err)
    if dist.get_rank() == 0:
        (out / "facts.json").write_text(json.dumps(facts))
    dist.barrier()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    _fsdp_worker(target, resume=sys.argv[2:] == ["resume"])
