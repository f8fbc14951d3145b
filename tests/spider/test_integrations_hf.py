"""``spider.integrations.hf.SpiderCallback``: a stock Hugging Face Trainer trains like the
methods' plain loop (ARCHITECTURE.md, "Methods"), resumes exactly, and writes a run
directory that ``analysis`` reads.

Every comparison is made IN LOCKSTEP: a recorder keeps the state going into every Trainer
step (weights, method state, AdamW's moments, the learning rate) and what came out; the plain
PyTorch loop takes that same state and the very micro-batches the Trainer drew (a recording
collator) through one step, and the two steps are compared with derived bounds
(``lockstep.py``). Two separately run trajectories are never compared across the two
implementations: they drift apart (SPIDER's tie at I = G; AdamW turning rounding noise in
near-zero gradients into full steps) by an amount that depends on the CPU's kernels.
Bit-equality is checked only where it is promised: resuming in the same process.

Run as a script under torchrun (``python -m torch.distributed.run --nproc_per_node 2 THIS
OUT``), the file is the worker of the DDP test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lockstep import EPS, Adam, assert_steps_agree, check_spider_step

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "sample_checkpoints" / "tiny-llava-base"
STEPS, BATCH, LR, SIZE = 4, 4, 1e-3, 64


# ------------------------------------------------------------------------------ set-up
def _base():
    from spider.data import load_dataset
    from spider.models import load_model, select_trainable

    model, processor = load_model(MODEL)
    select_trainable(model, ("llm", "projector"))
    return model, processor, load_dataset("builtin:counting", "train", seed=0, size=SIZE)


@pytest.fixture(scope="module")
def base():
    """One thread unless OMP_NUM_THREADS asks for more (tiny matrices: one is as fast, and
    immune to a busy machine); the checks hold for any number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    yield _base()
    torch.set_num_threads(threads)


class RecordingCollator:
    """The project's collator, keeping a copy of every batch it makes (in the order the
    Trainer takes them; it reads one batch ahead, so there may be one more)."""

    def __init__(self, processor):
        from spider.data.collate import TrainCollator

        self.collate = TrainCollator(processor)
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def trainer_args(out: Path, **changes):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(out), use_cpu=True, max_steps=STEPS,
                    per_device_train_batch_size=BATCH, learning_rate=LR, warmup_steps=1,
                    lr_scheduler_type="cosine", max_grad_norm=1.0, weight_decay=0.0,
                    logging_steps=2, save_strategy="no", report_to=[], seed=0,
                    remove_unused_columns=False, disable_tqdm=True,
                    dataloader_pin_memory=False)
    settings.update(changes)
    return TrainingArguments(**settings)


def fresh_model(base):
    model = copy.deepcopy(base[0])
    model.train()
    return model


class LockstepRecorder:
    """Made by :func:`lockstep_recorder`: around every optimizer step of a Trainer with
    SpiderCallback, the state going in (weights, S, AdamW's moments and the step's learning
    rate; ``.before``) and coming out (weights and S; ``.after``)."""


def lockstep_recorder(spider_callback):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback, LockstepRecorder):
        def __init__(self):
            self.before: list[dict] = []
            self.after: list[dict] = []

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            method = spider_callback.method
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            group = inner.param_groups[0]
            adam = {}
            for name, p in method.params.items():  # for LoRA: the adapters
                st = inner.state.get(p, {})
                adam[name] = Adam(
                    lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    exp_avg=st["exp_avg"].clone() if st else None,
                    exp_avg_sq=st["exp_avg_sq"].clone() if st else None,
                    step=float(st["step"]) if st else 0.0)
            state = method.state_dict()
            self.before.append({"adam": adam, "state": {
                "meta": copy.deepcopy(state["meta"]),
                "tensors": {k: v.clone() for k, v in state["tensors"].items()}},
                **_weights_and_sums(method)})

        def on_step_end(self, args, state, control, **kwargs):
            method = spider_callback.method
            state_now = method.state_dict()
            self.after.append({"state": {
                "meta": copy.deepcopy(state_now["meta"]),
                "tensors": {k: v.clone() for k, v in state_now["tensors"].items()}},
                **_weights_and_sums(method)})

    return Recorder()


def _weights_and_sums(method) -> dict:
    return {"weights": {n: p.detach().clone() for n, p in method.params.items()},
            "sums": {n: s.clone() for n, s in getattr(method, "grad_sum", {}).items()}}


def step_gradients(method, micro, bf16=False):
    """Forward and backward over one step's micro-batches and clipping, as the plain loop
    does; leaves the clipped gradients in ``.grad``."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    for batch, n in zip(micro, tokens):
        with autocast():
            outputs = method.model(**batch)
            loss = outputs.loss
            extra = getattr(method, "output_penalty", lambda *a: None)(batch, outputs)  # LwF
            if extra is not None:
                loss = loss + extra
        loss = loss * n / sum(tokens) if len(micro) > 1 else loss
        penalty = method.loss_penalty()
        if penalty is not None:
            loss = loss + penalty / len(micro)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(list(method.trainable_parameters()), 1.0)


def assert_steps_like_the_plain_loop(base, recorder, batches, grad_accum=1, bf16=False):
    """Lockstep (``lockstep.py``): every recorded Trainer step against the plain loop's
    gradient from the same weights on the same micro-batches, and the SPIDER rule replayed on
    the Trainer's own gradient. Returns the reports (one per tensor and step)."""
    from spider.methods import build_method

    method = build_method("spider", fresh_model(base))
    method.model.train()
    theta0 = method.theta0
    assert len(recorder.before) == len(recorder.after) == STEPS
    micro_batches = [batches[k * grad_accum:(k + 1) * grad_accum] for k in range(STEPS)]
    # the longest chain of sums behind one gradient entry that the two sides may associate
    # differently: over the step's token positions (a weight's gradient), plus the widest
    # matrix dimension (the backward pass through a layer sums over it)
    positions = max(sum(b["input_ids"].numel() for b in micro) for micro in micro_batches)
    terms = positions + max(max(t.shape) for t in theta0.values())
    # bf16 autocast: the forward and backward round each layer's output to bfloat16 (2**-8),
    # on the order of 3 roundings per layer (attention, MLP, norm) plus the head
    layers = method.model.config.text_config.num_hidden_layers
    unit, terms = (2.0 ** -8, 3 * layers + 2) if bf16 else (EPS, terms)
    reports = []
    for k, (before, after) in enumerate(zip(recorder.before, recorder.after)):
        with torch.no_grad():
            for name, p in method.params.items():
                p.copy_(before["weights"][name])
                p.grad = None
        step_gradients(method, micro_batches[k], bf16)
        for name, p in method.params.items():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            reports.append(check_spider_step(
                name, theta0[name], before["weights"][name], before["sums"][name],
                before["adam"][name], before["sums"][name] + grad, after["sums"][name],
                after["weights"][name], terms, unit=unit))
    assert_steps_agree(reports)
    return reports


def assert_method_steps_like_the_plain_loop(base, name, trained, recorder, batches,
                                            grad_accum=1):
    """Lockstep for a method without SPIDER's tie: at every recorded Trainer step, the plain
    loop's step (the method's hooks around torch's AdamW) from the same weights, method state
    and AdamW state, on the same micro-batches.

    The two gradients may differ by the rounding of a re-associated sum (``terms`` roundings of
    the tensor's largest entry, as in ``lockstep.check_spider_step``), and AdamW may amplify
    that near g = 0 (``adamw_spread``, up to ``lr``); the weights must agree to that plus
    their own rounding (the optimizer's 4, the hooks' 3). Post-hoc methods then act in
    ``finalize``, checked on the Trainer's own last state.
    """
    from lockstep import adamw_spread

    from spider.methods import build_method

    torch.manual_seed(0)  # LoRA draws its A matrices (then replaced by the recorded state)
    method = build_method(name, fresh_model(base))
    method.model.train()
    micro_batches = [batches[k * grad_accum:(k + 1) * grad_accum] for k in range(STEPS)]
    positions = max(sum(b["input_ids"].numel() for b in micro) for micro in micro_batches)
    widest = max(max(p.shape) for p in base[0].parameters())
    terms = positions + widest
    assert len(recorder.before) == len(recorder.after) == STEPS
    for k, (before, after) in enumerate(zip(recorder.before, recorder.after)):
        with torch.no_grad():
            for n, p in method.params.items():
                p.copy_(before["weights"][n])
        method.load_state_dict(before["state"])
        params = dict(method.params)
        adam = before["adam"][next(iter(params))]
        optimizer = torch.optim.AdamW(list(params.values()), lr=adam.lr, betas=adam.betas,
                                      eps=adam.eps, weight_decay=adam.weight_decay)
        for n, p in params.items():
            a = before["adam"][n]
            if a.exp_avg is not None:
                optimizer.state[p] = {"step": torch.tensor(a.step), "exp_avg": a.exp_avg.clone(),
                                      "exp_avg_sq": a.exp_avg_sq.clone()}
        optimizer.zero_grad(set_to_none=True)
        step_gradients(method, micro_batches[k])
        method.before_optimizer_step()
        grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in params.items()}
        optimizer.step()
        method.after_optimizer_step()
        for n, p in params.items():
            g = grads[n]
            delta = EPS * terms * float(g.abs().max()) * torch.ones_like(g)
            bound = adamw_spread(before["weights"][n], g, delta, before["adam"][n]) \
                + 3 * EPS * p.detach().abs() + 4 * EPS * (p.detach() - before["weights"][n]).abs()
            got = after["weights"][n]
            excess = (got - p.detach()).abs() - bound
            assert not bool((excess > 0).any()), (
                f"{name} step {k + 1} {n}: differs by {float((got - p.detach()).abs().max()):.3e}"
                f" beyond the bound")
    # the end: the post-hoc methods' finalize on the Trainer's own last state
    if name != "lora":
        with torch.no_grad():
            for n, p in method.params.items():
                p.copy_(recorder.after[-1]["weights"][n])
        method.load_state_dict(recorder.after[-1]["state"])
        method.finalize()
        got, want = trained.effective_weights(), method.effective_weights()
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[n], want[n]) for n in want)  # same code, same state


def run_trainer(base, out: Path, method="spider", trainer_class=None, record_steps=False,
                run_dir=None, **changes):
    """A stock Trainer with SpiderCallback(method); returns (trainer, callback, collator,
    lockstep recorder)."""
    from transformers import Trainer

    from spider.integrations.hf import SpiderCallback

    model = method.model if not isinstance(method, str) else fresh_model(base)
    collator = RecordingCollator(base[1])
    callback = SpiderCallback(method, run_dir=run_dir)
    callbacks = [callback]
    recorder = lockstep_recorder(callback) if record_steps else None
    if recorder is not None:
        callbacks.append(recorder)
    trainer = (trainer_class or Trainer)(
        model=model, args=trainer_args(out, **changes), train_dataset=base[2],
        data_collator=collator, callbacks=callbacks)
    trainer.train()
    return trainer, callback, collator, recorder


def _available():
    from spider.methods import available_methods

    return available_methods()


# ------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("name", _available())
def test_a_stock_trainer_with_the_callback_trains_like_the_plain_loop(name, base, tmp_path):
    """Every registered method can run this way: those with a loss penalty (l2) through
    SpiderTrainer, LoRA built before the Trainer (PEFT wraps the model first)."""
    from spider.integrations.hf import SpiderTrainer
    from spider.methods import build_method

    method = name
    if name == "lora":
        torch.manual_seed(0)
        method = build_method("lora", fresh_model(base))
    trainer, callback, collator, recorder = run_trainer(
        base, tmp_path, method, trainer_class=SpiderTrainer, record_steps=True)
    trained = callback.method
    assert trained.steps_done == STEPS
    start = {n: t.detach() for n, t in base[0].named_parameters() if t.requires_grad}
    moved = max(float((w - start[n]).abs().max()) for n, w in trained.effective_weights().items()
                if n in start)
    assert moved > 1e-4  # it trained
    # in lockstep: separately run trajectories drift apart (SPIDER's tie, AdamW near g = 0)
    if name == "spider":
        assert_steps_like_the_plain_loop(base, recorder, collator.batches)
    else:
        assert_method_steps_like_the_plain_loop(base, name, trained, recorder, collator.batches)


@pytest.mark.parametrize("name", ["spider", "l2"])
def test_gradient_accumulation_trains_like_the_plain_loop(name, base, tmp_path):
    """Two micro-batches per step: the hooks run once per optimizer step, after the last one;
    L2's penalty enters each step once."""
    from spider.integrations.hf import SpiderTrainer

    trainer, callback, collator, recorder = run_trainer(
        base, tmp_path, name, trainer_class=SpiderTrainer, record_steps=True,
        per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert callback.method.steps_done == STEPS
    if name == "spider":
        assert_steps_like_the_plain_loop(base, recorder, collator.batches, grad_accum=2)
    else:
        assert_method_steps_like_the_plain_loop(base, name, callback.method, recorder,
                                                collator.batches, grad_accum=2)


def test_bf16_mixed_precision_trains_like_the_plain_loop_in_autocast(base, tmp_path):
    """TrainingArguments(bf16=True) on CPU: the forward runs in bf16 autocast, parameters and
    SPIDER's state stay float32; weights held at theta0 stay there exactly."""
    trainer, callback, collator, recorder = run_trainer(base, tmp_path, "spider",
                                                        record_steps=True, bf16=True)
    method = callback.method
    assert all(p.dtype == torch.float32 for p in method.params.values())
    assert all(s.dtype == torch.float32 for s in method.grad_sum.values())
    # lockstep; the replay there also checks that entries with w = 0 are theta0 exactly
    assert_steps_like_the_plain_loop(base, recorder, collator.batches, bf16=True)


# ------------------------------------------------------------------------------ errors
def test_a_penalty_method_in_a_stock_trainer_says_what_to_use(base, tmp_path):
    with pytest.raises(RuntimeError, match="SpiderTrainer"):
        run_trainer(base, tmp_path, "l2", max_steps=1)


def test_lora_on_an_unwrapped_model_says_peft_wraps_it_first(base, tmp_path):
    with pytest.raises(ValueError, match="PEFT must wrap it before the Trainer is built"):
        run_trainer(base, tmp_path, "lora", max_steps=1)


def test_another_method_on_a_peft_model_is_refused(base, tmp_path):
    import peft
    from transformers import Trainer

    from spider.integrations.hf import SpiderCallback

    model = peft.get_peft_model(fresh_model(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1),
                      train_dataset=base[2], data_collator=RecordingCollator(base[1]),
                      callbacks=[SpiderCallback("spider")])
    with pytest.raises(ValueError, match=r"wrapped by PEFT.*SpiderCallback\('lora'\)"):
        trainer.train()


def test_unknown_method_or_option_fails_when_the_callback_is_made():
    from spider.integrations.hf import SpiderCallback

    with pytest.raises(ValueError, match="unknown method 'spyder'"):
        SpiderCallback("spyder")
    with pytest.raises(ValueError, match="unknown option 'mask_mode'"):
        SpiderCallback("spider", mask_mode="binary")


def test_eval_metric_names_become_splits():
    from spider.integrations.hf import eval_events

    events = eval_events(6, {"eval_upstream_loss": 1.5, "eval_upstream_score": 0.9,
                             "eval_downstream_loss": 2.0, "eval_downstream_runtime": 0.1,
                             "eval_loss": 3.0, "epoch": 1.0})
    got = sorted((e.split, e.metric, e.value) for e in events)
    assert got == [("downstream", "loss", 2.0), ("eval", "loss", 3.0),
                   ("upstream", "loss", 1.5), ("upstream", "score", 0.9)]
    assert all(e.step == 6 for e in events)


def test_upstream_and_downstream_scores_give_the_run_summary():
    import dataclasses

    from spider.integrations.hf import _summary, eval_events

    events = [dataclasses.asdict(e) for step, (u, d) in ((0, (0.9, 0.1)), (2, (0.8, 0.5)))
              for e in eval_events(step, {"eval_upstream_loss": 1.0, "eval_upstream_score": u,
                                          "eval_downstream_loss": 2.0,
                                          "eval_downstream_score": d})]
    summary = _summary(events)
    assert summary["U"] == 0.8 and summary["D"] == 0.5
    assert summary["E"] == pytest.approx(0.4) and summary["F"] == pytest.approx(-0.1)
    assert summary["H"] == pytest.approx(2 * 0.8 * 0.5 / 1.3)
    assert _summary(events[len(events) // 2:]) is None  # no step-0 scores: no baseline


# ------------------------------------------------------------------------------ run directory
class Crash(Exception):
    pass


def _crash_at(step: int):
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"killed at step {step}")

    return CrashAt()


def _eval_sets():
    from spider.data import load_dataset

    return {"upstream": load_dataset("builtin:upstream", "test", seed=0, size=8),
            "downstream": load_dataset("builtin:counting", "test", seed=0, size=8)}


def _run_with_dir(base, out: Path, run_dir: Path, crash_at: int | None = None,
                  resume: bool = False):
    from transformers import Trainer

    from spider.data.collate import TrainCollator
    from spider.integrations.hf import SpiderCallback

    callback = SpiderCallback("spider", run_dir=run_dir)
    callbacks = [callback] + ([_crash_at(crash_at)] if crash_at else [])
    trainer = Trainer(
        model=fresh_model(base), data_collator=TrainCollator(base[1]), callbacks=callbacks,
        args=trainer_args(out, save_strategy="steps", save_steps=2, eval_strategy="steps",
                          eval_steps=2, eval_on_start=True, prediction_loss_only=True,
                          per_device_eval_batch_size=8),
        train_dataset=base[2], eval_dataset=_eval_sets())
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, callback


def test_run_directory_loads_with_analysis_and_resume_equals_never_stopping(base, tmp_path):
    import analysis
    from spider.integrations.hf import METHOD_STATE_FILE

    # never stopping
    _, whole = _run_with_dir(base, tmp_path / "a", tmp_path / "run-a")
    # killed after step 3 (its last save: step 2), then resumed from the Trainer checkpoint
    with pytest.raises(Crash):
        _run_with_dir(base, tmp_path / "b", tmp_path / "run-b", crash_at=3)
    assert (tmp_path / "b" / "checkpoint-2" / METHOD_STATE_FILE).is_file()
    _, resumed = _run_with_dir(base, tmp_path / "b", tmp_path / "run-b", resume=True)

    # the same weights and method state, bit for bit: one process, same threads, same order
    for name, param in whole.method.params.items():
        assert torch.equal(param, resumed.method.params[name]), name
    state_a, state_b = whole.method.state_dict(), resumed.method.state_dict()
    assert state_a["meta"] == state_b["meta"]
    for key, tensor in state_a["tensors"].items():
        assert torch.equal(tensor, state_b["tensors"][key]), key

    run = analysis.load_run(tmp_path / "run-a")
    assert run.status == "done" and run.method == "spider" and run.config["steps"] == STEPS
    assert run.steps == [2, 4]
    scores = run.metrics
    assert set(scores["split"]) == {"upstream", "downstream"}
    assert sorted(set(scores["step"])) == [0, 2, 4] and set(scores["metric"]) == {"loss"}
    assert list(run.train["step"]) == [2, 4]
    layers = run.layers
    assert sorted(set(layers["step"])) == [2, 4]
    assert set(layers["param"]) == set(whole.method.params)
    assert set(layers["component"]) == {"llm", "projector"}
    final = layers[layers["step"] == 4].set_index("param")
    # by the plain formulas, as the analysis rebuilds them (the fused CPU passes that
    # trained agree with them to float rounding: tests/spider/methods/test_spider.py)
    whole.method.fused = False
    masks = whole.method.masks()
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    assert final.loc[name, "mask_density"] == pytest.approx(float((masks[name] > 0).float().mean()))
    assert torch.equal(run.tensor(4, name, "mask"), masks[name])
    assert torch.equal(run.tensor(4, name, "weight"), whole.method.params[name].detach())
    theta0 = dict(base[0].named_parameters())[name].detach()
    torch.testing.assert_close(run.tensor(4, name, "delta"),
                               whole.method.params[name].detach() - theta0, rtol=0, atol=1e-7)
    listed = analysis.list_runs(tmp_path).set_index("name")
    assert listed.loc["run-a", "ok"] and listed.loc["run-a", "status"] == "done"
    assert listed.loc["run-a", "method"] == "spider" and listed.loc["run-a", "steps"] == STEPS

    # the resumed run directory says what the uninterrupted one says (timings aside)
    other = analysis.load_run(tmp_path / "run-b")
    assert other.status == "done" and other.steps == [2, 4]
    columns = [c for c in layers.columns if c not in ("run",)]
    a = layers[columns].sort_values(["step", "param"]).reset_index(drop=True)
    b = other.layers[columns].sort_values(["step", "param"]).reset_index(drop=True)
    assert a.equals(b)
    assert list(other.train["loss"]) == list(run.train["loss"])
    assert list(other.metrics.sort_values(["step", "split"])["value"]) == \
        list(scores.sort_values(["step", "split"])["value"])


def test_lora_made_by_peft_before_the_trainer_is_taken_as_is(base, tmp_path):
    """SpiderCallback('lora') on a model PEFT wrapped (as TRL's peft_config does): the
    adapters are trained, the model stays a PeftModel, the run directory holds merged
    weights under the base model's names."""
    import peft

    import analysis

    model = peft.get_peft_model(fresh_model(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    from transformers import Trainer

    from spider.integrations.hf import SpiderCallback

    callback = SpiderCallback("lora", run_dir=tmp_path / "run")
    trainer = Trainer(model=model, args=trainer_args(tmp_path / "out", max_steps=2),
                      train_dataset=base[2], data_collator=RecordingCollator(base[1]),
                      callbacks=[callback])
    trainer.train()
    assert isinstance(trainer.model, peft.PeftModel)
    run = analysis.load_run(tmp_path / "run")
    assert run.method == "lora" and run.steps == [2]
    names = run.params(2)
    assert names and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in names)
    name = names[0]
    saved = run.tensor(2, name, "weight")
    merged = dict(model.merge_and_unload().named_parameters())[name].detach()
    torch.testing.assert_close(saved, merged, rtol=0, atol=1e-7)
    assert float((saved - dict(base[0].named_parameters())[name].detach()).abs().max()) > 0


# ------------------------------------------------------------------------------ TRL
def test_trl_sft_trainer_with_the_callback_trains_like_the_plain_loop(base, tmp_path):
    """TRL's SFTTrainer (a Trainer subclass) on conversations with images, its own collator:
    the same hooks at the same points, and the run directory."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (optional: pip install trl)")
    from datasets import Dataset

    import analysis
    from spider.integrations.hf import SpiderCallback

    def conversation(example):
        turn = example.turns[0]
        return {"images": [example.image], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text",
                                         "text": turn.human.replace("<image>", "").strip()}]},
            {"role": "assistant", "content": [{"type": "text", "text": turn.gpt}]}]}

    train = Dataset.from_list([conversation(base[2][i]) for i in range(16)])
    callback = SpiderCallback("spider", run_dir=tmp_path / "run")
    recorder = lockstep_recorder(callback)
    settings = trainer_args(tmp_path / "out").to_dict()
    settings.update(activation_checkpointing=False, max_length=None)
    trainer = trl.SFTTrainer(model=fresh_model(base), args=trl.SFTConfig(**settings),
                             train_dataset=train, processing_class=base[1],
                             callbacks=[callback, recorder])
    batches = []
    collate = trainer.data_collator

    def recording(examples):
        batch = collate(examples)
        batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return batch

    trainer.data_collator = recording
    trainer.train()
    assert callback.method.steps_done == STEPS
    # In lockstep, step by step: the gradient TRL's own loss path (its collator's batch, its
    # compute_loss) gives against the plain loop's model(**batch).loss on the same batch and
    # weights, to the rounding of a re-associated sum; and the step the callback took on
    # it is SPIDER's rule after the optimizer step (lockstep.check_spider_step).
    assert_steps_like_the_plain_loop(base, recorder, batches)
    run = analysis.load_run(tmp_path / "run")
    assert run.status == "done" and run.steps == [STEPS]
    assert sorted(set(run.layers["step"])) == [2, 4]


# ------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_under_torchrun_takes_the_steps_of_one_process_with_the_same_global_batch(
        base, tmp_path):
    """2 gloo CPU processes with batch b take the step of 1 process with 2 micro-batches of b:
    rank r takes batch 2k + r of the sampler's order, and the Trainer normalises the loss by
    the tokens of the global batch.

    In lockstep: the 1-process run records its state before every step; the 2 processes load
    that state at the start of each step (weights, S, AdamW's moments) and save what their
    step made; every step is compared as ``lockstep.check_spider_step`` says."""
    trainer, callback, collator, recorder = run_trainer(
        base, tmp_path / "one", "spider", record_steps=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2)
    out = tmp_path / "ddp"
    out.mkdir()
    torch.save([{"weights": b["weights"], "sums": b["sums"],
                 "adam": {n: (a.exp_avg, a.exp_avg_sq, a.step) for n, a in b["adam"].items()}}
                for b in recorder.before], out / "states.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    ddp = [load_file(str(out / f"after-{k}.safetensors")) for k in range(STEPS)]
    other = copy.copy(recorder)
    other.after = [{"weights": {n: t for n, t in d.items() if not n.startswith("S/")},
                    "sums": {n[2:]: t for n, t in d.items() if n.startswith("S/")}}
                   for d in ddp]
    # the 2-process side took each step from the 1-process state: the plain loop's gradient
    # on the global batch is the reference, the replay checks the DDP side's own step
    assert_steps_like_the_plain_loop(base, other, collator.batches, grad_accum=2)
    info = json.loads((out / "run" / "run.json").read_text())
    assert info["parallel"] == {"mode": "ddp", "world_size": 2} and info["status"] == "done"


def _ddp_worker(out: Path) -> None:
    """One torchrun process: 2 x batch 2 per step, each step from the 1-process run's state
    (``states.pt``); rank 0 saves each step's weights and S."""
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    from spider.integrations.hf import SpiderCallback

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, processor, data = _base()
    model.train()
    callback = SpiderCallback("spider", run_dir=out / "run")
    states = torch.load(out / "states.pt")

    class Lockstep(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            given = states[state.global_step]
            inner = getattr(optimizer, "optimizer", optimizer)
            with torch.no_grad():
                for name, p in callback.method.params.items():
                    p.copy_(given["weights"][name])
                    callback.method.grad_sum[name].copy_(given["sums"][name])
                    exp_avg, exp_avg_sq, step = given["adam"][name]
                    if exp_avg is not None:
                        st = inner.state[p]
                        st["exp_avg"].copy_(exp_avg)
                        st["exp_avg_sq"].copy_(exp_avg_sq)
                        st["step"].fill_(step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                method = callback.method
                save_file({**{n: p.detach().contiguous() for n, p in method.params.items()},
                           **{f"S/{n}": t.contiguous() for n, t in method.grad_sum.items()}},
                          str(out / f"after-{state.global_step - 1}.safetensors"))

    from spider.data.collate import TrainCollator

    trainer = Trainer(model=model, args=trainer_args(out / "trainer", ddp_backend="gloo",
                                                      per_device_train_batch_size=2),
                      train_dataset=data, data_collator=TrainCollator(processor),
                      callbacks=[callback, Lockstep()])
    trainer.train()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    _ddp_worker(target)
