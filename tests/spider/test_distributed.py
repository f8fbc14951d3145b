"""Several processes (torchrun, gloo on CPU) train the same model as one process.

A 2-process step takes micro-batches 0 and 1 of the single-process order, so a 2-process run
with ``--grad-accum 1`` must take the step a 1-process run with ``--grad-accum 2`` takes (same
global batch), up to float rounding of the gradient average: under DDP (replicated model), and
under FSDP2 (sharded parameters, where SPIDER's per-tensor sums are all-reduced).

The two are compared IN LOCKSTEP, never as two separately run trajectories (those drift apart
once one entry at SPIDER's tie I = G takes the other side, by an amount that depends on the
CPU's kernels): the reference single-process run keeps its full state after every step
(``keep_states.py``); the 2-process side starts from the reference's state after step k
(``--resume`` from a copy of it, or a fresh start for k = 0) and takes one step; that step is
compared with the reference's step k + 1 by ``lockstep.check_spider_step`` (gradient, mask
side, update; each bound derived there). Bit-equality is checked only where it is promised:
a 2-process run stopped and resumed ends exactly where an uninterrupted 2-process run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lockstep import EPS, Adam, StepReport, assert_steps_agree, check_spider_step
from safetensors.torch import load_file

from spider.methods.spider import SpiderOptions, keep_weight
from spider.train import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# the default 10 warm-up steps outlast the run: the learning rate of step k does not depend on
# --steps, so a 2-process run of k + 1 steps takes step k + 1 with the reference's rate
COMMON = ["--eval-every", str(STEPS), "--save-every", "1", "--log-every", "1",
          "--eval-limit", "8", "--batch-size", "4", "--train-size", "64", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
GLOBAL_EXAMPLES = 8  # 2 micro-batches (or processes) of --batch-size 4


def _single(out: Path, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spider.train", *COMMON, "--steps", str(steps),
                           "--grad-accum", "2", "--output-dir", str(out), *extra],
                          capture_output=True, text=True, env=ENV, timeout=300)


def _keeping_states(out: Path, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    """The reference: one process, 2 micro-batches per step, the resume state of every step
    but the last kept in ``<out>.states/step-<k>``."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name("keep_states.py")),
                           str(_states(out)), *COMMON, "--steps", str(steps), "--grad-accum",
                           "2", "--output-dir", str(out), *extra],
                          capture_output=True, text=True, env=ENV, timeout=300)


def _states(run: Path) -> Path:
    return run.with_name(run.name + ".states")


def _torchrun_cmd(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "spider.train", *COMMON, "--steps", str(steps), "--grad-accum", "1",
            "--output-dir", str(out), *extra]


def _torchrun(out: Path, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(out, *extra, steps=steps), capture_output=True,
                          text=True, env=ENV, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _group(run: Path, step: int, group: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / f"{group}.safetensors")


def _train_events(run: Path) -> dict[int, dict]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e for e in events if e["event"] == "train"}


def _layers(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "layers.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ lockstep
def _one_step_from(reference: Path, k: int, out: Path, *extra: str) -> Path:
    """2 processes take step k + 1 from the reference's state after step k."""
    if k == 0:
        _ok(_torchrun(out, *extra, steps=1))
        return out
    # a copy of the reference cut at step k (--resume drops what came after), made by 2
    # processes with 1 micro-batch each, to end after one more step
    out.mkdir(parents=True)
    for name in ("run.json", "metrics.jsonl", "layers.jsonl"):
        shutil.copy(reference / name, out / name)
    shutil.copytree(_states(reference) / f"step-{k:06d}", out / "resume")
    info = json.loads((out / "run.json").read_text())
    parallel = extra[extra.index("--parallel") + 1] if "--parallel" in extra else "auto"
    info["config"].update(steps=k + 1, grad_accum=1, parallel=parallel, output_dir=str(out))
    info.update(status="cancelled", parallel={"mode": "fsdp" if parallel == "fsdp" else "ddp",
                                              "world_size": 2})
    (out / "run.json").write_text(json.dumps(info))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "spider.train", "--output-dir",
                           str(out), "--resume"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    _ok(proc)
    return out


def _trainable() -> tuple[dict[str, torch.Tensor], list[str]]:
    """theta0 of the trained tensors, and their names in the optimizer's order."""
    from spider.models import load_model, select_trainable

    model = load_model(DEFAULT_MODEL)[0]
    select_trainable(model, ("llm", "projector"))
    theta0 = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return theta0, list(theta0)


def _reduction_terms(theta0: dict[str, torch.Tensor]) -> int:
    """The longest chain of sums behind one gradient entry that the two sides may associate
    differently: over the global batch's token positions (weight gradients), plus the widest
    matrix dimension (the backward pass through a layer sums over it: vocabulary, MLP width)."""
    from spider.data import load_dataset
    from spider.data.collate import TrainCollator
    from spider.models import load_model

    processor = load_model(DEFAULT_MODEL)[1]
    data = load_dataset("builtin:counting", "train", seed=0, size=64)
    length = TrainCollator(processor)([data[i] for i in range(64)])["input_ids"].shape[1]
    return GLOBAL_EXAMPLES * length + max(max(t.shape) for t in theta0.values())


def _assert_lockstep(reference: Path, other: Path, k: int) -> list[StepReport]:
    """The other run's step k + 1 against the reference's (``lockstep.check_spider_step``)."""
    theta0, order = _trainable()
    terms = _reduction_terms(theta0)
    lr = _train_events(other)[k + 1]["lr"]
    assert lr == _train_events(reference)[k + 1]["lr"]
    if k == 0:
        weights = theta0
        sums = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in theta0.items()}
        adams = {n: Adam(lr=lr) for n in order}
    else:
        state = _states(reference) / f"step-{k:06d}"
        meta = json.loads((state / "meta.json").read_text())
        weights = load_file(state / "weights.safetensors")
        method = load_file(state / "method.safetensors")
        sums = {n: method[f"grad_sum/{n}"] for n in order}
        opt = load_file(state / "optimizer.safetensors")
        group = meta["optimizer_groups"][0]
        adams = {n: Adam(lr=lr, betas=tuple(group["betas"]), eps=group["eps"],
                         weight_decay=group["weight_decay"], exp_avg=opt[f"{i}/exp_avg"],
                         exp_avg_sq=opt[f"{i}/exp_avg_sq"], step=float(opt[f"{i}/step"]))
                 for i, n in enumerate(order)}
        assert all(adams[n].exp_avg.shape == theta0[n].shape for n in order)
    s_ref, s_other = _group(reference, k + 1, "method"), _group(other, k + 1, "method")
    w_other = _group(other, k + 1, "weights")
    reports = [check_spider_step(n, theta0[n], weights[n], sums[n], adams[n],
                                 s_ref[f"grad_sum/{n}"], s_other[f"grad_sum/{n}"], w_other[n],
                                 terms) for n in order]
    assert_steps_agree(reports)
    # the loss of the step: the mean over the same token losses, averaged per micro-batch then
    # over 2 micro-batches (or processes); <= terms roundings of the largest term apart
    loss_ref, loss_other = (_train_events(r)[k + 1]["loss"] for r in (reference, other))
    assert abs(loss_other - loss_ref) <= terms * EPS * abs(loss_ref)
    return reports


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single"
    _ok(_keeping_states(out, "--method", "spider"))
    return out


def test_ddp_two_processes_take_the_step_of_one_with_the_same_global_batch(reference,
                                                                           tmp_path):
    # from the last resumable step: S and AdamW's moments loaded into every process (the
    # fresh start is checked under FSDP below, and for the other methods)
    for k in (STEPS - 1,):
        out = _one_step_from(reference, k, tmp_path / f"ddp-{k}")
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "done"
        assert info["parallel"] == {"mode": "ddp", "world_size": 2}
        # only process 0 writes: one line per step, no duplicates
        assert sorted(_train_events(out)) == list(range(1, k + 2))
        reports = _assert_lockstep(reference, out, k)
        # and the step moved the weights: agreement of two steps that did nothing proves
        # nothing
        weights, before = _group(out, k + 1, "weights"), _trainable()[0]
        assert sum(not torch.equal(weights[n], before[n]) for n in before) > 10
        assert reports


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "hft", "l2"])
def test_ddp_takes_the_step_of_one_process_for_other_methods(method, tmp_path):
    """LoRA (a PEFT-wrapped model under DDP), HFT (seeded random freezing on every process)
    and L2 (a loss penalty) take the first step on 2 processes as on one.

    No tie here, but AdamW's first step is ``lr * g / (|g| + eps)``: a gradient entry within
    rounding of 0 may move by up to ``lr`` either way. The reference's gradient is read back
    from its AdamW state after step 1 (``exp_avg = (1 - beta1) g``); each weight may differ by
    how far AdamW's step moves when that gradient moves by its rounding bound
    (``lockstep.adamw_spread``), merged through ``s * B @ A`` for LoRA, plus the rounding of
    the weight itself."""
    from lockstep import adamw_spread

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _ok(_keeping_states(single, "--method", method, steps=2))  # keeps the state after step 1
    _ok(_torchrun(ddp, "--method", method, steps=1))
    theta0, _ = _trainable()
    terms = _reduction_terms(theta0)
    lr = _train_events(ddp)[1]["lr"]
    state = _states(single) / f"step-{1:06d}"
    opt, meta = load_file(state / "optimizer.safetensors"), json.loads(
        (state / "meta.json").read_text())
    beta1 = meta["optimizer_groups"][0]["betas"][0]
    group = dict(enumerate(_optimizer_order(method)))
    spread = {}
    for i, name in group.items():  # every trained tensor starts at its start value (B = 0)
        grad = opt[f"{i}/exp_avg"] / (1 - beta1)
        delta = EPS * terms * float(grad.abs().max()) * torch.ones_like(grad)
        start = torch.zeros_like(grad) if method == "lora" else theta0[name]
        spread[name] = adamw_spread(start, grad, delta, Adam(lr=lr))
    rank = 0
    if method == "lora":  # W + s * B @ A, with A as drawn (its gradient is 0 while B = 0)
        adapters = load_file(state / "method.safetensors")
        merged = {}
        for name, scale in _lora_scales().items():
            a = adapters[f"adapter/{name}.lora_A.default.weight"]
            rank = a.shape[0]
            merged[name] = scale * spread[f"{name}.lora_B.default.weight"] @ a.abs()
        spread = {_base_name(n) + ".weight": t for n, t in merged.items()}
    got, want = _group(ddp, 1, "weights"), _group(single, 1, "weights")
    assert got.keys() == want.keys() == spread.keys() and got
    for key in want:
        # plus the weight's own rounding, each step <= EPS * |W|: 1 subtraction, AdamW's 4
        # (moments, root, quotient) and up to 3 in a method's hook; LoRA's merge adds r + 1
        # (a sum over the rank r, then W0 + s * BA)
        rounding = 8 + (rank + 1 if method == "lora" else 0)
        bound = spread[key] + rounding * EPS * want[key].abs()
        assert bool(((got[key] - want[key]).abs() <= bound).all()), key
    assert sum(not torch.equal(want[k], theta0[k]) for k in want) > 0  # it trained


def _lora_method():
    from spider.methods import build_method
    from spider.models import load_model, select_trainable

    model = load_model(DEFAULT_MODEL)[0]
    select_trainable(model, ("llm", "projector"))
    return build_method("lora", model)


def _optimizer_order(method: str) -> list[str]:
    """The trained tensors' names in the optimizer's order (LoRA: the adapters)."""
    return list(_lora_method().params) if method == "lora" else _trainable()[1]


def _lora_scales() -> dict[str, float]:
    """LoRA's adapted modules (by their PEFT names) and their scale alpha / r."""
    method = _lora_method()
    out = {}
    for name in method.params:
        if name.endswith(".lora_A.default.weight"):
            module = name[: -len(".lora_A.default.weight")]
            out[module] = float(method.model.get_submodule(module).scaling["default"])
    return out


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def test_fsdp_shards_take_the_step_of_one_process_with_masks_of_whole_tensors(reference,
                                                                              tmp_path):
    # from the start (S = 0, no optimizer state) and from the last resumable step (S and
    # AdamW's moments, whole tensors on disk, loaded into the shards)
    for k in (0, STEPS - 1):
        out = _one_step_from(reference, k, tmp_path / f"fsdp-{k}", "--parallel", "fsdp")
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "done" and info["parallel"]["mode"] == "fsdp"
        # the masks were rebuilt from S of whole tensors in the check: the 2-process weights
        # follow them to rounding, so the shards' sums were all-reduced
        _assert_lockstep(reference, out, k)
    # every tensor was sharded in two along dim 0, and a shard's statistics alone would have
    # given another mask, so it is the all-reduce that makes them agree
    theta0, _ = _trainable()
    s_one = _group(reference, STEPS, "method")
    compared = 0
    for key, grad_sum in s_one.items():
        name = key.split("/", 1)[-1]
        if grad_sum.shape[0] < 2:
            continue
        w_one, _ = keep_weight(theta0[name], grad_sum, SpiderOptions())
        half = (grad_sum.shape[0] + 1) // 2
        w_shard, _ = keep_weight(theta0[name][:half], grad_sum[:half], SpiderOptions())
        if not torch.allclose(w_shard, w_one[:half], atol=1e-3):
            compared += 1
    assert compared > 0  # per-shard statistics would indeed have changed the masks


@pytest.mark.slow
def test_fsdp_run_stopped_by_sigterm_resumes_to_the_end_of_an_uninterrupted_one(tmp_path):
    """Same process count, same machine: resuming is promised bit for bit."""
    whole = tmp_path / "fsdp-whole"
    _ok(_torchrun(whole, "--method", "spider", "--parallel", "fsdp"))
    out = tmp_path / "fsdp-resume"
    proc = subprocess.Popen(_torchrun_cmd(out, "--method", "spider", "--parallel", "fsdp"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        layers = out / "layers.jsonl"
        if layers.exists() and '"step": 2,' in layers.read_text():
            break
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] in ("cancelled", "done")
    if info["status"] == "cancelled":
        _ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", "-m", "spider.train", "--output-dir",
                            str(out), "--resume"], capture_output=True, text=True, env=ENV,
                           timeout=300))
    for group in ("weights", "method"):
        a, b = _group(whole, STEPS, group), _group(out, STEPS, group)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), group
    assert [e["loss"] for e in _train_events(whole).values()] == \
        [e["loss"] for e in _train_events(out).values()]
    rows = [(r["step"], r["param"], r.get("mask_density"), r.get("update_norm"))
            for r in _layers(whole)]
    assert rows == [(r["step"], r["param"], r.get("mask_density"), r.get("update_norm"))
                    for r in _layers(out)]


def test_fsdp_refuses_a_method_that_cannot_handle_shards(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spider.train", *COMMON, "--method", "lora",
                           "--parallel", "fsdp", "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--parallel fsdp: method 'lora' does not support sharded parameters" in proc.stderr


def test_resume_with_another_number_of_processes_is_refused(reference, tmp_path):
    out = tmp_path / "cut"
    # a run cut short: copy the single-process run, drop its end, mark it cancelled

    shutil.copytree(reference, out)
    info = json.loads((out / "run.json").read_text())
    info.update(status="cancelled", parallel={"mode": "ddp", "world_size": 2})
    (out / "run.json").write_text(json.dumps(info))
    proc = subprocess.run([sys.executable, "-m", "spider.train", "--output-dir", str(out),
                           "--resume"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "was made with 2 process(es), not 1" in proc.stderr


def test_unknown_parallel_mode_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spider.train", "--parallel", "mpi",
                           "--output-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "--parallel must be one of auto, none, ddp, fsdp, not 'mpi'" in proc.stderr
