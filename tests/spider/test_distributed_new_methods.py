"""Dowser, LwF and component-selective training (``--train attn``) under DDP (torchrun, gloo
on CPU): 2 processes with 1 micro-batch each take the step that 1 process with 2
micro-batches takes (the same global batch).

Compared IN LOCKSTEP (``test_distributed.py``'s rule): both sides take the first step from
theta0 and that one step is compared, never two separately run trajectories. AdamW's first
step is ``lr * g / (|g| + eps)`` (plus decoupled decay), so each weight may differ by how far
that step moves when the gradient moves by its rounding bound (``lockstep.adamw_spread``),
the gradient bound being float32 eps x the reduction length (token positions of the global
batch plus the widest matrix dimension), plus the weight's own rounding. What is promised
exactly is checked exactly: Dowser's mask is the same on every process, and its frozen
entries are bit-equal to theta0 on both sides, weight decay (0.1 here) included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lockstep import EPS, Adam, adamw_spread
from safetensors.torch import load_file

from spider.train import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--eval-every", "1", "--save-every", "1", "--log-every", "1", "--eval-limit", "4",
          "--batch-size", "4", "--train-size", "16", "--device", "cpu", "--weight-decay", "0.1"]
GLOBAL_EXAMPLES = 8  # 2 micro-batches (or processes) of --batch-size 4
DOWSER = ["--option", "samples=4", "--option", "text_len=12", "--option", "probes=2"]
CASES = {
    "dowser": ["--method", "dowser", *DOWSER],
    "lwf": ["--method", "lwf", "--train", "mlp_gate_up"],
    "attn": ["--method", "full", "--train", "attn", "--train-last-layers", "2"],
}


def _env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "SPIDERSCOPE_CACHE": str(tmp / "cache")}


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _group(run: Path, group: str, states: Path | None = None) -> dict[str, torch.Tensor]:
    # the reference runs 2 steps, so that step 1 leaves a resume state (AdamW's moments);
    # the warm-up's rate of step 1 does not depend on --steps
    folder = states / "step-000001" if states else run / "checkpoints" / "step-000001"
    return load_file(folder / f"{group}.safetensors")


def _theta0(parts: str, last: int) -> dict[str, torch.Tensor]:
    from spider.models import load_model, select_trainable

    model = load_model(DEFAULT_MODEL)[0]
    select_trainable(model, parts.split(","), last or None)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _terms(theta0: dict[str, torch.Tensor]) -> int:
    from spider.data import load_dataset
    from spider.data.collate import TrainCollator
    from spider.models import load_model

    processor = load_model(DEFAULT_MODEL)[1]
    data = load_dataset("builtin:counting", "train", seed=0, size=16)
    length = TrainCollator(processor)([data[i] for i in range(16)])["input_ids"].shape[1]
    return GLOBAL_EXAMPLES * length + max(max(t.shape) for t in theta0.values())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_takes_the_first_step_of_one_process(case, tmp_path):
    extra = CASES[case]
    env = _env(tmp_path)
    single, ddp, states = tmp_path / "single", tmp_path / "ddp", tmp_path / "single.states"
    _ok(subprocess.run([sys.executable, str(Path(__file__).with_name("keep_states.py")),
                        str(states), *COMMON, "--steps", "2", "--grad-accum", "2", "--output-dir", str(single),
                        *extra], capture_output=True, text=True, env=env, timeout=600))
    _ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "spider.train", *COMMON, "--steps", "1",
                        "--grad-accum", "1", "--output-dir", str(ddp), *extra],
                       capture_output=True, text=True, env=env, timeout=600))
    info = json.loads((ddp / "run.json").read_text())
    assert info["parallel"] == {"mode": "ddp", "world_size": 2}
    parts = extra[extra.index("--train") + 1] if "--train" in extra else "llm,projector"
    last = int(extra[extra.index("--train-last-layers") + 1]) \
        if "--train-last-layers" in extra else 0
    theta0 = _theta0(parts, last)
    order = list(theta0)
    terms = _terms(theta0)
    events = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    lr = next(e["lr"] for e in events if e["event"] == "train")
    opt = _group(single, "optimizer", states)
    meta = json.loads((states / "step-000001" / "meta.json").read_text())
    beta1 = meta["optimizer_groups"][0]["betas"][0]
    got, want = _group(ddp, "weights"), _group(single, "weights")
    assert got.keys() == want.keys() == theta0.keys()
    adam = Adam(lr=lr, weight_decay=0.1)
    frozen = {}
    if case == "dowser":
        m_got, m_want = _group(ddp, "method"), _group(single, "method")
        frozen = {k.split("/", 1)[1]: t.bool() for k, t in m_want.items()
                  if k.startswith("frozen/")}
        assert frozen and all(torch.equal(m_got[f"frozen/{n}"].bool(), f)
                              for n, f in frozen.items())
    for i, name in enumerate(order):
        grad = opt[f"{i}/exp_avg"] / (1 - beta1)
        delta = EPS * terms * float(grad.abs().max()) * torch.ones_like(grad)
        bound = adamw_spread(theta0[name], grad, delta, adam) + 8 * EPS * want[name].abs()
        assert bool(((got[name] - want[name]).abs() <= bound).all()), name
        if name in frozen:  # bit-equal to theta0 on both sides, decay and all
            f = frozen[name]
            assert torch.equal(got[name][f], theta0[name][f]), name
            assert torch.equal(want[name][f], theta0[name][f]), name
            assert float(grad[f].abs().max()) == 0.0
    assert sum(not torch.equal(want[n], theta0[n]) for n in order) == len(order)  # it trained
