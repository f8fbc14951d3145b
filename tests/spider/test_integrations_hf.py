"""``spider.integrations.hf.SpiderCallback``: a stock Hugging Face Trainer trains like the
methods' plain loop (ARCHITECTURE.md, "Methods"), resumes exactly, and writes a run
directory that ``analysis`` reads.

Every comparison replays the very batches the Trainer drew (a recording collator) through a
plain PyTorch loop with the same optimizer (AdamW), learning-rate schedule and clipping.
SPIDER's mask jumps at the tie I = G, so for it the two runs are compared as
``tests/spider/ties.py`` says: entries whose mask side differs are few and each sat within
``TIE_EPS`` of the tie in the reference when it first differed; all others agree to rounding.

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
from ties import tie_flips

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "sample_checkpoints" / "tiny-llava-base"
STEPS, BATCH, LR, SIZE = 4, 4, 1e-3, 64
# rounding: AdamW fused (the Trainer's default) against foreach, and the loss normalised by
# the batch's tokens (Trainer) against a mean (plain loop), differ by float32 rounding only
RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------------------ set-up
def _base():
    from spider.data import load_dataset
    from spider.models import load_model, select_trainable

    model, processor = load_model(MODEL)
    select_trainable(model, ("llm", "projector"))
    return model, processor, load_dataset("builtin:counting", "train", seed=0, size=SIZE)


@pytest.fixture(scope="module")
def base(one_thread):
    return _base()


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


def step_recorder(spider_callback):
    """A TrainerCallback keeping SPIDER's masks and |G - I| after every optimizer step
    (``.sides``, one dict per step; ``.masks``, the masks alone)."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.sides: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

        @property
        def masks(self) -> list[dict[str, torch.Tensor]]:
            return [{n: w for n, (w, _) in sides.items()} for sides in self.sides]

        def on_step_end(self, args, state, control, **kwargs):
            self.sides.append(spider_sides(spider_callback.method))

    return StepRecorder()


def spider_sides(method) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor: the keep-weight w and |G - I|, computed by ``keep_weight`` with its
    ``importances`` callback from the reference method's theta0 and S."""
    from spider.methods.spider import keep_weight

    out = {}
    for name in method.params:
        seen = {}

        def catch(pre, ft, seen=seen):
            seen["gap"] = (ft - pre).abs()

        w, _ = keep_weight(method.theta0[name], method.grad_sum[name], method.options,
                           importances=catch)
        out[name] = (w.clone(), seen["gap"].clone())
    return out


def plain_loop(model, method, batches, grad_accum=1, bf16=False, on_step=None):
    """The methods' plain loop on ``batches`` with the Trainer's optimizer, schedule and clipping.

    The Trainer weights the micro-batches of an accumulated step by their trained tokens (the
    loss is the accumulated batch's token sum over its token count); so does this loop.
    """
    from transformers import get_scheduler

    params = list(method.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=1,
                             num_training_steps=STEPS)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    method.model.train()
    for step in range(STEPS):
        micro = batches[step * grad_accum:(step + 1) * grad_accum]
        tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
        for batch, n in zip(micro, tokens):
            with autocast():
                loss = method.model(**batch).loss
            loss = loss * n / sum(tokens) if grad_accum > 1 else loss
            penalty = method.loss_penalty()
            if penalty is not None:
                loss = loss + penalty / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(method)
    method.finalize()
    return method


def run_trainer(base, out: Path, method="spider", trainer_class=None, record_masks=False,
                run_dir=None, **changes):
    """A stock Trainer with SpiderCallback(method); returns (trainer, callback, collator,
    step recorder)."""
    from transformers import Trainer

    from spider.integrations.hf import SpiderCallback

    model = method.model if not isinstance(method, str) else fresh_model(base)
    collator = RecordingCollator(base[1])
    callback = SpiderCallback(method, run_dir=run_dir)
    callbacks = [callback]
    recorder = step_recorder(callback) if record_masks else None
    if recorder is not None:
        callbacks.append(recorder)
    trainer = (trainer_class or Trainer)(
        model=model, args=trainer_args(out, **changes), train_dataset=base[2],
        data_collator=collator, callbacks=callbacks)
    trainer.train()
    return trainer, callback, collator, recorder


def assert_spider_agrees(trained, reference, trainer_masks, reference_sides):
    """Tie-aware comparison of two SPIDER runs (see the module docstring)."""
    flipped = total = 0
    for name, ref_weight in reference.effective_weights().items():
        flips = tie_flips([sides[name][0] for sides in reference_sides],
                          [masks[name] for masks in trainer_masks],
                          [sides[name][1] for sides in reference_sides])
        assert not flips.far_from_tie, (name, flips.far_from_tie)
        agree = ~flips.ever
        weight = trained.effective_weights()[name]
        torch.testing.assert_close(weight[agree], ref_weight[agree], rtol=RTOL, atol=ATOL)
        flipped += int(flips.ever.sum())
        total += ref_weight.numel()
    assert flipped <= 1e-4 * total, f"{flipped} of {total} entries on another side of I = G"
    # the comparison is not vacuous: the mask pins some entries and frees others
    density = sum(float((w > 0).sum()) for w, _ in reference_sides[-1].values()) / total
    assert 0.2 < density < 0.8


def _reference(base, name, batches, **kw):
    from spider.methods import build_method

    model = fresh_model(base)
    torch.manual_seed(0)  # LoRA draws its A matrices
    method = build_method(name, model)
    sides = []
    on_step = (lambda m: sides.append(spider_sides(m))) if name == "spider" else None
    return plain_loop(model, method, batches, on_step=on_step, **kw), sides


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
        base, tmp_path, method, trainer_class=SpiderTrainer, record_masks=name == "spider")
    reference, sides = _reference(base, name, collator.batches[:STEPS])

    trained = callback.method
    assert trained.steps_done == STEPS == reference.steps_done
    start = {n: t.detach() for n, t in base[0].named_parameters() if t.requires_grad}
    moved = max(float((w - start[n]).abs().max()) for n, w in trained.effective_weights().items()
                if n in start)
    assert moved > 1e-4  # it trained
    if name == "spider":
        assert_spider_agrees(trained, reference, recorder.masks, sides)
        return
    got, want = trained.effective_weights(), reference.effective_weights()
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("name", ["spider", "l2"])
def test_gradient_accumulation_trains_like_the_plain_loop(name, base, tmp_path):
    """Two micro-batches per step: the hooks run once per optimizer step, after the last one;
    L2's penalty enters each step once."""
    from spider.integrations.hf import SpiderTrainer

    trainer, callback, collator, recorder = run_trainer(
        base, tmp_path, name, trainer_class=SpiderTrainer, record_masks=name == "spider",
        per_device_train_batch_size=2, gradient_accumulation_steps=2)
    reference, sides = _reference(base, name, collator.batches[:2 * STEPS], grad_accum=2)
    assert callback.method.steps_done == STEPS
    if name == "spider":
        assert_spider_agrees(callback.method, reference, recorder.masks, sides)
    else:
        for key, want in reference.effective_weights().items():
            torch.testing.assert_close(callback.method.effective_weights()[key], want,
                                       rtol=RTOL, atol=ATOL, msg=key)


def test_bf16_mixed_precision_trains_like_the_plain_loop_in_autocast(base, tmp_path):
    """TrainingArguments(bf16=True) on CPU: the forward runs in bf16 autocast, parameters and
    SPIDER's state stay float32; weights held at theta0 stay there exactly."""
    trainer, callback, collator, recorder = run_trainer(base, tmp_path, "spider",
                                                        record_masks=True, bf16=True)
    reference, sides = _reference(base, "spider", collator.batches[:STEPS], bf16=True)
    method = callback.method
    assert all(p.dtype == torch.float32 for p in method.params.values())
    assert_spider_agrees(method, reference, recorder.masks, sides)
    for name, w in recorder.masks[-1].items():
        pinned = w == 0
        assert torch.equal(method.params[name].detach()[pinned], method.theta0[name][pinned])


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
    recorder = step_recorder(callback)
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
    reference, sides = _reference(base, "spider", batches[:STEPS])
    # SFTTrainer computes the loss through its own fused head (another summation order), and
    # AdamW turns rounding noise in near-zero gradients into visible steps (g / (|g| + eps)):
    # so the weights agree to a tenth of one step's update, and S, the clipped gradients'
    # sum that SPIDER accumulates at on_optimizer_step, to rounding.
    method = callback.method
    assert method.steps_done == STEPS
    for name, grad_sum in reference.grad_sum.items():
        assert float((method.grad_sum[name] - grad_sum).norm()) <= 1e-5 * float(grad_sum.norm())
        flips = tie_flips([s[name][0] for s in sides], [m[name] for m in recorder.masks],
                          [s[name][1] for s in sides])
        assert not flips.far_from_tie, (name, flips.far_from_tie)
        agree = ~flips.ever
        torch.testing.assert_close(method.params[name].detach()[agree],
                                   reference.params[name].detach()[agree], rtol=0, atol=LR / 10)
        pinned = recorder.masks[-1][name] == 0  # SPIDER holds these at theta0 exactly
        assert torch.equal(method.params[name].detach()[pinned], method.theta0[name][pinned])
    run = analysis.load_run(tmp_path / "run")
    assert run.status == "done" and run.steps == [STEPS]
    assert sorted(set(run.layers["step"])) == [2, 4]


# ------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_under_torchrun_trains_like_one_process_with_the_same_global_batch(base, tmp_path):
    """2 gloo CPU processes with batch b equal 1 process with 2 micro-batches of b: rank r takes
    batch 2k + r of the sampler's order, and the Trainer normalises the loss by the tokens
    of the global batch."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    ddp = load_file(str(out / "weights.safetensors"))
    masks = [load_file(str(out / f"masks-{k}.safetensors")) for k in range(STEPS)]
    trainer, callback, collator, recorder = run_trainer(
        base, tmp_path / "one", "spider", record_masks=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2)
    flipped = 0
    for name, weight in callback.method.params.items():
        flips = tie_flips([s[name][0] for s in recorder.sides], [m[name] for m in masks],
                          [s[name][1] for s in recorder.sides])
        assert not flips.far_from_tie, (name, flips.far_from_tie)
        agree = ~flips.ever
        torch.testing.assert_close(ddp[name][agree], weight.detach()[agree], rtol=RTOL,
                                   atol=ATOL)
        flipped += int(flips.ever.sum())
    assert flipped <= 1e-4 * sum(w.numel() for w in callback.method.params.values())
    info = json.loads((out / "run" / "run.json").read_text())
    assert info["parallel"] == {"mode": "ddp", "world_size": 2} and info["status"] == "done"


def _ddp_worker(out: Path) -> None:
    """One torchrun process: 2 x batch 2 per step; rank 0 saves weights and per-step masks."""
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    from spider.integrations.hf import SpiderCallback

    torch.set_num_threads(1)
    model, processor, data = _base()
    model.train()
    callback = SpiderCallback("spider", run_dir=out / "run")

    class SaveMasks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                save_file({n: w.contiguous() for n, w in callback.method.masks().items()},
                          str(out / f"masks-{state.global_step - 1}.safetensors"))

    from spider.data.collate import TrainCollator

    trainer = Trainer(model=model, args=trainer_args(out / "trainer", ddp_backend="gloo",
                                                      per_device_train_batch_size=2),
                      train_dataset=data, data_collator=TrainCollator(processor),
                      callbacks=[callback, SaveMasks()])
    trainer.train()
    if trainer.args.process_index == 0:
        save_file({n: p.detach().contiguous() for n, p in callback.method.params.items()},
                  str(out / "weights.safetensors"))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    _ddp_worker(target)
