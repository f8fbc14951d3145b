"""Learning without Forgetting (``spider.methods.lwf``): the distillation term on answer
tokens, zero at theta0, the same teacher whether theta0 is swapped in or copied, and the
term reaching the loss in ``spider.train`` and in a Hugging Face Trainer (SpiderTrainer)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spider.methods import build_method
from spider.methods.lwf import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "sample_checkpoints" / "tiny-llava-base"


def _tiny(parts=("llm", "projector")):
    from spider.models import load_model, select_trainable

    model, processor = load_model(MODEL)
    select_trainable(model, parts)
    return model, processor


def _data(n=8):
    from spider.data import load_dataset

    return load_dataset("builtin:counting", "train", seed=0, size=n)


def _batch(processor, n=4):
    from spider.data.collate import TrainCollator

    data = _data(n)
    return TrainCollator(processor)([data[i] for i in range(n)])


def _steps(method, batch, steps=3):
    params = list(method.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        outputs = method.model(**batch)
        (outputs.loss + method.output_penalty(batch, outputs)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_penalty_is_the_kl_on_answer_tokens_and_zero_at_theta0():
    model, processor = _tiny()
    teacher = copy.deepcopy(model).eval()
    method = build_method("lwf", model, lam=0.5, temperature=3.0)
    batch = _batch(processor)
    assert float(method.output_penalty(batch, model(**batch))) == 0.0
    _steps(method, batch)

    outputs = model(**batch)
    got = method.output_penalty(batch, outputs)
    with torch.no_grad():
        z0 = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    z = outputs.logits.detach()
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    assert 0 < int(keep.sum()) < keep.numel()  # answers only, not the prompts
    p = torch.softmax(z0[:, :-1][keep] / 3.0, -1)
    q = torch.softmax(z[:, :-1][keep] / 3.0, -1)
    expected = 0.5 * 9.0 * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-7)
    assert got.requires_grad  # the term trains the student; the teacher has no graph


def test_swapped_theta0_and_frozen_copy_give_the_same_teacher():
    model, processor = _tiny(("attn",))
    batch = _batch(processor)
    swap = build_method("lwf", model)
    copied = build_method("lwf", copy.deepcopy(model), teacher="copy")
    _steps(swap, batch)
    _steps(copied, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    swap.model.train()
    a, b = swap.teacher_logits(inputs), copied.teacher_logits(inputs)
    assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())
    assert swap.model.training  # the teacher's eval mode was given back


def test_copy_teacher_is_theta0_after_a_resume():
    model, processor = _tiny(("attn",))
    batch = _batch(processor)
    first = build_method("lwf", model, teacher="copy")
    _steps(first, batch)
    state = first.state_dict()
    resumed = build_method("lwf", copy.deepcopy(model), teacher="copy")  # step-k weights
    resumed.load_state_dict(state)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(resumed.teacher_logits(inputs), first.teacher_logits(inputs))


def test_spider_train_runs_lwf(tmp_path):
    from spider.rundir import RunDir
    from spider.train import RunConfig, train

    out = tmp_path / "run"
    cfg = RunConfig(method="lwf", output_dir=str(out), steps=2, batch_size=4, train_size=8,
                    eval_every=2, eval_limit=4, log_every=1, save_every=2, device="cpu",
                    warmup_steps=0, train="mlp_gate_up")
    info = train(cfg)
    assert info["status"] == "done"
    assert RunDir(out).read_run()["trainable"]["llm"]["trainable"] > 0


def test_hugging_face_trainer_adds_the_distillation(tmp_path):
    from transformers import Trainer, TrainingArguments

    from spider.data.collate import TrainCollator
    from spider.integrations.hf import SpiderCallback, SpiderTrainer

    model, processor = _tiny()
    data = _data(8)
    seen = []
    callback = SpiderCallback("lwf", lam=4.0)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="no", report_to=[], remove_unused_columns=False,
                             disable_tqdm=True, dataloader_pin_memory=False,
                             gradient_accumulation_steps=2)
    trainer = SpiderTrainer(model=model, args=args, train_dataset=data,
                            data_collator=TrainCollator(processor), callbacks=[callback])
    trainer.train()
    method = callback.method
    original = method.output_penalty

    def spy(batch, outputs):
        seen.append("labels" in batch)
        return original(batch, outputs)

    method.output_penalty = spy
    model.train()
    batch = _batch(processor)
    loss = trainer.compute_loss(model, dict(batch))
    assert seen == [True]
    plain = model(**batch).loss
    assert float(loss) > float(plain)  # lambda * T^2 * KL > 0 after two steps away from theta0

    stock = Trainer(model=copy.deepcopy(model), args=args, train_dataset=data,
                    data_collator=TrainCollator(processor), callbacks=[SpiderCallback("lwf")])
    with pytest.raises(RuntimeError, match="SpiderTrainer"):
        stock.train()
